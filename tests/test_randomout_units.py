"""RandomOut's units (cgn_reduction) and timing (check_every), with the trial's counts in the same units."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trialfactory import config

from trainers.cgn import CgnMonitor
from trainers.config import RandomOutScheme
from trainers.data import load_data
from trainers.events import MemorySink
from trainers.filters import filter_groups
from trainers.loop import train
from trainers.models import build_model
from trainers.schemes import RandomOut, TrainContext

CPU = torch.device("cpu")
BATCH = 4


@pytest.fixture(scope="module")
def digits():
    return load_data(config().data, 0, CPU)


def tiny_context(scheme: dict, epochs: int = 4):
    """A 3-filter, 2-layer net, an SGD optimizer and a monitor that reads tau as the trial does."""
    cfg = config(scheme={"name": "randomout", **scheme}, epochs=epochs, model__filters=3)
    model = build_model(
        cfg.model, in_channels=1, image_size=8, num_classes=10, batchnorm=False, generator=torch.Generator()
    )
    groups = filter_groups(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = CgnMonitor(groups, tau=cfg.count_tau, trace_every=1, reduction=cfg.count_reduction)
    gen = torch.Generator().manual_seed(11)
    ctx = TrainContext(cfg, model, groups, optimizer, monitor, data=None, generators=[gen])
    return ctx, RandomOut(cfg.scheme)


def observe(ctx: TrainContext, step: int, first_layer: list[float]) -> list[torch.Tensor]:
    """One minibatch of BATCH examples whose mean-loss gradient gives the first layer's filters these
    |grad| sums (the second layer's filters get a large one); returns the monitor's CGN (summed units)."""
    for group, values in zip(ctx.groups, (first_layer, [100.0] * 3), strict=True):
        group.weight.grad = torch.zeros_like(group.weight)
        group.weight.grad[:, 0, 0, 0] = torch.tensor(values)
    ctx.step = step
    return ctx.monitor.observe(step, BATCH)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_a_filter_resets_under_mean_units_and_not_under_sum(reduction):
    """Filter 0's mean-loss |grad| sum is 0.5: CGN 0.5 x 4 = 2.0 in summed units, 0.5 in mean units.
    At tau = 1 it is dead only when tau is read in mean units; counts and resets agree either way."""
    ctx, scheme = tiny_context({"tau": 1.0, "cgn_reduction": reduction})
    before = ctx.groups[0].weight.detach().clone()
    cgns = observe(ctx, 0, [0.5, 3.0, 0.1])
    assert cgns[0][0].tolist() == pytest.approx([2.0, 12.0, 0.4])  # reports stay in summed units
    scheme.after_step(ctx, cgns)
    expected = [True, False, True] if reduction == "mean" else [False, False, True]
    reset = [not torch.equal(ctx.groups[0].weight[f], before[f]) for f in range(3)]
    assert reset == expected
    [(stats, trace, resets)] = ctx.monitor.epoch_end(0, [[0], [0]], [[0.0], [0.0]])
    assert stats[0].below_tau == stats[0].resets == resets == sum(expected)
    assert trace.reset[(trace.step == 0) & (trace.layer == ctx.groups[0].name)].tolist() == expected


def test_epoch_check_resets_once_on_the_epoch_mean_not_on_a_bad_step():
    """Filter 0 has one bad step (CGN 0.4 < 1) but an epoch mean of (0.4 + 12 + 12) / 3 = 8.13: never reset.
    Filter 1's mean (0.8 + 0.8 + 0.8) / 3 = 0.8 < 1: reset once, at the epoch's end, not at its steps."""
    ctx, scheme = tiny_context({"tau": 1.0, "check_every": "epoch"})
    before = ctx.groups[0].weight.detach().clone()
    for step, values in enumerate(([0.1, 0.2, 5.0], [3.0, 0.2, 5.0], [3.0, 0.2, 5.0])):
        scheme.after_step(ctx, observe(ctx, step, values))
        assert torch.equal(ctx.groups[0].weight, before), "no check at a step"
    assert [d.tolist() for d in ctx.monitor.dead_filters()] == [[[False, True, False]], [[False] * 3]]
    scheme.on_epoch_end(ctx, 0)
    reset = [not torch.equal(ctx.groups[0].weight[f], before[f]) for f in range(3)]
    assert reset == [False, True, False]
    [(stats, trace, resets)] = ctx.monitor.epoch_end(0, [[0], [0]], [[0.0], [0.0]])
    assert (stats[0].resets, stats[0].dead, resets, stats[0].below_tau) == (1, 1, 1, 4)
    per_epoch = (trace.step == -1) & (trace.layer == ctx.groups[0].name)
    assert trace.reset[per_epoch].tolist() == [0, 1, 0]


def test_epoch_check_skips_the_last_epoch_and_the_epochs_past_p():
    ctx, scheme = tiny_context({"tau": 1.0, "check_every": "epoch", "active_fraction": 0.5}, epochs=4)
    for epoch, acts in ((0, True), (1, True), (2, False), (3, False)):
        ctx.epoch = epoch
        observe(ctx, epoch, [0.1, 0.1, 0.1])
        scheme.on_epoch_end(ctx, epoch)
        [(stats, _, _)] = ctx.monitor.epoch_end(epoch, [[0], [0]], [[0.0], [0.0]])
        assert stats[0].dead == 3 and stats[0].resets == (3 if acts else 0), epoch
    ctx, scheme = tiny_context({"tau": 1.0, "check_every": "epoch"}, epochs=2)
    ctx.epoch = 1
    observe(ctx, 0, [0.1, 0.1, 0.1])
    scheme.on_epoch_end(ctx, 1)  # the last epoch: the trial ends here
    assert int(ctx.monitor._resets[0].sum()) == 0


def test_defaults_keep_the_trial_keys():
    plain = config(scheme={"name": "randomout", "tau": 2.0})
    spelled = config(scheme={"name": "randomout", "tau": 2.0, "cgn_reduction": "sum", "check_every": "step"})
    assert plain.trial_key() == spelled.trial_key()
    assert plain.count_reduction == "sum" and config().count_reduction == "sum"
    other = config(scheme={"name": "randomout", "tau": 2.0, "cgn_reduction": "mean"})
    assert other.trial_key() != plain.trial_key() and other.count_reduction == "mean"
    assert RandomOutScheme().check_every == "step"


def _step0_cgn(digits, filters: int) -> np.ndarray:
    """The first full-batch step's CGN per filter of the first layer (summed units), from a baseline run."""
    sink = MemorySink()
    train(config(model__filters=filters, full_batch=True, epochs=1, trace_every=1), sink, data=digits)
    trace = sink.traces[0]
    first = (trace.step == 0) & (trace.layer == trace.layer[0])
    return trace.cgn[first]


def test_in_training_tau_reads_mean_units_at_one_over_b(digits):
    """Full batch, one step: B = n_train. With tau at the median step-0 CGN / B, mean units reset the
    filters below the median and summed units (CGN >> tau) reset none; the counts say the same."""
    cgn = _step0_cgn(digits, filters=6)
    b = len(digits.x_train)
    tau = float(np.median(cgn)) / b
    for reduction in ("mean", "sum"):
        cfg = config(
            scheme={"name": "randomout", "tau": tau, "cgn_reduction": reduction},
            model__filters=6,
            full_batch=True,
            epochs=1,
            trace_every=1,
        )
        sink = MemorySink()
        train(cfg, sink, data=digits)
        trace = sink.traces[0]
        first = (trace.step == 0) & (trace.layer == trace.layer[0])
        expected = (cgn / b < tau) if reduction == "mean" else (cgn < tau)
        assert trace.reset[first].astype(bool).tolist() == expected.tolist()
        row = sink.epochs[0].flat()
        assert row["below_tau"] == row["resets"]
        assert (row["resets"] > 0) == (reduction == "mean")


def test_in_training_epoch_check_resets_the_dead_filters_of_each_epoch(digits):
    """Each epoch but the last resets exactly the filters whose epoch-mean CGN / B is below tau (hand
    computed from the per-epoch rows of the trace), and the counts hold them."""
    b = len(digits.x_train)
    cgn = _step0_cgn(digits, filters=6)
    tau = float(np.median(cgn)) / b
    cfg = config(
        scheme={"name": "randomout", "tau": tau, "cgn_reduction": "mean", "check_every": "epoch"},
        model__filters=6,
        full_batch=True,
        epochs=3,
    )
    sink = MemorySink()
    train(cfg, sink, data=digits)
    total = 0
    for epoch, (record, trace) in enumerate(zip(sink.epochs, sink.traces, strict=True)):
        means = trace.step == -1
        dead = trace.cgn[means] / b < np.float32(tau)
        row = record.flat()
        assert row["dead"] == int(dead.sum())
        expected = dead if epoch < cfg.epochs - 1 else np.zeros_like(dead)
        assert trace.reset[means].astype(bool).tolist() == expected.tolist()
        assert row["resets"] == int(expected.sum())
        total += row["resets"]
    assert total > 0 and sink.results[0].total_resets == total


@pytest.mark.parametrize("check_every", ["step", "epoch"])
def test_a_pack_gives_each_seed_its_resets_alone(digits, check_every):
    seeds = [5, 6, 7]
    scheme = {"name": "randomout", "tau": 0.8, "cgn_reduction": "mean", "check_every": check_every}
    cfg = config(scheme=scheme, model__filters=4, epochs=3)
    packed, alone = MemorySink(), MemorySink()
    train(cfg, packed, seeds=seeds, pack_size=3, data=digits)
    train(cfg, alone, seeds=seeds, pack_size=1, data=digits)
    key = lambda r: (r.seed, r.epoch)  # noqa: E731
    for rp, ra in zip(sorted(packed.epochs, key=key), sorted(alone.epochs, key=key), strict=True):
        assert (rp.seed, rp.epoch) == (ra.seed, ra.epoch)
        assert [(s.resets, s.dead) for s in rp.layers] == [(s.resets, s.dead) for s in ra.layers]
        assert rp.train_loss == pytest.approx(ra.train_loss, rel=1e-3)
    assert [r.total_resets for r in packed.results] == [r.total_resets for r in alone.results]
    assert sum(r.total_resets for r in packed.results) > 0
