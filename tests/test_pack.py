"""Seed packs mean the same as seeds trained alone: same initial weights, independent seeds, close results."""

from __future__ import annotations

import pytest
import torch
from trialfactory import config

from trainers.data import load_data
from trainers.events import MemorySink
from trainers.loop import build_pack, train
from trainers.pack import PackedNet

CPU = torch.device("cpu")
SEEDS = [5, 6, 7]
# Grouped convolutions and batched matmuls sum in a different order than one seed's conv and linear,
# so values differ in the last float32 bits (~1e-7 relative) and training amplifies that a little.
# Over a few epochs losses agree to 1e-3 relative and accuracies to a couple of test examples.
LOSS_RTOL = 1e-3
ACC_ATOL = 3 / 449  # digits test set: 449 images


@pytest.fixture(scope="module")
def digits():
    return load_data(config().data, 0, CPU)


def by_seed(sink: MemorySink) -> dict[int, list]:
    out: dict[int, list] = {}
    for record in sink.epochs:
        out.setdefault(record.seed, []).append(record)
    return out


def test_initial_weights_in_a_pack_are_bit_identical_to_single_seed(digits):
    cfg = config(model__filters=3)
    pack = build_pack(cfg, SEEDS, digits)
    assert isinstance(pack, PackedNet)
    for k, seed in enumerate(SEEDS):
        alone = build_pack(cfg, [seed], digits)
        unpacked = pack.unpack(k, build_pack(cfg, [0], digits))
        for key, value in alone.state_dict().items():
            assert torch.equal(unpacked.state_dict()[key], value), (seed, key)


def test_pack_forward_equals_each_seed_alone(digits):
    cfg = config(model__filters=3)
    pack = build_pack(cfg, SEEDS, digits)
    x = digits.x_test[:64]
    packed = pack(x)
    for k, seed in enumerate(SEEDS):
        torch.testing.assert_close(packed[k], build_pack(cfg, [seed], digits)(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "scheme",
    ["baseline", {"name": "randomout", "tau": 30.0}, {"name": "repr", "s1": 1, "s2": 1, "n_iter": 1}],
    ids=["baseline", "randomout", "repr"],
)
@pytest.mark.slow
def test_a_packs_per_seed_results_match_single_seed_training(digits, scheme):
    cfg = config(scheme=scheme, model__filters=6, epochs=3)
    packed = MemorySink()
    train(cfg, packed, seeds=SEEDS, pack_size=3, data=digits)
    alone = MemorySink()
    train(cfg, alone, seeds=SEEDS, pack_size=1, data=digits)
    p, a = by_seed(packed), by_seed(alone)
    for seed in SEEDS:
        for rp, ra in zip(p[seed], a[seed], strict=True):
            assert rp.train_loss == pytest.approx(ra.train_loss, rel=LOSS_RTOL)
            assert rp.test_acc == pytest.approx(ra.test_acc, abs=ACC_ATOL)
            assert rp.flat()["dropped"] == ra.flat()["dropped"]
    assert [r.pack_size for r in packed.results] == [3, 3, 3]
    if scheme != "baseline":
        assert [r.total_resets for r in packed.results] == [r.total_resets for r in alone.results]
        assert sum(r.total_resets for r in packed.results) > 0


def test_seeds_in_a_pack_are_independent(digits):
    """Changing one seed (its init and its resets) never changes another seed's trajectory."""
    cfg = config(scheme={"name": "randomout", "tau": 30.0}, model__filters=4, epochs=2)
    first, second = MemorySink(), MemorySink()
    train(cfg, first, seeds=[1, 2, 3], pack_size=3, data=digits)
    train(cfg, second, seeds=[99, 2, 3], pack_size=3, data=digits)
    a, b = by_seed(first), by_seed(second)
    for seed in (2, 3):
        for ra, rb in zip(a[seed], b[seed], strict=True):
            assert (ra.train_loss, ra.test_acc, ra.layers) == (rb.train_loss, rb.test_acc, rb.layers)
    assert a[1][-1].test_loss != b[99][-1].test_loss


def test_a_diverging_seed_stops_alone(digits):
    cfg = config(optim={"name": "sgd", "lr": 30.0}, model__filters=4, epochs=4)
    sink = MemorySink()
    results = train(cfg, sink, seeds=[1, 2, 3, 4], pack_size=4, data=digits)
    alone = [train(cfg, MemorySink(), seeds=[s], data=digits)[0] for s in (1, 2, 3, 4)]
    assert [r.diverged for r in results] == [r.diverged for r in alone]
    assert [r.epochs_done for r in results] == [r.epochs_done for r in alone]


def test_batchnorm_models_refuse_packs(digits):
    with pytest.raises(ValueError, match="pack_size"):
        train(config(scheme="batchnorm"), MemorySink(), seeds=[1, 2], pack_size=2, data=digits)


def test_pack_resume_equals_uninterrupted(digits):
    cfg = config(scheme={"name": "repr", "s1": 1, "s2": 1, "n_iter": 1}, model__filters=6, epochs=3)
    full = MemorySink(keep_checkpoints=True)
    train(cfg, full, seeds=[1, 2], pack_size=2, data=digits)
    resumed = MemorySink()
    train(cfg, resumed, seeds=[1, 2], pack_size=2, data=digits, resume=full.checkpoints[0][1])
    assert [r.final_test_acc for r in resumed.results] == [r.final_test_acc for r in full.results]
