"""data.augment: crop+flip on training minibatches, drawn from data_seed once per epoch, on the device."""

from __future__ import annotations

import pytest
import test_no_host_sync
import torch

import trainers.loop as loop
from trainers.augment import PAD, crop_flip, draw_epoch
from trainers.config import TrialConfig
from trainers.data import load_data
from trainers.events import MemorySink

CPU = torch.device("cpu")
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
syncs = test_no_host_sync.syncs  # the fixture that counts host reads made by trainer code


def trial(**fields: object) -> TrialConfig:
    """A tiny crater_cnn on 40 synthetic 16x16 images (32 train: two steps of 16 per epoch)."""
    doc = {
        "data": {"name": "synthetic", "synthetic_samples": 40, "augment": "crop_flip"},
        "model": {"name": "crater_cnn", "filters": 2, "hidden_fc": 0, "init": "xavier"},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "epochs": 1,
        "batch_size": 16,
        "device": "cpu",
    }
    return TrialConfig.model_validate(doc | fields)


@pytest.fixture(scope="module")
def data():
    return load_data(trial().data, 0, CPU)


@pytest.fixture
def batches(monkeypatch):
    """Every (draws, augmented batch) the loop makes, in order."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recorded(x, draws):
        out = crop_flip(x, draws)
        seen.append((draws.clone(), out.clone()))
        return out

    monkeypatch.setattr(loop, "crop_flip", recorded)
    return seen


def train(cfg: TrialConfig, data, **kwargs) -> MemorySink:
    sink = MemorySink(keep_checkpoints=True)
    loop.train(cfg, sink, data=data, **kwargs)
    return sink


# --- the transform ---------------------------------------------------------------------------------------


def test_crop_and_flip_by_hand_on_a_2x2_image():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # padded to 10x10, the image at rows/cols 4..5
    cases = {
        (PAD, PAD, 0): [[1, 2], [3, 4]],  # the centre window is the image
        (PAD, PAD, 1): [[2, 1], [4, 3]],  # ... mirrored
        (3, 4, 0): [[0, 0], [1, 2]],  # one row up: a padding row enters at the top
        (3, 4, 1): [[0, 0], [2, 1]],
        (5, 3, 0): [[0, 3], [0, 0]],  # down one, left one
        (0, 8, 0): [[0, 0], [0, 0]],  # a corner of pure padding
    }
    for (row, col, flip), expected in cases.items():
        out = crop_flip(x, torch.tensor([[row, col, flip]]))
        assert torch.equal(out, torch.tensor([[expected]], dtype=torch.float32)), (row, col, flip)


def test_crop_is_a_window_of_the_zero_padded_image_and_flip_a_mirror():
    x = torch.arange(3 * 2 * 5 * 6, dtype=torch.float32).view(3, 2, 5, 6) + 1
    padded = torch.zeros(3, 2, 5 + 2 * PAD, 6 + 2 * PAD)
    padded[:, :, PAD : PAD + 5, PAD : PAD + 6] = x
    draws = torch.tensor([[0, 8, 0], [3, 1, 1], [8, 0, 1]])
    out = crop_flip(x, draws)
    assert out.shape == x.shape
    for i, (row, col, flip) in enumerate(draws.tolist()):
        window = padded[i, :, row : row + 5, col : col + 6]
        assert torch.equal(out[i], window.flip(-1) if flip else window)


def test_draws_cover_every_offset_and_flip_uniformly():
    draws = draw_epoch("crop_flip", 18_000, torch.Generator().manual_seed(0), CPU)
    assert draws.shape == (18_000, 3) and draws.dtype == torch.int64
    for column, values in ((0, 2 * PAD + 1), (1, 2 * PAD + 1), (2, 2)):
        counts = torch.bincount(draws[:, column], minlength=values)
        assert len(counts) == values and counts.min() > 0.9 * 18_000 / values
    assert abs(float(draws[:, 2].float().mean()) - 0.5) < 0.02


def test_none_draws_nothing_and_leaves_the_batch_and_key_alone(data, batches):
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert draw_epoch("none", 100, gen, CPU) is None
    assert torch.equal(gen.get_state(), state)  # no draw: old results stay bit-identical
    cfg = trial(data={"name": "synthetic", "synthetic_samples": 40})
    assert cfg.data.augment == "none" and cfg.trial_key() == trial(data=cfg.data.model_dump()).trial_key()
    train(cfg, data)
    assert batches == []  # the loop never calls the transform


def test_crop_flip_shows_in_the_trial_config_and_its_key():
    cfg, plain = trial(), trial(data={"name": "synthetic", "synthetic_samples": 40})
    assert cfg.identity()["data"]["augment"] == "crop_flip"
    assert '"augment":"crop_flip"' in cfg.model_dump_json()
    assert cfg.trial_key() != plain.trial_key() and cfg.pair_key() != plain.pair_key()
    with pytest.raises(ValueError, match="augment"):
        trial(data={"name": "synthetic", "augment": "mixup"})


# --- in the loop -----------------------------------------------------------------------------------------


def test_same_data_seed_same_batches_and_weights(data, batches):
    first = train(trial(), data)
    first_batches = list(batches)
    batches.clear()
    second = train(trial(), data)
    assert len(first_batches) == 2 and len(batches) == 2
    for (d1, x1), (d2, x2) in zip(first_batches, batches, strict=True):
        assert torch.equal(d1, d2) and torch.equal(x1, x2)
    # The trained weights, through everything they decide (a one-epoch trial keeps no checkpoint).
    assert first.traces[0].cgn.tolist() == second.traces[0].cgn.tolist()
    assert first.epochs[0].train_loss == second.epochs[0].train_loss
    assert first.results[0].final_test_loss == second.results[0].final_test_loss


def test_batches_are_augmented_and_differ_across_data_seeds(data, batches):
    train(trial(), data)
    seed0 = list(batches)
    batches.clear()
    train(trial(data_seed=1), data)
    assert not torch.equal(seed0[0][0], batches[0][0])
    # The transform changed the batch: not all crops are the centre window without a flip.
    draws = torch.cat([d for d, _ in seed0])
    assert not bool(((draws[:, :2] == PAD).all(dim=1) & (draws[:, 2] == 0)).all())


def test_schemes_and_pack_seeds_see_the_same_augmented_batches(data, batches):
    train(trial(), data)
    baseline = list(batches)
    batches.clear()
    train(trial(scheme={"name": "randomout", "tau": 50.0}, seed=7), data)
    randomout = list(batches)
    batches.clear()
    train(trial(), data, seeds=[1, 2], pack_size=2)
    for other in (randomout, list(batches)):
        assert len(other) == len(baseline)
        assert all(torch.equal(a[1], b[1]) for a, b in zip(baseline, other, strict=True))


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_one_draw_per_epoch_on_the_data_device(monkeypatch, device):
    drawn = []

    def recorded(augment, n, generator, target):
        out = draw_epoch(augment, n, generator, target)
        drawn.append((n, out.device, generator.device))
        return out

    monkeypatch.setattr(loop, "draw_epoch", recorded)
    cfg = trial(epochs=2, device=device.type)
    on_device = load_data(cfg.data, 0, device)
    train(cfg, on_device)
    assert [n for n, _, _ in drawn] == [32, 32]  # once per epoch, for every position of the epoch
    assert all(out.type == on_device.x_train.device.type for _, out, _ in drawn)
    assert all(gen.type == "cpu" for _, _, gen in drawn)  # the data_seed generator, as for randperm
    assert draw_epoch("crop_flip", 4, torch.Generator(), torch.device("meta")).device.type == "meta"


def test_augmented_epochs_make_no_host_reads(syncs, data):
    train(trial(epochs=2, scheme={"name": "repr", "s1": 1, "s2": 1, "n_iter": 1}), data)
    assert syncs.calls == []
