"""Failures told apart (diverged, collapsed to the majority class, plain low accuracy), and paired rescues
and harms counted, against hand-built trials."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from sweepfactory import lottery_trials, write_sweep
from test_stats import _trial
from typer.testing import CliRunner

from dashboards.report import _summary_html
from dashboards.stats import failure_kind, summarise, trials_frame
from orchestrator import layout
from orchestrator.cli import app

NAN = math.nan


@pytest.fixture(scope="module")
def summary() -> pd.DataFrame:
    # Chance 0.10, margin 0.05 (test_stats): failed at <= 0.15.
    #   seed    baseline                 randomout
    #   1       0.70 ok                  0.09 collapsed  -> harmed
    #   2       0.10 collapsed           0.70 ok         -> rescued
    #   3       diverged                 0.70 ok         -> rescued (a diverged reference counts)
    #   4       0.13 low                 diverged        -> both failed: neither
    base = [(1, 0.70, False), (2, 0.10, False), (3, NAN, True), (4, 0.13, False)]
    arm = [(1, 0.09, False), (2, 0.70, False), (3, 0.70, False), (4, NAN, True)]
    rows = [_trial("A", "ctx", "baseline", s, a, diverged=d) for s, a, d in base]
    rows += [_trial("B", "ctx", "randomout", s, a, diverged=d, label="tau=1e-08 P=1") for s, a, d in arm]
    return summarise(trials_frame(rows)).set_index("config_hash")


def test_failure_kind_by_hand() -> None:
    assert failure_kind(False, False, 0.7, 0.1) == ""
    assert failure_kind(True, True, NAN, 0.1) == "diverged"
    assert failure_kind(True, False, 0.1, 0.1) == "collapsed"
    assert failure_kind(True, False, 0.09, 0.1) == "collapsed"
    assert failure_kind(True, False, 0.13, 0.1) == "low"


def test_kinds_rescues_and_harms_per_arm(summary: pd.DataFrame) -> None:
    a, b = summary.loc["A"], summary.loc["B"]
    assert (a.n_failed, a.n_diverged, a.n_collapsed, a.n_low) == (3, 1, 1, 1)
    assert (b.n_failed, b.n_diverged, b.n_collapsed, b.n_low) == (2, 1, 1, 0)
    assert (b.n_rescued, b.n_harmed) == (2, 1)
    assert b.rescue_harm_p == 1.0  # exact McNemar: P(|X - 1.5| >= 0.5) for X ~ Bin(3, 1/2) is 1
    assert (a.n_rescued, a.n_harmed) == (0, 0)  # the reference itself has nothing to be compared with
    assert math.isnan(a.rescue_harm_p)
    assert (
        b.n_pairs == 2
    )  # the gains pair only finite accuracies (seeds 1, 2); rescues count diverged pairs too


def test_the_cli_and_the_report_show_them(summary: pd.DataFrame, tmp_path: Path, monkeypatch) -> None:
    page = _summary_html(summary.reset_index())
    assert "<th>diverged / collapsed / low</th>" in page and "<td>1 / 1 / 0</td>" in page
    assert "<th>rescued / harmed</th>" in page and "<td>2 / 1 (p = 1)</td>" in page
    arms = [("baseline", {}), ("randomout", {"tau": 1e-8, "active_fraction": 1.0})]
    sweep = write_sweep(tmp_path, "kinds", lottery_trials(arms, seeds=range(10), fail_rate=0.4))
    monkeypatch.setenv("LOTTERY_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "300")
    done = CliRunner().invoke(app, ["aggregate", "kinds"])
    assert done.exit_code == 0, done.output
    stored = pd.read_parquet(layout.aggregate_table(sweep, "summary")).set_index("scheme")
    base, randomout = stored.loc["baseline"], stored.loc["randomout"]
    assert base.n_failed > 0 and base.n_low == base.n_failed  # the factory's failures sit just above chance
    lines = done.output.splitlines()
    base_row = next(line for line in lines if line.startswith("│ baseline"))
    assert f" {base.n_diverged}/{base.n_collapsed}/{base.n_low} " in base_row
    ro_row = next(line for line in lines if line.startswith("│ randomout"))
    assert f" {randomout.n_rescued}/{randomout.n_harmed}" in ro_row
    if randomout.n_rescued + randomout.n_harmed:
        assert f"(p={randomout.rescue_harm_p:.2g})" in " ".join(done.output.split())
    text = " ".join(done.output.split())
    assert "collapsed" in text and "only the reference failed / only this arm failed" in text


def test_rescues_against_harms_by_hand() -> None:
    from dashboards.stats import rescue_harm_p

    assert rescue_harm_p(6, 0) == 2 / 2**6  # all six discordant pairs one way: 2 x (1/2)^6
    assert rescue_harm_p(5, 1) == 2 * (1 + 6) / 2**6
    assert rescue_harm_p(3, 3) == 1.0 and math.isnan(rescue_harm_p(0, 0))
