"""The trainer core: CGN units, RandomOut resets, RePr ranking/drop/re-init, determinism, resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from trialfactory import config

from trainers.cgn import CgnMonitor
from trainers.config import RandomOutScheme, TrialConfig
from trainers.data import load_data
from trainers.events import MemorySink
from trainers.filters import filter_groups
from trainers.loop import derive_seeds, train
from trainers.models import build_model, draw_filters
from trainers.ranking import global_drop_masks, ortho_scores
from trainers.reinit import orthogonal_rows
from trainers.schemes import RandomOut, TrainContext

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return load_data(config().data, 0, CPU)


def run(cfg: TrialConfig, data, keep_checkpoints: bool = False) -> MemorySink:
    sink = MemorySink(keep_checkpoints=keep_checkpoints)
    train(cfg, sink, data=data)
    return sink


def tiny_model(seed: int = 0, filters: int = 3):
    cfg = config(model__filters=filters).model
    gen = torch.Generator().manual_seed(seed)
    return build_model(cfg, in_channels=1, image_size=8, num_classes=10, batchnorm=False, generator=gen)


# --- CGN -------------------------------------------------------------------------------------------------


def test_cgn_is_the_summed_loss_gradient_l1_per_filter():
    """CGN(k) = sum_i |dL_sum/dw_i^k|: our mean-loss training must report the reference's units."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    model = tiny_model()
    F.cross_entropy(model(x), y).backward()  # mean reduction, as in training
    monitor = CgnMonitor(filter_groups(model), tau=1e-8, trace_every=0)
    ours = [c[0] for c in monitor.observe(step=0, batch_size=5)]

    reference = tiny_model()
    F.cross_entropy(reference(x), y, reduction="sum").backward()
    for layer, cgn in zip(reference.filter_layers(), ours, strict=True):
        grad = layer.conv.weight.grad
        by_hand = torch.tensor([grad[k].abs().sum() for k in range(grad.shape[0])])
        torch.testing.assert_close(cgn, by_hand, rtol=1e-5, atol=1e-9)


def test_cgn_epoch_summary_counts_below_tau_and_ignores_masked_filters():
    model = tiny_model()
    groups = filter_groups(model)
    monitor = CgnMonitor(groups, tau=0.5, trace_every=1)
    for group, values in zip(groups, ([0.1, 1.0, 0.2], [2.0, 0.0, 3.0]), strict=True):
        group.weight.grad = torch.zeros_like(group.weight)
        group.weight.grad[:, 0, 0, 0] = torch.tensor(values)
    monitor.active[1] = torch.tensor([[True, False, True]])  # a RePr-dropped filter is not "dead"
    monitor.observe(step=0, batch_size=1)
    [(stats, trace, _)] = monitor.epoch_end(0, [[0], [1]], [[0.0], [0.0]])
    assert [s.below_tau for s in stats] == [2, 0]
    assert stats[0].cgn_min == pytest.approx(0.1)
    assert stats[1].cgn_min == pytest.approx(2.0)
    assert stats[0].cgn_mean == pytest.approx((0.1 + 1.0 + 0.2) / 3)
    per_epoch = trace.step == -1
    assert per_epoch.sum() == 6 and (trace.step == 0).sum() == 6


# --- RandomOut -------------------------------------------------------------------------------------------


def randomout_context(active_fraction: float, epoch: int, reset_opt: bool = False):
    cfg = config(scheme={"name": "randomout", "tau": 0.5, "active_fraction": active_fraction}, epochs=4)
    model = tiny_model()
    groups = filter_groups(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    monitor = CgnMonitor(groups, tau=0.5, trace_every=0)
    gen = torch.Generator().manual_seed(11)
    ctx = TrainContext(cfg, model, groups, optimizer, monitor, data=None, generators=[gen], epoch=epoch)
    scheme = RandomOut(
        RandomOutScheme(tau=0.5, active_fraction=active_fraction, reset_optimizer_state=reset_opt)
    )
    return ctx, scheme


def test_randomout_resets_exactly_the_filters_below_tau():
    ctx, scheme = randomout_context(active_fraction=1.0, epoch=0, reset_opt=True)
    before = [group.weight.detach().clone() for group in ctx.groups]
    cgns = [torch.tensor([[0.1, 0.9, 0.4]]), torch.tensor([[1.0, 1.0, 0.0]])]
    expected_gen = torch.Generator().manual_seed(11)
    expected_fresh = [draw_filters(g.single_shape, "xavier", expected_gen, CPU) for g in ctx.groups]

    scheme.after_step(ctx, cgns)

    for group, old, fresh, cgn in zip(ctx.groups, before, expected_fresh, cgns, strict=True):
        for k in range(3):
            now = group.weight[k]
            if cgn[0, k] < 0.5:
                assert torch.equal(now, fresh[k]), "a dead filter must be re-drawn from the initializer"
                assert torch.count_nonzero(ctx.optimizer.state[group.weight]["exp_avg"][k]) == 0
            else:
                assert torch.equal(now, old[k]), "a live filter must not be touched"
                assert torch.count_nonzero(ctx.optimizer.state[group.weight]["exp_avg"][k]) > 0
    assert [int(r.sum()) for r in ctx.monitor._resets] == [2, 1]


def test_randomout_does_nothing_once_inactive():
    ctx, scheme = randomout_context(active_fraction=0.5, epoch=2)  # epoch 2 of 4 is not < 0.5 * 4
    before = [group.weight.detach().clone() for group in ctx.groups]
    scheme.after_step(ctx, [torch.zeros(1, 3), torch.zeros(1, 3)])
    assert all(torch.equal(group.weight, b) for group, b in zip(ctx.groups, before, strict=True))
    ctx.epoch = 1
    scheme.after_step(ctx, [torch.zeros(1, 3), torch.zeros(1, 3)])
    assert not torch.equal(ctx.groups[0].weight, before[0])


def test_randomout_in_training_counts_its_resets_as_below_tau(digits):
    cfg = config(scheme={"name": "randomout", "tau": 1e9, "active_fraction": 0.5}, epochs=2)
    sink = run(cfg, digits)
    first, second = sink.epochs
    assert first.flat()["resets"] == first.flat()["below_tau"] > 0  # every check resets while active
    assert second.flat()["resets"] == 0 and second.flat()["below_tau"] > 0  # inactive: would reset
    assert sink.results[0].total_resets == first.flat()["resets"]


# --- RePr ------------------------------------------------------------------------------------------------


def test_ortho_metric_matches_the_formula_on_a_hand_made_matrix():
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]).view(3, 2, 1, 1)
    r = 1 / math.sqrt(2)
    # |W^ W^T - I| rows: [0, r, 0], [r, 0, r], [0, r, 0]; O = row sum / J, J = 3
    expected = torch.tensor([r, 2 * r, r]) / 3
    torch.testing.assert_close(ortho_scores(w), expected)


def test_global_ranking_drops_the_top_fraction_and_keeps_one_filter_per_layer():
    scores = [torch.tensor([9.0, 8.0]), torch.tensor([1.0, 7.0, 2.0, 3.0])]
    masks = global_drop_masks(scores, [True, True], fraction=0.5)
    assert masks[0].tolist() == [True, False]  # 8.0 would empty the layer: skipped
    assert masks[1].tolist() == [False, True, False, True]
    masks = global_drop_masks(scores, [False, True], fraction=0.5)
    assert masks[0].tolist() == [False, False] and int(masks[1].sum()) == 2


def test_reinit_rows_are_orthogonal_to_kept_and_old_rows():
    gen = torch.Generator().manual_seed(0)
    kept, old, fresh = (
        torch.randn(12, 64, generator=gen),
        torch.randn(4, 64, generator=gen),
        torch.randn(4, 64),
    )
    rows, fallbacks = orthogonal_rows(kept, old, fresh, gen)
    assert fallbacks == 0
    cos = F.normalize(rows, dim=1) @ F.normalize(torch.cat([kept, old]), dim=1).T
    assert cos.abs().max() < 1e-5
    torch.testing.assert_close(rows.norm(dim=1), fresh.norm(dim=1))
    assert rows.norm(dim=1).min() > 0


def test_reinit_falls_back_and_counts_when_the_null_space_is_too_small():
    gen = torch.Generator().manual_seed(0)
    kept, old, fresh = torch.randn(5, 8), torch.randn(2, 8), torch.randn(2, 8)
    rows, fallbacks = orthogonal_rows(kept, old, fresh, gen)
    assert fallbacks == 1  # null space of 7 rows in R^8 has one direction for two filters
    assert torch.equal(rows[1], fresh[1])
    cos = F.normalize(rows[:1], dim=1) @ F.normalize(torch.cat([kept, old]), dim=1).T
    assert cos.abs().max() < 1e-5


def repr_config(**scheme) -> TrialConfig:
    return config(
        scheme={"name": "repr", "s1": 1, "s2": 2, "n_iter": 1, "drop_fraction": 0.5, **scheme},
        model__filters=6,
        epochs=4,
    )


@pytest.mark.parametrize("metric", ["ortho", "weight", "cgn", "taylor", "apoz", "activation", "random"])
def test_repr_drops_freezes_and_reintroduces(digits, metric):
    sink = run(repr_config(metric=metric), digits, keep_checkpoints=True)
    states = {epoch: state for epoch, state in sink.checkpoints}
    # Schedule: drop after epoch 0 (S1 = 1), re-introduce after epoch 2 (S2 = 2).
    assert [e.flat()["dropped"] for e in sink.epochs] == [3, 3, 0, 0]
    assert sink.epochs[2].flat()["resets"] == 3
    mask = states[0]["scheme"]["drop"][1][0]  # [layer][seed, filter]
    assert int(mask.sum()) == 3 and states[0]["scheme"]["drop"][0].sum() == 0  # first layer excluded
    key_w, key_b = "conv2.conv.weight", "conv2.conv.bias"
    for epoch in (0, 1):
        w, b = states[epoch]["model"][key_w], states[epoch]["model"][key_b]
        assert torch.count_nonzero(w[mask]) == 0 and torch.count_nonzero(b[mask]) == 0
    assert not torch.equal(states[0]["model"][key_w][~mask], states[1]["model"][key_w][~mask])
    # Optimizer state of dropped filters is frozen during S2.
    opt0, opt1 = states[0]["optimizer"]["state"], states[1]["optimizer"]["state"]
    param_index = list(states[0]["model"]).index(key_w)
    assert torch.equal(opt0[param_index]["exp_avg"][mask], opt1[param_index]["exp_avg"][mask])
    # Re-introduced: non-zero, orthogonal to kept filters, Adam moments zeroed.
    w2 = states[2]["model"][key_w].flatten(1)
    assert w2[mask].norm(dim=1).min() > 0
    cos = F.normalize(w2[mask], dim=1) @ F.normalize(w2[~mask], dim=1).T
    assert cos.abs().max() < 1e-5
    opt2 = states[2]["optimizer"]["state"][param_index]
    assert (
        torch.count_nonzero(opt2["exp_avg"][mask]) == 0 and torch.count_nonzero(opt2["exp_avg_sq"][mask]) == 0
    )
    assert sink.results[0].reinit_fallbacks == 0


def test_repr_oracle_uses_the_held_out_split(digits):
    cfg = config(
        scheme={"name": "repr", "s1": 1, "s2": 2, "n_iter": 1, "drop_fraction": 0.5, "metric": "oracle"},
        model__filters=6,
        epochs=4,
        data__val_fraction=0.2,
    )
    data = load_data(cfg.data, 0, CPU)
    assert len(data.y_val) > 0
    sink = run(cfg, data)
    assert sink.epochs[1].flat()["dropped"] == 3


def test_repr_first_layer_falls_back_when_its_null_space_is_too_small(digits):
    cfg = config(
        scheme={
            "name": "repr",
            "s1": 1,
            "s2": 1,
            "n_iter": 1,
            "drop_fraction": 0.5,
            "include_first_layer": True,
        },
        model__filters=16,
        epochs=2,
    )
    sink = run(cfg, digits, keep_checkpoints=True)
    drop = [m[0] for m in sink.checkpoints[0][1]["scheme"]["drop"]]
    # 16 of 32 filters go, at most 15 from conv2, so conv1 loses some; its K = 1*4*4 = 16 = J leaves no
    # null space at all, while conv2 (K = 256) always has room: fallbacks are exactly conv1's drops.
    assert int(drop[0].sum()) >= 1
    assert sink.results[0].reinit_fallbacks == int(drop[0].sum())


def test_repr_with_batchnorm_masks_beta_and_resets_bn_state(digits):
    cfg = repr_config().model_copy(
        update={"model": repr_config().model.model_copy(update={"batchnorm": True})}
    )
    sink = run(cfg, digits, keep_checkpoints=True)
    states = dict(sink.checkpoints)
    mask = states[0]["scheme"]["drop"][1][0]
    assert torch.count_nonzero(states[1]["model"]["conv2.bn.bias"][mask]) == 0
    after = states[2]["model"]
    assert torch.equal(after["conv2.bn.weight"][mask], torch.ones(int(mask.sum())))
    assert torch.count_nonzero(after["conv2.bn.bias"][mask]) == 0
    assert torch.count_nonzero(after["conv2.bn.running_mean"][mask]) == 0
    assert torch.equal(after["conv2.bn.running_var"][mask], torch.ones(int(mask.sum())))


# --- determinism, seeds, resume, divergence ----------------------------------------------------------------


def test_same_seed_gives_bit_identical_metrics_and_traces(digits):
    cfg = config(scheme={"name": "randomout", "tau": 1e-3}, trace_every=5)
    a, b = run(cfg, digits), run(cfg, digits)

    def numbers(sink):
        return [
            {k: v for k, v in e.flat().items() if k != "wall_s"} | {"layers": e.layers} for e in sink.epochs
        ]

    assert numbers(a) == numbers(b)
    assert [r.final_test_acc for r in a.results] == [r.final_test_acc for r in b.results]
    for ta, tb in zip(a.traces, b.traces, strict=True):
        for key, col in ta.columns().items():
            assert (col == tb.columns()[key]).all(), key


def test_different_seeds_give_different_initial_weights():
    def initial(seed: int):
        init_seed, _ = derive_seeds(seed)
        return tiny_model(seed=init_seed).state_dict()

    a, b = initial(1), initial(2)
    for key in a:
        if key.endswith("weight"):
            assert not torch.equal(a[key], b[key]), key
    assert all(torch.equal(a[k], v) for k, v in initial(1).items())


@pytest.mark.parametrize(
    "scheme",
    [
        {"name": "randomout", "tau": 1e-3},
        {"name": "repr", "s1": 1, "s2": 1, "n_iter": 1, "drop_fraction": 0.3},
    ],
)
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(digits, scheme):
    cfg = config(scheme=scheme, epochs=4, model__filters=6)
    full = run(cfg, digits, keep_checkpoints=True)
    resumed = MemorySink()
    train(cfg, resumed, data=digits, resume=full.checkpoints[1][1])
    assert [e.test_acc for e in resumed.epochs] == [e.test_acc for e in full.epochs[2:]]
    assert resumed.results[0].final_test_acc == full.results[0].final_test_acc
    assert resumed.results[0].total_resets == full.results[0].total_resets
    # None after the last epoch; a trial stopped before its result trains that epoch again, identically.
    assert [epoch for epoch, _ in full.checkpoints] == [0, 1, 2]
    last = MemorySink()
    train(cfg, last, data=digits, resume=full.checkpoints[-1][1])
    assert last.results[0].final_test_acc == full.results[0].final_test_acc
    assert last.epochs[0].train_loss == full.epochs[-1].train_loss


def test_a_diverging_trial_is_recorded_as_failed(digits):
    sink = run(config(optim={"name": "sgd", "lr": 1e6}, epochs=5), digits)
    result = sink.results[0]
    assert result.diverged and result.failed
    assert result.epochs_done < 5
    assert "majority-class accuracy" in result.failure_rule


def test_failure_rule_uses_majority_share_plus_margin(digits):
    result = run(config(epochs=1, failure_margin=0.0), digits).results[0]
    majority = torch.bincount(digits.y_test).max().item() / len(digits.y_test)
    assert result.chance == pytest.approx(majority) and majority > 0.1  # the digits split is not balanced
    assert result.failed == (result.final_test_acc <= majority)
    assert f"majority-class accuracy {majority:.3f} + 0" in result.failure_rule


def test_trial_identity_hashes():
    base = config(seed=0)
    assert base.trial_key() != base.config_hash()
    assert base.with_seed(1).config_hash() == base.config_hash()
    assert base.with_seed(1).trial_key() != base.trial_key()
    other_scheme = config(seed=0, scheme={"name": "randomout"})
    assert other_scheme.pair_key() == base.pair_key() and other_scheme.config_hash() != base.config_hash()
    moved = base.model_copy(update={"device": "cpu"})
    assert moved.trial_key() == base.trial_key(), "where a trial runs is not what it is"
    # Pinned: renaming a field or changing a default silently renames every stored trial.
    assert TrialConfig().trial_key() == "753132226ff9573a"
