"""Seed statistics against answers computed by hand (worked out in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from dashboards.signed_rank import signed_rank_test
from dashboards.stats import (
    SUMMARY_COLUMNS,
    bootstrap_std_ci,
    paired_gains,
    summarise,
    trials_frame,
    wilson_interval,
)

CHANCE, MARGIN = 0.1, 0.05
RULE = "failed if final test accuracy <= chance + 0.05 (or the loss diverged)"

# Baseline, seeds 1..10: seeds 3, 6 and 9 sit at chance (<= 0.15) -> 3 of 10 failed.
BASE_ACC = [0.70, 0.72, 0.10, 0.68, 0.74, 0.12, 0.71, 0.69, 0.11, 0.73]
# RandomOut (tau=1e-8) gains over the same seeds.
GAINS_B = [0.02, -0.01, 0.60, 0.03, 0.00, 0.58, 0.01, 0.04, 0.62, -0.02]


def _trial(config: str, pair: str, scheme: str, seed: int, acc: float = math.nan, **kw: object) -> dict:
    status = kw.pop("status", "finished")
    diverged = bool(kw.pop("diverged", False))
    finished = status == "finished"
    row = {
        "trial_key": f"{config}-{seed}",
        "config_hash": config,
        "pair_key": pair,
        "reference_hash": kw.pop("reference", None),
        "sweep": "hand",
        "scheme": scheme,
        "hparam_label": kw.pop("label", ""),
        "hparams": "{}",
        "setting": "{}",
        "model": "crater_cnn",
        "dataset": "synthetic",
        "filters": kw.pop("filters", 8),
        "seed": seed,
        "status": status,
        "final_test_acc": acc,
        "best_test_acc": acc,
        "final_train_acc": acc,
        "failed": finished and (diverged or acc <= CHANCE + MARGIN),
        "diverged": diverged,
        "epochs_done": 4 if finished else pd.NA,
        "total_resets": 0 if finished else pd.NA,
        "dead_filters": kw.pop("dead_filters", 0 if finished else pd.NA),
        "sparsity": kw.pop("sparsity", 0.0) if finished else math.nan,
        "chance": CHANCE if finished else math.nan,
        "failure_margin": MARGIN,
        "failure_rule": RULE,
        "wall_s": 1.0,
        "pack_size": 1,
        "seed_wall_s": 1.0,
        "test_correct": "",
        "problem": f"trials/{config}-{seed}/result.json: empty" if status == "damaged" else pd.NA,
    }
    assert not kw, kw
    return row


@pytest.fixture(scope="module")
def trials() -> pd.DataFrame:
    rows = [_trial("A", "ctx8", "baseline", s, a) for s, a in enumerate(BASE_ACC, start=1)]
    rows += [
        _trial("A", "ctx8", "baseline", 11, status="errored"),
        _trial("A", "ctx8", "baseline", 12, status="incomplete"),
        _trial("A", "ctx8", "baseline", 13, status="pending"),
        _trial("A", "ctx8", "baseline", 14, 0.99, status="damaged"),  # its number must count nowhere
    ]
    rows += [
        _trial("B", "ctx8", "randomout", s, a + g, label="tau=1e-08 P=1")
        for s, (a, g) in enumerate(zip(BASE_ACC, GAINS_B, strict=True), start=1)
    ]
    # C: seeds 1-3 finish at 0.60, 0.62, 0.64; seed 4 diverges (finished, failed, no accuracy).
    rows += [
        _trial("C", "ctx8", "randomout", s, a, label="tau=1e-12 P=1")
        for s, a in enumerate([0.60, 0.62, 0.64], start=1)
    ]
    rows.append(_trial("C", "ctx8", "randomout", 4, math.nan, diverged=True, label="tau=1e-12 P=1"))
    # D: another width, so another pair_key, with no baseline to pair with.
    rows += [_trial("D", "ctx16", "randomout", s, 0.8, filters=16) for s in (1, 2, 3)]
    return trials_frame(rows)


@pytest.fixture(scope="module")
def summary(trials: pd.DataFrame) -> pd.DataFrame:
    return summarise(trials).set_index("config_hash")


def test_wilson_interval_by_hand() -> None:
    # 3/10, z = 1.959964: centre = (0.3 + z²/20) / (1 + z²/10) = 0.49207 / 1.38415 = 0.35550,
    # half-width = z * sqrt(0.3*0.7/10 + z²/400) / 1.38415 = 1.959964 * 0.174939 / 1.38415 = 0.24772.
    low, high = wilson_interval(3, 10)
    assert low == pytest.approx(0.35550 - 0.24772, abs=1e-4)
    assert high == pytest.approx(0.35550 + 0.24772, abs=1e-4)
    # 0/10: upper = (z²/10) / (1 + z²/10) = 0.384146 / 1.384146 = 0.27753.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    # style.md planning numbers: 26/100 -> 18-35%, 0/50 -> up to 7.1%.
    assert wilson_interval(26, 100) == pytest.approx((0.184, 0.354), abs=2e-3)
    assert wilson_interval(0, 50)[1] == pytest.approx(0.0713, abs=1e-3)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_bootstrap_std_ci() -> None:
    values = np.random.default_rng(1).normal(0.7, 0.02, size=40)
    low, high = bootstrap_std_ci(values)
    assert low < values.std(ddof=1) < high
    assert (low, high) == bootstrap_std_ci(values)  # fixed seed, same answer
    assert all(math.isnan(x) for x in bootstrap_std_ci([0.5, 0.6]))
    assert bootstrap_std_ci([0.5, 0.5, 0.5]) == (0.0, 0.0)


def test_counts_keep_unfinished_out_of_n(summary: pd.DataFrame) -> None:
    a = summary.loc["A"]
    assert (a.n_planned, a.n, a.n_errored, a.n_damaged, a.n_incomplete, a.n_pending) == (14, 10, 1, 1, 1, 1)
    assert a.n_failed == 3 and a.failure_rate == pytest.approx(0.3)
    assert (a.failure_ci_low, a.failure_ci_high) == pytest.approx((0.10779, 0.60322), abs=1e-4)
    assert a.failure_rule == RULE


def test_accuracy_statistics(summary: pd.DataFrame) -> None:
    a = summary.loc["A"]
    # sorted: .10 .11 .12 .68 .69 | .70 .71 .72 .73 .74 -> median (.69 + .70) / 2; sum 5.30 -> mean .53
    assert a.acc_median == pytest.approx(0.695)
    assert a.acc_mean == pytest.approx(0.53)
    assert (a.acc_min, a.acc_max) == pytest.approx((0.10, 0.74))
    c = summary.loc["C"]
    # the diverged seed is finished and failed but has no accuracy: n=4, n_acc=3.
    assert (c.n, c.n_failed, c.n_acc) == (4, 1, 3)
    assert c.failure_rate == pytest.approx(0.25)
    # .60 .62 .64: deviations -.02, 0, .02 -> var = .0008 / 2 -> std .02; quartiles .61, .63 -> IQR .02
    assert c.acc_std == pytest.approx(0.02)
    assert c.acc_iqr == pytest.approx(0.02)
    assert c.acc_median == pytest.approx(0.62)
    assert c.std_ci_low <= 0.02 <= c.std_ci_high


def test_paired_gains(summary: pd.DataFrame) -> None:
    b = summary.loc["B"]
    # gains sorted: -.02 -.01 0 .01 .02 | .03 .04 .58 .60 .62 -> median .025; 7 of 10 positive.
    assert b.n_pairs == 10
    assert b.gain_median == pytest.approx(0.025)
    assert b.gain_mean == pytest.approx(sum(GAINS_B) / 10)
    assert b.share_improved == pytest.approx(0.7)
    assert b.n_failed == 0 and b.failure_ci_high == pytest.approx(0.27753, abs=1e-4)
    # C pairs seeds 1-3 only: .60-.70, .62-.72, .64-.10 -> -.10, -.10, +.54.
    c = summary.loc["C"]
    assert c.n_pairs == 3 and c.gain_median == pytest.approx(-0.10)
    assert c.share_improved == pytest.approx(1 / 3)


def test_wilcoxon_is_exact_and_states_the_pairs_it_used(trials: pd.DataFrame, summary: pd.DataFrame) -> None:
    gains = paired_gains(trials).query("config_hash == 'B'").sort_values("seed")["gain"].to_numpy()
    np.testing.assert_allclose(gains, GAINS_B, atol=1e-12)
    b = summary.loc["B"]
    # seed 5's gain is 0: dropped (Wilcoxon's zero method), 9 pairs used; |gains| .01 and .02 tie,
    # so the exact p is the share of the 2^9 sign flips as extreme, as scipy's permutation test counts.
    nonzero = np.array([g for g in GAINS_B if g != 0])
    exact = scipy.stats.wilcoxon(nonzero, method=scipy.stats.PermutationMethod(n_resamples=2**9)).pvalue
    assert (b.n_better, b.n_tied, b.n_worse, b.wilcoxon_n) == (7, 1, 2, 9)
    assert b.wilcoxon_method == "exact" and b.wilcoxon_p == pytest.approx(exact, rel=1e-12)
    for config in ("A", "D"):  # the baseline itself; a config with no baseline in its pair_key
        row = summary.loc[config]
        assert row.n_pairs == 0 and math.isnan(row.gain_median) and math.isnan(row.wilcoxon_p)
        assert row.wilcoxon_method == "" and row.wilcoxon_n == 0


def test_wilcoxon_five_nonzero_pairs_is_exact_not_normal() -> None:
    # 5 positive gains: 2 of the 32 sign patterns are as extreme -> p = 0.0625 (normal: 0.043).
    test = signed_rank_test(np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.0, 0.0]))
    assert (test.p, test.n, test.n_zero, test.method) == (0.0625, 5, 2, "exact")
    assert scipy.stats.wilcoxon([0.01, 0.02, 0.03, 0.04, 0.05], method="asymptotic").pvalue < 0.05
    rng = np.random.default_rng(3)
    for n in (3, 8, 14):  # no ties: the same as scipy's exact distribution
        gains = rng.normal(0.01, 0.02, n)
        assert signed_rank_test(gains).p == pytest.approx(scipy.stats.wilcoxon(gains, method="exact").pvalue)
    big = signed_rank_test(rng.normal(0.01, 0.02, 60))
    assert big.method == "normal approximation" and big.n == 60
    assert math.isnan(signed_rank_test(np.array([0.0, 0.01])).p)


def test_summary_schema(summary: pd.DataFrame) -> None:
    table = summary.reset_index()
    assert list(table.columns) == list(SUMMARY_COLUMNS)
    assert {c: str(t) for c, t in table.dtypes.items()} == SUMMARY_COLUMNS
    assert list(table["config_hash"]) == ["A", "B", "C", "D"]
    assert table.set_index("config_hash").loc["D", "filters"] == 16


def test_a_trial_naming_a_reference_pairs_with_that_arm_not_the_baseline() -> None:
    """The IMP ticket control (fresh init) is compared seed by seed with the rewound IMP it names."""
    rows = [_trial("base", "p", "baseline", s, 0.50) for s in (1, 2, 3)]
    rewound = zip((1, 2, 3), (0.80, 0.70, 0.90), strict=True)
    rows += [_trial("rew", "p", "imp", s, a, sparsity=0.5) for s, a in rewound]
    rows += [
        _trial("ctl", "p", "imp", s, a, reference="rew", label="reinit=True", sparsity=0.5)
        for s, a in zip((1, 2, 4), (0.60, 0.75, 0.10), strict=True)
    ]
    trials = trials_frame(rows)
    gains = paired_gains(trials).set_index(["config_hash", "seed"])["gain"]
    # rewound vs baseline: +.30 +.20 +.40; control vs rewound (seed 4 has no rewound pair): -.20 +.05
    assert gains.loc["rew"].to_dict() == pytest.approx({1: 0.30, 2: 0.20, 3: 0.40})
    assert gains.loc["ctl"].to_dict() == pytest.approx({1: -0.20, 2: 0.05})
    table = summarise(trials).set_index("config_hash")
    assert list(table["reference"]) == ["baseline", "baseline", "imp"]
    assert table.loc["ctl", "n_pairs"] == 2 and table.loc["ctl", "sparsity"] == pytest.approx(0.5)
