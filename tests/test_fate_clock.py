"""The fate clock: children share their parent's first steps bit for bit, then draw their own batches;
the table and the instability are checked by hand on small cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import trainers.loop as loop
from dashboards.fate import fate_table
from orchestrator.errors import UserError
from orchestrator.spec import load_plan
from trainers.config import ForkConfig, TrialConfig
from trainers.data import load_data
from trainers.events import MemorySink
from trainers.fork import child_stream_seeds, fork_step
from trainers.instability import instability, path_errors

CPU = torch.device("cpu")


def trial(**fields: object) -> TrialConfig:
    """A tiny crater_cnn on 40 synthetic images: 32 train, two steps of 16 per epoch, 4 epochs (8 steps)."""
    doc = {
        "data": {"name": "synthetic", "synthetic_samples": 40},
        "model": {"name": "crater_cnn", "filters": 2, "hidden_fc": 0, "init": "xavier"},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "epochs": 4,
        "batch_size": 16,
        "device": "cpu",
    }
    return TrialConfig.model_validate(doc | fields)


def child(at: float, index: int = 1, **fields: object) -> TrialConfig:
    return trial(fork={"at": at, "child": index}, **fields)


@pytest.fixture(scope="module")
def data():
    return load_data(trial().data, 0, CPU)


def run(cfg: TrialConfig, data, **kwargs) -> MemorySink:
    sink = MemorySink(keep_checkpoints=True)
    loop.train(cfg, sink, data=data, **kwargs)
    return sink


def losses(sink: MemorySink) -> list[float]:
    return [e.train_loss for e in sink.epochs]


def test_the_fork_step_is_the_fraction_of_the_trials_steps(data):
    assert fork_step(trial(), 32, 16) is None
    assert [fork_step(child(at), 32, 16) for at in (0, 0.25, 0.375, 0.5)] == [0, 2, 3, 4]


def test_a_child_is_its_parent_until_the_fork_and_not_after(data):
    parent = losses(run(trial(), data))
    at_epoch_2 = losses(run(child(0.5), data))  # step 4: the first step of epoch 2
    assert at_epoch_2[:2] == parent[:2]  # bit for bit
    assert at_epoch_2[2] != parent[2] and at_epoch_2[3] != parent[3]
    # Mid-epoch: batches of 8 (4 steps per epoch); step 6 is halfway through epoch 1, and the two
    # batches left of it are drawn anew (with one batch left, the same examples would stay together).
    small = losses(run(trial(batch_size=8), data))
    mid_epoch_1 = losses(run(child(0.375, batch_size=8), data))
    assert mid_epoch_1[0] == small[0] and mid_epoch_1[1] != small[1]
    at_start = losses(run(child(0.0), data))  # its own batches from the first step: only the init is shared
    assert at_start[0] != parent[0]


def test_siblings_differ_and_each_child_is_reproducible(data):
    first, second = run(child(0.5, 1), data), run(child(0.5, 2), data)
    assert losses(first)[:2] == losses(second)[:2] and losses(first)[2:] != losses(second)[2:]
    assert losses(run(child(0.5, 1), data)) == losses(first)
    assert child_stream_seeds(child(0.5, 1)) != child_stream_seeds(child(0.5, 2))
    assert child_stream_seeds(child(0.5, 1)) == child_stream_seeds(child(0.2, 1))


def test_a_child_keeps_its_weights_and_a_pack_of_children_equals_each_alone(data):
    cfg = child(0.5, 1)
    packed = run(cfg, data, seeds=[0, 1, 2], pack_size=3)
    assert sorted(packed.weights) == [0, 1, 2]
    for seed in (0, 1, 2):
        alone = run(cfg.with_seed(seed), data)
        assert losses(alone) == pytest.approx(
            [e.train_loss for e in packed.epochs if e.seed == seed], abs=1e-6
        )
        for name, tensor in alone.weights[seed].items():
            assert torch.allclose(tensor, packed.weights[seed][name], atol=1e-6), name
    assert not run(trial(), data).weights  # a parent keeps none


def test_a_child_resumed_after_its_fork_ends_as_the_uninterrupted_one(data):
    cfg = child(0.375, 2, augment_seed=None)
    full = run(cfg, data)
    resumed = MemorySink()
    loop.train(cfg, resumed, data=data, resume=full.checkpoints[1][1])  # after epoch 1: past the fork
    assert losses(resumed) == losses(full)[2:]
    before = MemorySink()
    loop.train(cfg, before, data=data, resume=full.checkpoints[0][1])  # after epoch 0: before it
    assert losses(before) == losses(full)[1:]


def test_the_path_between_two_children_by_hand(data):
    first, second = run(child(0.5, 1), data), run(child(0.5, 2), data)
    cfg = child(0.5, 1)
    a, b = first.weights[0], second.weights[0]
    errors = path_errors(cfg, a, b, data)
    assert len(errors) == 11
    assert errors[0] == pytest.approx(1 - first.results[0].final_test_acc)  # the ends are the children
    assert errors[-1] == pytest.approx(1 - second.results[0].final_test_acc)
    assert instability(errors) == pytest.approx(max(errors) - (errors[0] + errors[-1]) / 2)
    assert instability(path_errors(cfg, a, a, data)) == 0.0  # one net: no barrier
    assert instability([0.1, 0.3, 0.2]) == pytest.approx(0.15)


def test_schemes_without_a_weight_path_cannot_fork():
    with pytest.raises(ValueError, match="fork: scheme imp cannot fork"):
        trial(scheme={"name": "imp", "rounds": 1}, fork={"at": 0.5, "child": 1})


# --- the table, by hand -----------------------------------------------------------------------------


def frame(rows: list[tuple]) -> pd.DataFrame:
    """(seed, fork_at, fork_child, failed, acc) rows of one baseline arm."""
    out = pd.DataFrame(rows, columns=["seed", "fork_at", "fork_child", "failed", "final_test_acc"])
    return out.assign(
        config_hash="arm",
        scheme="baseline",
        hparam_label="",
        status="finished",
        order_seed=pd.array([pd.NA] * len(out), dtype="Int64"),
        augment_seed=pd.array([pd.NA] * len(out), dtype="Int64"),
        replicate=pd.array([0] * len(out), dtype="Int64"),
    )


def test_the_fate_table_by_hand():
    parents = frame(
        [(0, np.nan, pd.NA, True, 0.10), (1, np.nan, pd.NA, False, 0.90), (2, np.nan, pd.NA, False, 0.80)]
    )
    children = frame(
        [
            (0, 0.2, 1, True, 0.10),  # parent 0 failed: its children fail, fail, and one does not
            (0, 0.2, 2, True, 0.12),
            (0, 0.2, 3, False, 0.70),
            (1, 0.2, 1, False, 0.90),  # parent 1: all fine
            (1, 0.2, 2, False, 0.92),
            (1, 0.2, 3, False, 0.88),
            (2, 0.2, 1, False, 0.80),  # parent 2: a lone finished child counts for nothing
        ]
    )
    barriers = pd.DataFrame(
        {
            "config_hash": ["arm", "arm"],
            "seed": [0, 1],
            "order_seed": [pd.NA] * 2,
            "augment_seed": [pd.NA] * 2,
        }
        | {"replicate": [0, 0], "fork_at": [0.2, 0.2], "instability": [0.30, 0.02]}
    )
    (row,) = fate_table(parents, children, barriers).itertuples(index=False)
    assert (row.n_parents, row.n_children, row.n_parents_failed) == (2, 6, 1)
    assert row.unanimous == 0.5  # parent 1's children agree, parent 0's do not
    assert row.p_fail_after_failed == pytest.approx(2 / 3) and row.p_fail_after_ok == 0.0
    assert row.p_fail_after_failed_low < 2 / 3 < row.p_fail_after_failed_high
    deviations = np.array([0.10, 0.12, 0.70]) - np.mean([0.10, 0.12, 0.70])
    deviations = np.concatenate([deviations, np.array([0.90, 0.92, 0.88]) - 0.90])
    assert row.child_sd_pts == pytest.approx(100 * np.sqrt((deviations**2).sum() / (6 - 2)))
    assert row.parent_sd_pts == pytest.approx(100 * np.std([0.10, 0.90], ddof=1))
    assert (row.n_barriers, row.instability_median_pts, row.instability_max_pts) == (
        2,
        pytest.approx(16.0),
        30.0,
    )


# --- the spec -------------------------------------------------------------------------------------


def spec(tmp_path: Path, **fields: object) -> Path:
    doc = {
        "name": "forked",
        "base": {"data": {"name": "synthetic", "synthetic_samples": 40}, "epochs": 2, "device": "cpu"}
        | {"model": {"name": "crater_cnn", "filters": 2, "hidden_fc": 0}},
        "seeds": [0, 1, 2],
        "schemes": [{"name": "baseline"}, {"name": "randomout"}],
        "fork": {"at": [0.2, 0], "children": 2},
        "pack_size": 3,
    } | fields
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_fork_plans_each_parent_and_its_children(tmp_path):
    plan = load_plan(spec(tmp_path))
    assert len(plan.trials) == 2 * 3 * (1 + 2 * 2)
    forks = [t.fork for t in plan.trials if t.fork is not None]
    assert sorted({f.at for f in forks}) == [0.0, 0.2] and {f.child for f in forks} == {1, 2}
    assert plan.trials[0].fork is None and plan.trials[3].fork == ForkConfig(at=0.0, child=1)  # sorted
    assert len({t.config_hash() for t in plan.trials}) == 2  # children belong to their parent's arm
    for unit in plan.units:  # a pack holds one fork point's same child of several parents
        members = [plan.trials[i] for i in unit]
        assert len(members) == 3 and len({(m.fork, m.scheme.name) for m in members}) == 1
    assert {r["fork_at"] for r in plan.rows()} == {None, 0.0, 0.2}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"fork": {"at": [1.0]}}, "fork.at: .*1.0 is not a fraction of training"),
        ({"fork": {"at": [0.1, 0.1]}}, "a fraction is listed twice"),
        ({"fork": {"at": [0.1], "children": 1}}, "fork.children"),
        ({"schemes": [{"name": "imp", "params": {"rounds": 1}}]}, "fork: scheme imp cannot fork"),
    ],
)
def test_a_malformed_fork_is_one_line(tmp_path, fields, message):
    with pytest.raises(UserError, match=message) as caught:
        load_plan(spec(tmp_path, **fields))
    assert "\n" not in str(caught.value)


def test_the_printed_fate_clock_names_its_columns_and_numbers():
    from rich.console import Console

    from orchestrator.fate import format_fate_table

    parents = frame([(0, np.nan, pd.NA, True, 0.10), (1, np.nan, pd.NA, False, 0.90)])
    children = frame(
        [(0, 0.2, 1, True, 0.10), (0, 0.2, 2, True, 0.12), (1, 0.2, 1, False, 0.9), (1, 0.2, 2, True, 0.1)]
    )
    console = Console(record=True, width=250)
    console.print(format_fate_table(fate_table(parents, children)))
    text = console.export_text()
    assert "Fate clock" in text and "unanimous %" in text and "instability" in text
    row = next(line for line in text.splitlines() if "baseline" in line)
    assert "0.2" in row and "2 (1)" in row and "100 [34, 100]" in row and " 50 " in row


def test_the_fate_table_recovers_a_simulated_clock():
    """Known truth: before the fork at 0.2 a child's outcome is a fresh coin (P(fail) = 0.3 whatever its
    parent did); from 0.2 on it is its parent's. The table must find the base rate, then the parent."""
    rng = np.random.default_rng(1)
    n, p = 400, 0.3
    parent_failed = rng.random(n) < p
    parents = frame([(s, np.nan, pd.NA, bool(f), 0.1 if f else 0.9) for s, f in enumerate(parent_failed)])
    rows = []
    for s, failed in enumerate(parent_failed):
        for c in (1, 2):
            early = bool(rng.random() < p)
            rows.append((s, 0.0, c, early, 0.1 if early else 0.9))
            rows.append((s, 0.2, c, bool(failed), 0.1 if failed else 0.9))
    table = fate_table(parents, frame(rows)).set_index("fork_at")
    early, late = table.loc[0.0], table.loc[0.2]
    for rate in ("p_fail_after_failed", "p_fail_after_ok"):  # the base rate inside both intervals
        assert early[f"{rate}_low"] < p < early[f"{rate}_high"]
    assert early.unanimous == pytest.approx(1 - 2 * p * (1 - p), abs=0.06)  # two fair-ish coins agree
    assert (late.p_fail_after_failed, late.p_fail_after_ok, late.unanimous) == (1.0, 0.0, 1.0)
    assert early.child_sd_pts > 20 and late.child_sd_pts == 0.0 and late.parent_sd_pts > 30
