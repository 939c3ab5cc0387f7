"""Lottery-ticket schemes: IMP prunes exactly, rewinds exactly and its ticket control uses the same
masks; edge-popup never moves a weight and keeps exactly k; both mean the same in a seed pack."""

from __future__ import annotations

import math

import pytest
import torch
from trialfactory import config

from trainers.config import TrialConfig
from trainers.data import load_data
from trainers.events import MemorySink
from trainers.loop import build_pack, train
from trainers.masks import masked_weights, prune_smallest, top_fraction
from trainers.models import derive_seeds
from trainers.schemes.edgepopup import EdgePopup

CPU = torch.device("cpu")
# As tests/test_pack.py: a pack sums in another order (last float32 bits), training amplifies it a little.
LOSS_RTOL = 1e-3
ACC_ATOL = 3 / 449  # digits test set: 449 images
TINY = {"model__filters": 2, "model__hidden_fc": 16}


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    return load_data(config().data, 0, CPU)


def imp(**scheme) -> dict:
    return {"name": "imp", "rounds": 2, "rate": 0.5} | scheme


def checkpoints(cfg: TrialConfig, digits, seeds=(3,), pack_size=1) -> tuple[MemorySink, list]:
    sink = MemorySink(keep_checkpoints=True)
    results = train(cfg, sink, seeds=list(seeds), pack_size=pack_size, data=digits)
    return sink, results


def prunable_state(cfg: TrialConfig, state: dict, digits, seeds=(3,)) -> list[torch.Tensor]:
    model = build_pack(cfg, list(seeds), digits)
    model.load_state_dict(state)
    return [w.per_seed(w.weight).detach().clone() for w in masked_weights(model)]


# -- IMP: masks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_pruning_drops_exactly_rate_of_the_kept_weights_smallest_first(scope):
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(2, 40, generator=gen), torch.randn(2, 25, generator=gen)]
    weights[0][0, :10] = 0.5  # ties: the count must stay exact
    masks = [torch.ones_like(w, dtype=torch.bool) for w in weights]
    for _ in range(3):
        new = prune_smallest(weights, masks, 0.2, scope)
        for old, mask in zip(masks, new, strict=True):
            assert not (mask & ~old).any()  # pruned weights stay pruned
        if scope == "layer":
            for old, mask in zip(masks, new, strict=True):
                assert (old.sum(1) - mask.sum(1)).tolist() == [round(0.2 * int(n)) for n in old.sum(1)]
        else:
            kept, now = sum(m.sum(1) for m in masks), sum(m.sum(1) for m in new)
            assert (kept - now).tolist() == [round(0.2 * int(n)) for n in kept]
        joined_w, joined_new, joined_old = (torch.cat(x, 1) for x in (weights, new, masks))
        if scope == "layer":
            pairs = zip(weights, new, masks, strict=True)
        else:
            pairs = [(joined_w, joined_new, joined_old)]
        for w, mask, old in pairs:
            for k in range(2):
                dropped, kept = w[k][old[k] & ~mask[k]].abs(), w[k][mask[k]].abs()
                assert dropped.max() <= kept.min()  # the smallest magnitudes went
        masks = new


def test_top_fraction_keeps_exactly_k_of_each_seed():
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    mask = top_fraction(scores, 0.3)
    assert mask.sum(1).tolist() == [15, 15, 15]
    for k in range(3):
        assert scores[k][mask[k]].abs().min() >= scores[k][~mask[k]].abs().max()


# -- IMP: training -------------------------------------------------------------------------------------


def test_imp_rewinds_exactly_to_the_initial_weights_times_the_mask(digits):
    cfg = config(scheme=imp(rounds=1), epochs=2, **TINY)
    sink, _ = checkpoints(cfg, digits)
    initial = build_pack(cfg, [3], digits).state_dict()
    epoch, state = sink.checkpoints[1]  # end of round 0: pruned and rewound
    assert epoch == 1
    masks = state["scheme"]["masks"]
    model = build_pack(cfg, [3], digits)
    model.load_state_dict(state["model"])
    for w, mask, w0 in zip(masked_weights(model), masks, prunable_state(cfg, initial, digits), strict=True):
        assert int((~mask).sum()) == round(0.5 * mask.numel())  # layer-wise, exactly rate
        assert torch.equal(w.per_seed(w.weight), w0 * mask)
    for name, value in initial.items():
        if not name.endswith("weight"):
            assert torch.equal(state["model"][name], value), name  # biases rewound too
    assert state["optimizer"]["state"] == {}  # a fresh optimizer for the round


def test_imp_rewinds_to_the_weights_after_rewind_step_steps(digits):
    # batch 450 on 1,348 training images: 3 steps per epoch, so step 3 is the end of epoch 0.
    base = config(epochs=2, batch_size=450, **TINY)
    baseline, _ = checkpoints(base, digits)
    cfg = config(scheme=imp(rounds=1, rewind_step=3), epochs=2, batch_size=450, **TINY)
    sink, _ = checkpoints(cfg, digits)
    rewound = prunable_state(cfg, sink.checkpoints[1][1]["model"], digits)
    after_3 = prunable_state(base, baseline.checkpoints[0][1]["model"], digits)
    for got, want, mask in zip(rewound, after_3, sink.checkpoints[1][1]["scheme"]["masks"], strict=True):
        assert torch.equal(got, want * mask)


def test_imp_rewind_step_past_round_0_is_an_error(digits):
    cfg = config(scheme=imp(rounds=1, rewind_step=10_000), epochs=1, **TINY)
    with pytest.raises(ValueError, match="scheme.rewind_step"):
        train(cfg, MemorySink(), data=digits)


def test_imp_records_rounds_and_keeps_pruned_weights_at_zero(digits):
    cfg = config(scheme=imp(scope="global"), epochs=2, **TINY)
    sink, results = checkpoints(cfg, digits)
    assert cfg.total_epochs == 6 and len(sink.epochs) == 6
    ends = [r for r in sink.epochs if r.extra["round_end"]]
    assert [r.extra["round"] for r in ends] == [0, 1, 2]
    assert [r.epoch for r in ends] == [1, 3, 5]
    total = sum(w.per_seed(w.weight).shape[1] for w in masked_weights(build_pack(cfg, [3], digits)))
    kept = total
    for r in ends[1:]:
        before, kept = kept, kept - round(0.5 * kept)
        assert r.extra["sparsity"] == pytest.approx(1 - kept / total)
        # Nested masks: the Jaccard overlap with the round before is kept / kept before.
        assert r.extra["mask_overlap"] == pytest.approx(kept / before)
    assert math.isnan(ends[0].extra["mask_overlap"])
    final = sink.checkpoints[-1][1]
    for w, mask in zip(prunable_state(cfg, final["model"], digits), final["scheme"]["masks"], strict=True):
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))
        assert bool((w[mask] != 0).all())
    assert results[0].sparsity == pytest.approx(ends[-1].extra["sparsity"])
    assert results[0].final_test_acc == ends[-1].test_acc  # the trial's result is the last round


def test_the_ticket_control_trains_the_rewound_masks_from_a_fresh_init(digits):
    rewound_cfg = config(scheme=imp(), epochs=1, **TINY)
    control_cfg = config(scheme=imp(reinit=True), epochs=1, **TINY)
    assert control_cfg.reference_hash() == rewound_cfg.config_hash()
    assert rewound_cfg.reference_hash() is None
    rewound, _ = checkpoints(rewound_cfg, digits)
    control, _ = checkpoints(control_cfg, digits)
    # phases: rewound 0, 1, 2; control 0, 1*, 1, 2* (* = fresh init)
    assert [r.extra["round"] for r in control.epochs] == [0, 1, 1, 2]
    assert [r.extra["round_end"] for r in control.epochs] == [True, True, False, True]
    # The control's rewound path is the rewound trial's, epoch for epoch, so its masks are too.
    assert control.epochs[2].test_loss == rewound.epochs[1].test_loss
    for got, want in zip(
        control.checkpoints[-1][1]["scheme"]["masks"],
        rewound.checkpoints[-1][1]["scheme"]["masks"],
        strict=True,
    ):
        assert torch.equal(got, want)
    # A fresh-init round starts from the initial weights of seed + offset, times the mask.
    offset = control_cfg.scheme.reinit_offset
    fresh = prunable_state(control_cfg, build_pack(control_cfg, [3 + offset], digits).state_dict(), digits)
    start = control.checkpoints[0][1]  # end of round 0: round 1* begins
    got = prunable_state(control_cfg, start["model"], digits)
    for g, f, mask in zip(got, fresh, start["scheme"]["masks"], strict=True):
        assert torch.equal(g, f * mask)
    # ... and sees the batches of the rewound round with that mask: same data stream, another init.
    assert control.epochs[1].test_loss != rewound.epochs[1].test_loss


# Shorter rewound rounds (round_steps remaining, OpenLTH): batch 450 gives 3 steps per epoch, so with
# 2 epochs per round and rewind_step 4 each later round skips one epoch whole and a step of the next.
SHORT_ROUNDS = {"epochs": 2, "batch_size": 450, "rewind_step": 4, "round_steps": "remaining"}


@pytest.mark.parametrize(
    ("reinit", "short"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["rewound", "control", "rewound-short-rounds", "control-short-rounds"],
)
@pytest.mark.slow
def test_imp_resume_equals_uninterrupted(digits, reinit, short):
    fields = {k: SHORT_ROUNDS[k] for k in ("rewind_step", "round_steps")} if short else {}
    sizes = {k: SHORT_ROUNDS[k] for k in ("epochs", "batch_size")} if short else {"epochs": 1}
    cfg = config(scheme=imp(reinit=reinit, **fields), **sizes, **TINY)
    full, _ = checkpoints(cfg, digits, seeds=(1, 2), pack_size=2)
    for epoch, state in full.checkpoints[:-1]:
        resumed = MemorySink()
        train(cfg, resumed, seeds=[1, 2], pack_size=2, data=digits, resume=state)
        assert [r.final_test_acc for r in resumed.results] == [r.final_test_acc for r in full.results], epoch
        # The same epochs (none of the skipped ones), steps and numbers after the checkpoint.
        after = [
            (r.seed, r.epoch, r.steps, r.train_loss, r.test_loss) for r in full.epochs if r.epoch > epoch
        ]
        assert [(r.seed, r.epoch, r.steps, r.train_loss, r.test_loss) for r in resumed.epochs] == after, epoch


# -- edge-popup ----------------------------------------------------------------------------------------


def initial_frozen(cfg: TrialConfig, seeds: list[int], digits) -> list[torch.Tensor]:
    scheme = EdgePopup(cfg.scheme)
    model = build_pack(cfg, seeds, digits)
    scheme.prepare(model, [torch.Generator().manual_seed(derive_seeds(s)[1]) for s in seeds])
    return [w.clone() for w in scheme.frozen]


@pytest.mark.parametrize("weights", ["signed_constant", "kaiming_normal"])
def test_edgepopup_never_moves_a_weight_and_keeps_exactly_k(digits, weights):
    cfg = config(scheme={"name": "edgepopup", "k": 0.3, "weights": weights}, epochs=3, **TINY)
    sink, results = checkpoints(cfg, digits)
    before = initial_frozen(cfg, [3], digits)
    first, last = sink.checkpoints[0][1], sink.checkpoints[-1][1]
    model = build_pack(cfg, [3], digits)
    model.load_state_dict(last["model"])
    kept_total = 0
    for w, w0, saved in zip(masked_weights(model), before, last["scheme"]["frozen"], strict=True):
        assert torch.equal(saved, w0)  # the random weights never change
        live = w.weight.detach()
        mask = live != 0
        assert int(mask.sum()) == round(0.3 * w.weight.numel())  # density k, exactly, per layer
        assert torch.equal(live[mask], w0[mask])  # the net is a subnetwork of W0
        kept_total += int(mask.sum())
        if weights == "signed_constant":
            assert torch.allclose(w0.abs(), torch.full_like(w0, math.sqrt(2 / w.fan_in)))
    for name, value in last["model"].items():
        if name.endswith("bias"):
            assert torch.equal(value, torch.zeros_like(value)), name
    scores = zip(first["scheme"]["scores"], last["scheme"]["scores"], strict=True)
    assert not all(torch.equal(a, b) for a, b in scores)  # the scores did train
    total = sum(w.weight.numel() for w in masked_weights(model))
    assert results[0].sparsity == pytest.approx(1 - kept_total / total)
    assert results[0].final_test_acc > 0.3  # a random subnetwork that learned something (chance 0.1)


# -- seed packs ----------------------------------------------------------------------------------------


# Signed-constant weights are all +-c, so a unit's pre-activation over equal inputs (the digits' blank
# borders) is often an exact cancellation, 0 in exact arithmetic: rounding, which differs between a pack
# and a seed alone, then decides the ReLU's gate and the gradient moves by a whole term. Measured over
# one epoch: losses within 3e-3 relative, accuracies within 8 test images; kaiming-normal weights (no
# exact ties) stay within the tolerances of the other schemes.
SIGNED_LOSS_RTOL = 1e-2
SIGNED_ACC_ATOL = 0.05


@pytest.mark.parametrize(
    ("scheme", "loss_rtol", "acc_atol"),
    [
        (imp(), LOSS_RTOL, ACC_ATOL),
        (imp(reinit=True, scope="global"), LOSS_RTOL, ACC_ATOL),
        (
            imp(conv_rate=0.25, output_layer="half", rewind_step=5, round_steps="remaining"),
            LOSS_RTOL,
            ACC_ATOL,
        ),
        (
            imp(reinit=True, output_layer="exclude", rewind_step=5, round_steps="remaining"),
            LOSS_RTOL,
            ACC_ATOL,
        ),
        ({"name": "edgepopup", "k": 0.5, "weights": "kaiming_normal"}, LOSS_RTOL, ACC_ATOL),
        ({"name": "edgepopup", "k": 0.5}, SIGNED_LOSS_RTOL, SIGNED_ACC_ATOL),
    ],
    ids=[
        "imp",
        "imp-control-global",
        "imp-conventions",
        "imp-control-excluded-output",
        "edgepopup-kaiming",
        "edgepopup-signed",
    ],
)
@pytest.mark.slow
def test_a_packed_seed_equals_the_seed_alone(digits, scheme, loss_rtol, acc_atol):
    cfg = config(scheme=scheme, epochs=1, model__filters=3, model__hidden_fc=16)
    seeds = [5, 6, 7]
    packed, alone = MemorySink(), MemorySink()
    p = train(cfg, packed, seeds=seeds, pack_size=3, data=digits)
    a = train(cfg, alone, seeds=seeds, pack_size=1, data=digits)
    for seed in seeds:
        rp = [r for r in packed.epochs if r.seed == seed]
        ra = [r for r in alone.epochs if r.seed == seed]
        assert len(rp) == len(ra) == cfg.total_epochs
        for x, y in zip(rp, ra, strict=True):
            assert x.train_loss == pytest.approx(y.train_loss, rel=loss_rtol)
            assert x.test_acc == pytest.approx(y.test_acc, abs=acc_atol)
            assert x.extra.get("sparsity") == pytest.approx(y.extra.get("sparsity"))
    assert [r.sparsity for r in p] == pytest.approx([r.sparsity for r in a])
    assert [r.pack_size for r in p] == [3, 3, 3]


@pytest.mark.parametrize(
    "scheme", [imp(reinit=True), {"name": "edgepopup", "k": 0.4}], ids=["imp", "edgepopup"]
)
@pytest.mark.slow
def test_a_seed_in_a_pack_is_bit_identical_whatever_its_pack_mates(digits, scheme):
    cfg = config(scheme=scheme, epochs=1, model__filters=3, model__hidden_fc=16)
    first, second = MemorySink(), MemorySink()
    train(cfg, first, seeds=[5, 6, 7], pack_size=3, data=digits)
    train(cfg, second, seeds=[5, 8, 9], pack_size=3, data=digits)
    a = [(r.train_loss, r.test_acc, r.extra) for r in first.epochs if r.seed == 5]
    b = [(r.train_loss, r.test_acc, r.extra) for r in second.epochs if r.seed == 5]
    assert a == b
