"""An arm of a scheme that acts only by resets, and never reset, is said to have had no chance to act."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from sweepfactory import lottery_trials, write_sweep
from test_stats import _trial
from typer.testing import CliRunner

from dashboards.report import _never_acted_html
from dashboards.stats import never_acted, summarise, trials_frame
from orchestrator import layout
from orchestrator.cli import app
from orchestrator.tracking.study import study_note
from trainers.config import RESETTING_SCHEMES


def _summary(resets: dict[str, list[int]]) -> pd.DataFrame:
    rows = []
    for config, counts in resets.items():
        scheme = "baseline" if config == "base" else "randomout"
        for seed, count in enumerate(counts):
            rows.append(
                _trial(config, "ctx", scheme, seed, 0.7, label="tau=1e-08 P=1") | {"total_resets": count}
            )
    return summarise(trials_frame(rows)).set_index("config_hash")


def test_resets_per_arm_and_the_arm_that_never_acted() -> None:
    # RePr also drops filters: its reset count misses that
    assert RESETTING_SCHEMES == ("randomout", "redo", "cbp")
    summary = _summary({"base": [0, 0, 0], "quiet": [0, 0, 0], "busy": [0, 2, 7]})
    assert summary.loc["busy", "n_reset"] == 2 and summary.loc["busy", "resets_median"] == 2
    assert summary.loc["quiet", "n_reset"] == 0
    [line] = never_acted(summary.reset_index())
    assert line.startswith("randomout tau=1e-08 P=1 never reset a filter in 3 finished trial(s)")
    assert "gains are 0 by construction" in line  # the baseline (0 resets, no scheme) is not named


def test_lottery_aggregate_says_when_randomout_never_reset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arms = [("baseline", {}), ("randomout", {"tau": 1e-12, "active_fraction": 1.0})]
    sweep = write_sweep(tmp_path, "quiet", lottery_trials(arms, seeds=range(4)))
    for trial_dir in (sweep / layout.TRIALS).iterdir():
        result = json.loads((trial_dir / layout.RESULT).read_text())
        (trial_dir / layout.RESULT).write_text(json.dumps(result | {"total_resets": 0}))
    monkeypatch.setenv("LOTTERY_HOME", str(tmp_path))
    done = CliRunner().invoke(app, ["aggregate", "quiet"])
    assert done.exit_code == 0, done.output
    text = " ".join(done.output.split())
    assert (
        "randomout tau=1e-12 P=1 never reset a filter in 4 finished trial(s): its gains are 0 by construction"
        in text
    )


def test_the_report_and_the_parent_note_say_it_too(tmp_path: Path) -> None:
    summary = _summary({"base": [0, 0, 0], "quiet": [0, 0, 0]}).reset_index()
    [line] = never_acted(summary)
    assert f"<p class=note>{line}</p>" in _never_acted_html(summary)
    table = pd.DataFrame({"arm": ["baseline", "randomout"]})
    stamp = {"summary.trials": "6", "summary.at": "now", "summary.fingerprint": "f"}
    assert f"**Note**: {line}" in study_note("q", summary, table, stamp, "link")
