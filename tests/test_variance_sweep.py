"""Variance by source end to end: a real seed factorial through `lottery sweep` and `lottery aggregate`.

3 init x 3 order seeds x 2 replicates of a tiny net on digits: the table must attribute the spread to
real sources, find exactly no nondeterminism (CPU replicates are bit-identical), and carry the
test-set floor from the trials' per-example correctness.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
import specfactory
from typer.testing import CliRunner

from dashboards.sources import splits_seeds, variance_table
from orchestrator.aggregate import aggregate
from orchestrator.cli import app
from orchestrator.run.ray_session import ray_session
from orchestrator.run.sweep import run_sweep
from orchestrator.spec import load_plan
from trainers.correctness import decode, finite_test_set_sd

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with ray_session(None):
        yield


def test_a_seed_factorial_is_split_by_source(tmp_path, local_ray, monkeypatch):
    spec = specfactory.write_spec(
        tmp_path,
        "factorial",
        seeds={"init": [0, 1, 2], "order": [10, 11, 12], "replicates": 2},
        storage_path=str(tmp_path / "runs"),
        base=specfactory.BASE | {"epochs": 2},
    )
    plan = load_plan(spec)
    assert len(plan.trials) == 18
    outcome = run_sweep(plan, root=tmp_path)
    assert outcome.counts["finished"] == 18
    result = aggregate(outcome.sweep_dir)
    trials = result.trials
    assert trials["order_seed"].tolist().count(10) == 6 and set(trials["replicate"]) == {0, 1}
    assert len(result.summary) == 1 and int(result.summary["n"].iloc[0]) == 18  # one arm pools the cells

    table = result.variance.set_index("source")
    assert list(table.index) == ["init", "order", "augment", "interaction", "nondeterminism"]
    assert table.loc["nondeterminism", "variance"] == 0.0  # identical replicates, bit for bit
    assert (table.loc["init", "n_levels"], table.loc["order", "n_levels"]) == (3, 3)
    assert pd.isna(table.loc["augment", "variance"])  # not split: one level
    assert table["n_trials"].iloc[0] == 18
    # The components add up to the spread of the 9 distinct cells around their mean (the ANOVA
    # identity of a balanced design: total = init + order + interaction, by method of moments).
    acc = trials.pivot_table(index="seed", columns="order_seed", values="final_test_acc", aggfunc="first")
    y = acc.to_numpy()
    grand = y.mean()
    ms_init = 3 * ((y.mean(axis=1) - grand) ** 2).sum() / 2
    ms_order = 3 * ((y.mean(axis=0) - grand) ** 2).sum() / 2
    resid = y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + grand
    ms_inter = (resid**2).sum() / 4
    # With identical replicates r cancels: (MS_init - MS_interaction) / (levels of order), per cell means.
    assert table.loc["init", "variance"] == pytest.approx(max((ms_init - ms_inter) / 3, 0.0), abs=1e-12)
    assert table.loc["order", "variance"] == pytest.approx(max((ms_order - ms_inter) / 3, 0.0), abs=1e-12)
    assert table.loc["interaction", "variance"] == pytest.approx(ms_inter, abs=1e-12)
    # The test-set floor is computed from the trials' own per-example correctness.
    rows = [decode(c) for c in trials["test_correct"]]
    floor = 100 * finite_test_set_sd(rows)
    assert floor > 0 and table["test_floor_sd_pts"].iloc[0] == pytest.approx(floor)

    monkeypatch.setenv("LOTTERY_HOME", str(tmp_path / "runs"))
    printed = CliRunner().invoke(app, ["aggregate", str(outcome.sweep_dir)], env={"COLUMNS": "250"})
    assert printed.exit_code == 0, printed.output
    assert "Variance by source" in printed.output and "nondeterminism" in printed.output


def test_a_plain_sweep_has_no_variance_table():
    trials = pd.DataFrame(
        {
            "config_hash": ["a"] * 4,
            "scheme": ["baseline"] * 4,
            "hparam_label": [""] * 4,
            "status": ["finished"] * 4,
            "seed": [0, 1, 2, 3],
            "order_seed": pd.array([pd.NA] * 4, dtype="Int64"),
            "augment_seed": pd.array([pd.NA] * 4, dtype="Int64"),
            "replicate": pd.array([0] * 4, dtype="Int64"),
            "final_test_acc": np.linspace(0.5, 0.8, 4),
            "test_correct": [""] * 4,
        }
    )
    assert not splits_seeds(trials)
    assert variance_table(trials).empty
    split = trials.assign(order_seed=pd.array([1, 2, 1, 2], dtype="Int64"), seed=[0, 0, 1, 1])
    assert splits_seeds(split) and set(variance_table(split, n_boot=50)["source"]) >= {"init", "order"}
