"""Decision-grade comparisons against hand computations and known-truth simulations."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from sweepfactory import lottery_trials, write_sweep
from test_stats import BASE_ACC, GAINS_B, _trial
from typer.testing import CliRunner

from dashboards.decision import (
    BEST_OF,
    DECISION_COLUMNS,
    PROFILE_COLUMNS,
    best_of_inflation,
    decide,
    expected_best_of,
    failure_profile,
    interquartile_mean,
    probability_of_improvement_paired,
    probability_of_improvement_unpaired,
    profiles,
    stratified_bootstrap_iqm,
)
from dashboards.figures import all_figures
from dashboards.report import build_report
from dashboards.stats import trials_frame, wilson_interval
from orchestrator import layout
from orchestrator.aggregate import aggregate, read_aggregate
from orchestrator.cli import app


def test_interquartile_mean_by_hand() -> None:
    # 8 values: 2 trimmed from each end, the mean of 0.3, 0.4, 0.5, 0.6 is 0.45.
    assert interquartile_mean(np.array([0.8, 0.1, 0.7, 0.2, 0.6, 0.3, 0.5, 0.4])) == pytest.approx(0.45)
    # A failed seed at 0.10 drags the mean (0.61) but not the IQM (mean of 0.70, 0.71, 0.72, 0.73).
    x = np.array([0.10, 0.70, 0.71, 0.72, 0.73, 0.74, 0.69, 0.75])
    assert x.mean() == pytest.approx(0.6425)
    assert interquartile_mean(x) == pytest.approx((0.70 + 0.71 + 0.72 + 0.73) / 4)


def test_the_bootstrap_resamples_within_strata() -> None:
    # Two strata of three: every stratified resample holds three 0s and three 1s, so its IQM is
    # the mean of (0, 0, 1, 1) = 0.5 and the interval has no width; a plain bootstrap would vary.
    values, strata = np.array([0.0, 0, 0, 1, 1, 1]), np.array(["a", "a", "a", "b", "b", "b"])
    assert stratified_bootstrap_iqm(values, strata) == (0.5, 0.5)
    low, high = stratified_bootstrap_iqm(values)
    assert low < 0.5 < high


def test_probability_of_improvement_paired_by_hand() -> None:
    # Gains +0.1, 0 (a tie: one half), -0.2, +0.3: (1 + 0.5 + 0 + 1) / 4 = 0.625.
    point, low, high = probability_of_improvement_paired(np.array([0.1, 0.0, -0.2, 0.3]))
    assert point == pytest.approx(0.625)
    assert 0 <= low <= point <= high <= 1


def test_probability_of_improvement_unpaired_by_hand_and_as_mann_whitney() -> None:
    # x = 1, 2, 3 against y = 2, 2: 1 loses twice, 2 ties twice (2 x 0.5), 3 wins twice: 3 / 6.
    assert probability_of_improvement_unpaired(np.array([1.0, 2, 3]), np.array([2.0, 2]))[0] == 0.5
    rng = np.random.default_rng(3)
    x, y = rng.normal(0.3, 1, 40).round(1), rng.normal(0, 1, 30).round(1)  # rounded: ties happen
    u = scipy.stats.mannwhitneyu(x, y).statistic
    assert probability_of_improvement_unpaired(x, y)[0] == pytest.approx(u / (40 * 30))


def test_expected_best_of_n_by_hand_and_by_enumeration() -> None:
    # 1, 2, 3, 4 and N = 2: the six pairs' maxima are 2, 3, 4, 3, 4, 4 -> 20 / 6; the median is 2.5.
    x = np.array([4.0, 1, 3, 2])
    assert expected_best_of(x, 2) == pytest.approx(20 / 6)
    assert best_of_inflation(x, 2) == pytest.approx(20 / 6 - 2.5)
    assert expected_best_of(x, 1) == pytest.approx(x.mean())
    assert expected_best_of(x, 4) == 4.0
    assert math.isnan(expected_best_of(x, 5))
    y = np.random.default_rng(0).random(9)
    for n in (2, 3, 5):
        brute = np.mean([max(c) for c in itertools.combinations(y, n)])
        assert expected_best_of(y, n) == pytest.approx(brute)


def test_known_truth_simulation() -> None:
    rng = np.random.default_rng(11)
    # Paired seeds, gain ~ N(0.5, 1): P(gain > 0) = Phi(0.5) = 0.6915 (standard error 0.0073 at n 4000).
    point, _, _ = probability_of_improvement_paired(rng.normal(0.5, 1, 4000))
    assert point == pytest.approx(scipy.stats.norm.cdf(0.5), abs=0.03)
    # Independent arms N(0.5, 1) vs N(0, 1): P(X > Y) = Phi(0.5 / sqrt 2) = 0.638.
    truth = scipy.stats.norm.cdf(0.5 / math.sqrt(2))
    point, _, _ = probability_of_improvement_unpaired(rng.normal(0.5, 1, 600), rng.normal(0, 1, 600))
    assert point == pytest.approx(truth, abs=0.05)
    # The expected best of 5 standard normals is 1.16296; the median is 0.
    assert best_of_inflation(rng.normal(0, 1, 20000), 5) == pytest.approx(1.16296, abs=0.03)


def test_the_intervals_cover_the_truth_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(5)
    paired_truth, unpaired_truth = scipy.stats.norm.cdf(0.5), scipy.stats.norm.cdf(0.5 / math.sqrt(2))
    paired = [probability_of_improvement_paired(rng.normal(0.5, 1, 60), seed=i) for i in range(200)]
    unpaired = [
        probability_of_improvement_unpaired(rng.normal(0.5, 1, 40), rng.normal(0, 1, 40), seed=i)
        for i in range(100)
    ]
    # Binomial noise of 200 (100) looks at 95 %: 1.5 (2.2) points; percentile intervals run a little
    # narrow at small n, so the band is 0.88-0.99.
    assert 0.88 <= np.mean([low <= paired_truth <= high for _, low, high in paired]) <= 0.99
    assert 0.88 <= np.mean([low <= unpaired_truth <= high for _, low, high in unpaired]) <= 0.99


def test_failure_profile_by_hand() -> None:
    profile = failure_profile(np.array([0.1, 0.5, 0.9]), np.array([0.0, 0.5, 0.95]))
    assert profile["share_above"].tolist() == pytest.approx([1, 1 / 3, 0])  # "above" is strict
    assert (profile["ci_low"].iloc[1], profile["ci_high"].iloc[1]) == pytest.approx(wilson_interval(1, 3))


@pytest.fixture(scope="module")
def trials() -> pd.DataFrame:
    rows = [_trial("A", "ctx8", "baseline", s, a) for s, a in enumerate(BASE_ACC, start=1)]
    rows.append(_trial("A", "ctx8", "baseline", 11, status="errored"))
    rows += [
        _trial("B", "ctx8", "randomout", s, a + g, label="tau=1e-08 P=1")
        for s, (a, g) in enumerate(zip(BASE_ACC, GAINS_B, strict=True), start=1)
    ]
    rows += [_trial("D", "ctx16", "randomout", s, 0.8, filters=16) for s in (1, 2, 3)]  # no baseline
    return trials_frame(rows)


def test_decide_pairs_by_seed_and_states_the_reference(trials: pd.DataFrame) -> None:
    table = decide(trials).set_index("config_hash")
    assert list(decide(trials).columns) == list(DECISION_COLUMNS)
    # The baseline: n counts finished trials only (the errored seed 11 is out); no reference.
    assert table.loc["A", "n"] == 10 and table.loc["A", "reference"] == ""
    assert math.isnan(table.loc["A", "p_improve"])
    assert table.loc["A", "iqm"] == pytest.approx(scipy.stats.trim_mean(BASE_ACC, 0.25))
    # B against the baseline, paired by seed: 7 gains > 0, one 0.00 (a half), 2 < 0 -> 7.5 / 10.
    assert table.loc["B", "reference"] == "baseline" and bool(table.loc["B", "improve_paired"])
    assert table.loc["B", "improve_n"] == 10
    assert table.loc["B", "p_improve"] == pytest.approx(0.75)
    b_acc = np.array(BASE_ACC) + np.array(GAINS_B)
    assert table.loc["B", "best_of_5"] == pytest.approx(expected_best_of(b_acc, 5) - np.median(b_acc))
    assert math.isnan(table.loc["B", f"best_of_{max(BEST_OF)}"]) is (len(b_acc) < max(BEST_OF))
    # D has no baseline at its width: nothing to compare with, said as NaN and 0 pairs.
    assert table.loc["D", "improve_n"] == 0 and math.isnan(table.loc["D", "p_improve"])
    assert table.loc["D", "best_of_1"] == pytest.approx(0.0)


def test_profiles_cover_every_arm_on_one_grid(trials: pd.DataFrame) -> None:
    frame = profiles(trials, points=11)
    assert list(frame.columns) == list(PROFILE_COLUMNS)
    assert frame.groupby("config_hash").size().to_dict() == {"A": 11, "B": 11, "D": 11}
    d = frame.loc[frame["config_hash"] == "D", "share_above"].to_numpy()
    assert d[7] == 1.0 and d[8] == 0.0  # thresholds 0.7 and 0.8: every D seed sits at 0.8; "above" is strict


def test_lottery_aggregate_prints_and_stores_the_decision_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arms = [("baseline", {}), ("randomout", {"tau": 1e-8, "active_fraction": 1.0})]
    sweep = write_sweep(tmp_path, "decide", lottery_trials(arms, seeds=range(12)))
    monkeypatch.setenv("LOTTERY_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "250")
    done = CliRunner().invoke(app, ["aggregate", "decide"])
    assert done.exit_code == 0, done.output
    stored = pd.read_parquet(layout.aggregate_table(sweep, "decision"))
    trials = read_aggregate(sweep).trials
    pd.testing.assert_frame_equal(stored, decide(trials))
    randomout = stored.set_index("scheme").loc["randomout"]
    assert randomout["improve_n"] == 12 and randomout["reference"] == "baseline"
    text = " ".join(done.output.split())
    assert "Decision-grade comparisons" in text
    iqm, low, high = (100 * randomout[c] for c in ("iqm", "iqm_ci_low", "iqm_ci_high"))
    iqm = f"{iqm:.1f} [{low:.1f}, {high:.1f}]"
    assert iqm in text and f"{randomout['p_improve']:.2f} [" in text and "12 paired" in text
    # A sweep aggregated before the decision table existed: read back, the table is derived.
    layout.aggregate_table(sweep, "decision").unlink()
    pd.testing.assert_frame_equal(read_aggregate(sweep).decision, stored)


def test_the_report_shows_the_decision_table_and_the_failure_profile(tmp_path: Path) -> None:
    arms = [("baseline", {}), ("randomout", {"tau": 1e-8, "active_fraction": 1.0})]
    sweep = write_sweep(tmp_path, "decide", lottery_trials(arms, seeds=range(12), fail_rate=0.3))
    tables = aggregate(sweep)
    page = build_report(
        tables.trials,
        tables.epochs,
        tables.summary,
        tmp_path / "report",
        name="decide",
        decision=tables.decision,
    ).read_text()
    table = page[
        page.index("<table id=decision>") : page.index("</table>", page.index("<table id=decision>"))
    ]
    for r in tables.decision.itertuples(index=False):
        assert f"{100 * r.iqm:.1f} [{100 * r.iqm_ci_low:.1f}, {100 * r.iqm_ci_high:.1f}]" in table
    randomout = tables.decision.set_index("scheme").loc["randomout"]
    assert (
        f"{randomout['p_improve']:.2f} [{randomout['p_improve_ci_low']:.2f}, " in table
        and "12 paired" in table
    )
    # The failure profile: one line per arm with its n, a Wilson band, the threshold stated.
    profile = next(
        r for r in all_figures(tables.trials, tables.epochs, tables.summary) if r.name == "failure_profile"
    )
    assert profile.figure is not None and "pointwise Wilson 95% CI" in profile.caption
    [ax] = profile.figure.get_axes()
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == [
        "baseline (n=12)",
        "randomout tau=1e-08 P=1 (n=12)",
    ]
    assert len(ax.collections) == 2  # a band per arm
    base = tables.trials.query("scheme == 'baseline'")["final_test_acc"].to_numpy()
    threshold = 0.1 + 0.05  # the factory's chance and margin
    x, y = ax.get_lines()[0].get_data()
    at = np.searchsorted(x, 100 * threshold, side="right") - 1
    assert y[at] == pytest.approx(100 * (base > x[at] / 100).mean())


def test_decision_rows_name_the_setting_and_width_that_tell_them_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two widths of the same arms: without a label the decision table's rows for 1 and 2 filters read
    # alike, in the CLI and in the report.
    arms = [("baseline", {}), ("randomout", {"tau": 1e-8, "active_fraction": 1.0})]
    sweep = write_sweep(tmp_path, "widths", lottery_trials(arms, seeds=range(6), filters=(1, 2)))
    monkeypatch.setenv("LOTTERY_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "300")
    done = CliRunner().invoke(app, ["aggregate", "widths"])
    assert done.exit_code == 0, done.output
    decision_part = done.output[done.output.index("Decision-grade comparisons") :]
    rows = [line for line in decision_part.splitlines() if line.startswith("│ ")]
    assert [(r.startswith("│ baseline"), "filters=1" in r, "filters=2" in r) for r in rows] == [
        (True, True, False),
        (False, True, False),
        (True, False, True),
        (False, False, True),
    ]
    tables = aggregate(sweep)
    page = build_report(
        tables.trials, tables.epochs, tables.summary, tmp_path / "report", name="w", decision=tables.decision
    ).read_text()
    table = page[
        page.index("<table id=decision>") : page.index("</table>", page.index("<table id=decision>"))
    ]
    assert "<th class=l>setting</th>" in table and table.count("filters=1") == 2 == table.count("filters=2")


def test_row_labels_name_only_what_varies() -> None:
    from dashboards.setting import row_labels

    summary = pd.DataFrame(
        {
            "config_hash": ["a", "b", "c"],
            "setting": ['{"lr": 0.01, "epochs": 5}', '{"lr": 0.1, "epochs": 5}', '{"lr": 0.1, "epochs": 5}'],
            "filters": [2, 2, 2],
        }
    )
    assert row_labels(summary) == {"a": "lr=0.01", "b": "lr=0.1", "c": "lr=0.1"}
    assert set(row_labels(summary.assign(setting='{"lr": 0.1}')).values()) == {""}
