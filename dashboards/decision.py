"""Decision-grade comparisons of arms: what a researcher choosing between designs needs beyond
a median and a failure rate (Agarwal et al. 2021, "Deep RL at the edge of the statistical
precipice" (rliable); Bouthillier et al. 2021, "Accounting for variance in ML benchmarks").

Per arm, over its finished trials' final test accuracy:
- the interquartile mean (IQM: the mean of the middle 50 %, `scipy.stats.trim_mean(x, 0.25)`),
  robust to the failed seeds that drag a mean and more efficient than the median, with a
  stratified bootstrap interval (seeds resampled within each stratum, here the arm's data split
  `pair_key`: one stratum per arm in a plain sweep, where it is a percentile bootstrap);
- P(arm > reference), the probability of improvement: for seeds that pair (same seed, same initial
  draw and data order) the share of pairs the arm wins, a tie counting one half; unpaired, the
  Mann-Whitney form over every (arm, reference) couple. Its interval is a bootstrap over pairs
  (paired) or over each arm's seeds separately (unpaired);
- best-of-N inflation: the expected best of N seeds minus the median, what running N seeds and
  reporting the best ("seed shopping") adds to a claim. The expectation is the U-statistic over
  every N-subset of the observed seeds (unbiased for N draws from the seed distribution), so it
  is only defined for N <= n;
- the failure profile: the share of seeds above each accuracy, with pointwise Wilson bands (what
  the report draws);
- the test-set floor beside the observed spread: the accuracy SD that the finite test set alone would
  give, sqrt(sum_i p_i (1 - p_i)) / n with p_i the share of the arm's seeds that get test example i
  right (Jordan 2024; trainers/correctness.py), computed from the trials' per-example correctness,
  not assumed binomial. An observed SD near the floor says the seeds differ about as much as
  re-drawing the test set would make them.

Pure functions over the trials table, deterministic for a given bootstrap seed.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import scipy.stats

from dashboards.signed_rank import TIE_TOLERANCE
from dashboards.stats import BASELINE, paired_gains, wilson_interval
from trainers.correctness import decode, finite_test_set_sd

CONFIDENCE = 0.95
RESAMPLES = 2000
BOOTSTRAP_SEED = 0
BEST_OF = (1, 5, 10)  # N for the best-of-N inflation columns
IQM_CUT = 0.25  # trimmed from each end
CHUNK = 250  # bootstrap resamples drawn at once

DECISION_COLUMNS: dict[str, str] = {
    "config_hash": "string",
    "scheme": "string",
    "hparam_label": "string",
    "n": "int64",  # finished trials with a finite accuracy
    "iqm": "float64",
    "iqm_ci_low": "float64",
    "iqm_ci_high": "float64",
    "reference": "string",  # what P(improvement) is against ("" for the reference arm itself)
    "improve_n": "int64",  # pairs (paired) or seeds of this arm (unpaired) behind P(improvement)
    "improve_paired": "boolean",
    "p_improve": "float64",
    "p_improve_ci_low": "float64",
    "p_improve_ci_high": "float64",
    **{f"best_of_{n}": "float64" for n in BEST_OF},  # expected best of N minus the median
    "acc_sd": "float64",  # observed SD of final test accuracy over the arm's seeds (ddof 1)
    "test_floor_sd": "float64",  # the SD the test set alone would give (NaN: correctness not recorded)
    "test_floor_n": "int64",  # seeds whose per-example correctness it is computed from
}

PROFILE_COLUMNS: dict[str, str] = {
    "config_hash": "string",
    "threshold": "float64",
    "share_above": "float64",
    "ci_low": "float64",
    "ci_high": "float64",
    "n": "int64",
}


def interquartile_mean(values: np.ndarray) -> float:
    x = np.asarray(values, dtype=float)
    return float(scipy.stats.trim_mean(x, IQM_CUT)) if x.size else float("nan")


def _percentile_interval(estimates: np.ndarray) -> tuple[float, float]:
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(estimates, [alpha, 1 - alpha])
    return float(low), float(high)


def stratified_bootstrap_iqm(
    values: np.ndarray, strata: np.ndarray | None = None, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float]:
    """Percentile interval of the IQM, resampling values with replacement within each stratum."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return (float("nan"), float("nan"))
    labels = np.zeros(x.size, dtype=int) if strata is None else pd.factorize(np.asarray(strata))[0]
    rng = np.random.default_rng(seed)
    parts = []
    for label in np.unique(labels):
        members = x[labels == label]
        parts.append(members[rng.integers(0, members.size, size=(RESAMPLES, members.size))])
    resampled = np.concatenate(parts, axis=1)
    return _percentile_interval(scipy.stats.trim_mean(resampled, IQM_CUT, axis=1))


def _wins(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 where a beats b, 1/2 for a tie (within TIE_TOLERANCE), 0 where it loses."""
    diff = a - b
    return np.where(np.abs(diff) <= TIE_TOLERANCE, 0.5, (diff > 0).astype(float))


def probability_of_improvement_paired(
    gains: np.ndarray, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float, float]:
    """P(arm > reference) over seed-paired gains, with a bootstrap interval over the pairs."""
    g = np.asarray(gains, dtype=float)
    if g.size == 0:
        return (float("nan"), float("nan"), float("nan"))
    wins = _wins(g, np.zeros_like(g))
    if g.size < 2:
        return (float(wins.mean()), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    resampled = wins[rng.integers(0, g.size, size=(RESAMPLES, g.size))].mean(axis=1)
    return (float(wins.mean()), *_percentile_interval(resampled))


def _share_beating(x: np.ndarray, y: np.ndarray) -> float:
    """Mean of `_wins` over every (x_i, y_j), by sorting (memory n + m, not n x m)."""
    ys = np.sort(y)
    below = np.searchsorted(ys, x - TIE_TOLERANCE, side="left")
    tied = np.searchsorted(ys, x + TIE_TOLERANCE, side="right") - below
    return float((below + 0.5 * tied).sum() / (x.size * y.size))


def probability_of_improvement_unpaired(
    arm: np.ndarray, reference: np.ndarray, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float, float]:
    """P(X > Y) for X from the arm and Y from the reference (the Mann-Whitney U / (n m)), with an
    interval from resampling each arm's seeds independently (the two arms as strata)."""
    x, y = np.asarray(arm, dtype=float), np.asarray(reference, dtype=float)
    if x.size == 0 or y.size == 0:
        return (float("nan"), float("nan"), float("nan"))
    point = _share_beating(x, y)
    if x.size < 2 or y.size < 2:
        return (point, float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    shares = []
    for start in range(0, RESAMPLES, CHUNK):  # chunks bound the memory at CHUNK x (n + m)
        k = min(CHUNK, RESAMPLES - start)
        xs, ys = x[rng.integers(0, x.size, (k, x.size))], y[rng.integers(0, y.size, (k, y.size))]
        # Mann-Whitney by ranks: U = (rank sum of the arm) - n (n + 1) / 2; ties get midranks (= 1/2).
        ranks = scipy.stats.rankdata(np.round(np.concatenate([xs, ys], axis=1), 12), axis=1)
        shares.append((ranks[:, : x.size].sum(axis=1) - x.size * (x.size + 1) / 2) / (x.size * y.size))
    return (point, *_percentile_interval(np.concatenate(shares)))


def expected_best_of(values: np.ndarray, n: int) -> float:
    """E[max of n seeds], averaged over every n-subset of the observed values (NaN if n > len).

    The i-th smallest of N values is the maximum of C(i-1, n-1) of the C(N, n) subsets.
    """
    x = np.sort(np.asarray(values, dtype=float))
    if n < 1 or n > x.size:
        return float("nan")
    weights = np.array([math.comb(i - 1, n - 1) for i in range(1, x.size + 1)], dtype=float)
    return float((weights * x).sum() / math.comb(x.size, n))


def best_of_inflation(values: np.ndarray, n: int) -> float:
    """What reporting the best of n seeds adds over the median seed (NaN if n > len)."""
    x = np.asarray(values, dtype=float)
    return expected_best_of(x, n) - float(np.median(x)) if x.size else float("nan")


def failure_profile(values: np.ndarray, thresholds: np.ndarray) -> pd.DataFrame:
    """Share of seeds whose accuracy is above each threshold, with pointwise Wilson 95 % bands."""
    x = np.asarray(values, dtype=float)
    rows = []
    for t in thresholds:
        above = int((x > t).sum())
        low, high = wilson_interval(above, x.size)
        rows.append(
            {"threshold": float(t), "share_above": above / x.size if x.size else np.nan}
            | {"ci_low": low, "ci_high": high, "n": int(x.size)}
        )
    return pd.DataFrame(rows)


def _finished_accuracy(group: pd.DataFrame) -> pd.DataFrame:
    done = group[group["status"] == "finished"]
    return done[np.isfinite(done["final_test_acc"].astype(float))]


def _reference_accuracy(trials: pd.DataFrame, group: pd.DataFrame) -> tuple[str, np.ndarray]:
    """The accuracies an arm is compared with: its named reference arm, else the baseline that
    shares its pair_key; empty for the baseline itself."""
    named = group["reference_hash"].dropna().unique() if "reference_hash" in group else []
    if len(named):
        reference = trials[trials["config_hash"] == named[0]]
        label = f"{reference['scheme'].iloc[0]} {reference['hparam_label'].iloc[0]}" if len(reference) else ""
    elif (group["scheme"] == BASELINE).all():
        return "", np.array([])
    else:
        reference = trials[
            (trials["scheme"] == BASELINE) & trials["pair_key"].isin(group["pair_key"].unique())
        ]
        label = BASELINE
    return label.strip(), _finished_accuracy(reference)["final_test_acc"].to_numpy(float)


def _floor(done: pd.DataFrame, acc: np.ndarray) -> dict[str, object]:
    bits = [] if "test_correct" not in done else [decode(t) for t in done["test_correct"].fillna("")]
    rows = [b for b in bits if b is not None]
    return {
        "acc_sd": float(np.std(acc, ddof=1)) if acc.size > 1 else np.nan,
        "test_floor_sd": finite_test_set_sd(rows),
        "test_floor_n": len(rows),
    }


def decide(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per config_hash (DECISION_COLUMNS), in order of first appearance in `trials`."""
    gains = paired_gains(trials)
    gains_by_config = {str(k): g["gain"].to_numpy(float) for k, g in gains.groupby("config_hash", sort=False)}
    rows = []
    for config_hash, group in trials.groupby("config_hash", sort=False):
        done = _finished_accuracy(group)
        acc = done["final_test_acc"].to_numpy(float)
        low, high = stratified_bootstrap_iqm(acc, done["pair_key"].to_numpy())
        label, reference = _reference_accuracy(trials, group)
        paired = gains_by_config.get(str(config_hash), np.array([]))
        if not label or not (paired.size or reference.size):
            improve, n_improve, is_paired = (np.nan, np.nan, np.nan), 0, pd.NA
        elif paired.size:
            improve, n_improve, is_paired = probability_of_improvement_paired(paired), paired.size, True
        else:
            improve, n_improve, is_paired = (
                probability_of_improvement_unpaired(acc, reference),
                acc.size,
                False,
            )
        rows.append(
            {
                "config_hash": config_hash,
                "scheme": group["scheme"].iloc[0],
                "hparam_label": group["hparam_label"].iloc[0],
                "n": int(acc.size),
                "iqm": interquartile_mean(acc),
                "iqm_ci_low": low,
                "iqm_ci_high": high,
                "reference": label,
                "improve_n": int(n_improve),
                "improve_paired": is_paired,
                "p_improve": improve[0],
                "p_improve_ci_low": improve[1],
                "p_improve_ci_high": improve[2],
                **{f"best_of_{n}": best_of_inflation(acc, n) for n in BEST_OF},
                **_floor(done, acc),
            }
        )
    return pd.DataFrame(rows, columns=list(DECISION_COLUMNS)).astype(DECISION_COLUMNS)


def profiles(trials: pd.DataFrame, points: int = 101) -> pd.DataFrame:
    """Every arm's failure profile on one grid of accuracies from 0 to 1 (PROFILE_COLUMNS)."""
    grid = np.linspace(0.0, 1.0, points)
    frames = []
    for config_hash, group in trials.groupby("config_hash", sort=False):
        frame = failure_profile(_finished_accuracy(group)["final_test_acc"].to_numpy(float), grid)
        frames.append(frame.assign(config_hash=config_hash))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=d) for c, d in PROFILE_COLUMNS.items()})
    return pd.concat(frames, ignore_index=True)[list(PROFILE_COLUMNS)].astype(PROFILE_COLUMNS)
