"""Dead filters per trial (mean CGN over its last epoch below tau) and per arm in `lottery aggregate`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sweepfactory import FakeTrial, identity, write_sweep
from typer.testing import CliRunner

from orchestrator import layout
from orchestrator.aggregate import aggregate
from orchestrator.cli import app

# Dead filters in each trial's last epoch (earlier epochs get other counts, which must not matter).
BASELINE_DEAD = {0: 0, 1: 2, 2: 0, 3: 5}
RANDOMOUT_DEAD = {0: 0, 1: 0, 2: 1, 3: 0}


def _sweep(tmp_path: Path) -> Path:
    trials = [FakeTrial("baseline", s, 0.7) for s in BASELINE_DEAD]
    trials += [FakeTrial("randomout", s, 0.7, hparams={"tau": 1e-3}) for s in RANDOMOUT_DEAD]
    trials += [FakeTrial("baseline", 9, 0.7, status="pending")]
    sweep = write_sweep(tmp_path, "dying", trials)
    for t in trials[:-1]:
        path = sweep / layout.TRIALS / identity(t)["trial_key"] / layout.METRICS
        metrics = pq.read_table(path)
        last = (BASELINE_DEAD if t.scheme == "baseline" else RANDOMOUT_DEAD)[t.seed]
        dead = [9] * (metrics.num_rows - 1) + [last]
        pq.write_table(
            metrics.set_column(metrics.schema.get_field_index("dead"), "dead", pa.array(dead)), path
        )
    return sweep


def test_each_trial_counts_its_last_epochs_dead_filters_and_each_arm_sums_them_up(tmp_path: Path) -> None:
    result = aggregate(_sweep(tmp_path))
    trials = result.trials.set_index(["scheme", "seed"])
    for scheme, dead in (("baseline", BASELINE_DEAD), ("randomout", RANDOMOUT_DEAD)):
        assert [int(trials.loc[(scheme, s), "dead_filters"]) for s in dead] == list(dead.values())
    assert pd.isna(trials.loc[("baseline", 9), "dead_filters"])  # pending: not recorded
    summary = result.summary.set_index("scheme")
    assert summary.loc["baseline", ["dead_median", "dead_max", "n_dead"]].tolist() == [1.0, 5.0, 2]
    assert summary.loc["randomout", ["dead_median", "dead_max", "n_dead"]].tolist() == [0.0, 1.0, 1]


def test_lottery_aggregate_shows_dead_filters_per_arm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _sweep(tmp_path)
    monkeypatch.setenv("LOTTERY_HOME", str(tmp_path))
    done = CliRunner().invoke(app, ["aggregate", "dying"])
    assert done.exit_code == 0, done.output
    text = " ".join(done.output.split())
    assert "1/5 (2)" in text and "0/1 (1)" in text  # median/max (trials with one), per arm
    assert "dead filters: per trial, those whose mean CGN over the last epoch is below tau" in text
