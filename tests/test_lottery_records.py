"""IMP's rounds reach the trial directory, the MLflow metric series and the aggregated rounds table."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from trialfactory import config

from dashboards.rounds import ROUND_COLUMNS, round_summary
from orchestrator import layout
from orchestrator.run.trial import run_trial
from orchestrator.tracking.runs import _epoch_metrics


def test_imp_rounds_are_columns_of_metrics_parquet_and_one_mlflow_series_each(tmp_path):
    torch.set_num_threads(1)
    cfg = config(scheme={"name": "imp", "rounds": 2, "rate": 0.5}, epochs=1, model__filters=2)
    result = run_trial(cfg, tmp_path / "t", sweep="s")
    frame = pd.read_parquet(tmp_path / "t" / layout.METRICS)
    assert list(frame["round"]) == [0, 1, 2] and frame["round_end"].all()
    assert list(frame["sparsity"]) == pytest.approx([0.0, 0.5, 0.75], abs=1e-3)
    assert result["sparsity"] == pytest.approx(frame["sparsity"].iloc[-1])
    assert result["final_test_acc"] == frame["test_acc"].iloc[-1]
    metrics = _epoch_metrics(tmp_path / "t", 0)
    series = {
        name: [(m.step, m.value) for m in metrics if m.key == name]
        for name in ("round_test_acc", "round_sparsity", "round_mask_overlap")
    }
    assert series["round_test_acc"] == [(r, a) for r, a in enumerate(frame["test_acc"])]
    assert [v for _, v in series["round_sparsity"]] == pytest.approx(list(frame["sparsity"]))
    assert math.isnan(series["round_mask_overlap"][0][1]) and series["round_mask_overlap"][1][1] > 0


def _rows(config_hash: str, scheme: str, accs: dict[int, list[float]]) -> list[dict]:
    return [
        {
            "config_hash": config_hash,
            "scheme": scheme,
            "hparam_label": "",
            "seed": seed,
            "status": "finished",
            "round": r,
            "round_end": True,
            "sparsity": 1 - 0.5**r,
            "test_acc": acc,
        }
        for r, values in accs.items()
        for seed, acc in enumerate(values)
    ]


def test_round_summary_pairs_the_control_with_the_rewound_arm_by_seed_and_round():
    epochs = pd.DataFrame(
        _rows("rew", "imp", {0: [0.9, 0.8, 0.7], 1: [0.85, 0.80, 0.75]})
        + _rows("ctl", "imp", {0: [0.9, 0.8, 0.7], 1: [0.80, 0.70, 0.80]})
    )
    trials = pd.DataFrame(
        {
            "config_hash": ["rew", "ctl"],
            "reference_hash": [None, "rew"],
            "scheme": ["imp", "imp"],
            "hparam_label": ["", "reinit=True"],
        }
    )
    frame = round_summary(trials, epochs)
    assert {c: str(t) for c, t in frame.dtypes.items()} == ROUND_COLUMNS
    table = frame.set_index(["config_hash", "round"])
    assert table.loc[("ctl", 0), "gain_median"] == 0.0  # round 0 is the same dense net
    # round 1: .80-.85, .70-.80, .80-.75 -> -.05, -.10, +.05
    assert table.loc[("ctl", 1), "gain_median"] == pytest.approx(-0.05)
    assert table.loc[("ctl", 1), "share_improved"] == pytest.approx(1 / 3)
    assert table.loc[("ctl", 1), "reference"] == "imp"
    assert table.loc[("rew", 1), "n_pairs"] == 0 and table.loc[("rew", 1), "sparsity"] == 0.5
