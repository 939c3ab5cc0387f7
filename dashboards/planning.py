"""How many seeds per arm a study needs (`lottery plan`), from a pilot's rates or from given ones.

Two questions, each with its method named next to the number:
- estimate a failure rate within +-w at 95%: the fixed design's normal-approximation size
  n = z^2 p (1 - p) / w^2 (z = 1.96), and the seeds a sequential study stopping at
  `failure_rate_ci_width <= 2w` would run at that rate (the first n whose beta-binomial confidence
  sequence of dashboards/sequential.py is at most 2w wide, taking p*n failures);
- detect a paired gain d at power 0.8: the smallest n whose two-sided one-sample t-test on the
  paired gains (alpha 0.05) reaches the power, from the noncentral t distribution with the gains'
  standard deviation s (scipy.stats.nct), not the normal shortcut ((z_a + z_b) s / d)^2.

A rate of exactly 0 or 1 plans nothing (the formula gives 0 seeds), so a pilot's rate is clipped
to its Wilson 95% bound nearer 1/2 when it saw no failures or only failures.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import scipy.stats

from dashboards.sequential import paired_gains_vs, rate_cs
from dashboards.stats import BASELINE, wilson_interval

MAX_PLAN = 1_000_000
METHOD_FIXED = "fixed n: normal approximation z^2 p(1-p)/w^2"
METHOD_ANYTIME = "sequential: beta-binomial confidence sequence width <= 2w"
METHOD_PAIRED = "paired t-test power (noncentral t), alpha 0.05 two-sided"
PLAN_COLUMNS = (
    "arm",
    "pilot n",
    "failure rate",
    "seeds for +-w (fixed)",
    "seeds for +-w (sequential)",
    "gain sd",
    "seeds for gain d",
)


def _z(confidence: float) -> float:
    return float(scipy.stats.norm.ppf(0.5 + confidence / 2))


def rate_sample_size(p: float, within: float, confidence: float = 0.95) -> int:
    """Seeds for a fixed-n estimate of rate p within +-`within` (normal approximation)."""
    return max(1, math.ceil(_z(confidence) ** 2 * p * (1 - p) / within**2 - 1e-9))


def rate_sample_size_anytime(p: float, within: float, confidence: float = 0.95) -> int:
    """Seeds until the confidence sequence at rate p is at most 2 * `within` wide."""

    def narrow(n: int) -> bool:
        low, high = rate_cs(p * n, n, confidence)
        return high - low <= 2 * within

    high = 1
    while not narrow(high):
        high *= 2
        if high > MAX_PLAN:
            return MAX_PLAN
    low = high // 2
    while high - low > 1:  # the width shrinks with n at a fixed rate
        mid = (low + high) // 2
        low, high = (low, mid) if narrow(mid) else (mid, high)
    return high


def t_test_power(n: int, gain: float, sd: float, alpha: float = 0.05) -> float:
    """Power of the two-sided one-sample t-test of n paired gains with mean `gain` and sd `sd`."""
    df = n - 1
    crit = scipy.stats.t.ppf(1 - alpha / 2, df)
    nc = gain / sd * math.sqrt(n)
    return float(scipy.stats.nct.sf(crit, df, nc) + scipy.stats.nct.cdf(-crit, df, nc))


def paired_sample_size(gain: float, sd: float, power: float = 0.8, alpha: float = 0.05) -> int:
    """Smallest number of paired seeds whose t-test detects `gain` with the given power."""
    n = 2
    while t_test_power(n, gain, sd, alpha) < power:
        n += 1
        if n > MAX_PLAN:
            return MAX_PLAN
    return n


def planning_rate(k: int, n: int) -> float:
    """A pilot's rate, clipped off 0 and 1 to its Wilson bound (see the module docstring)."""
    if n == 0:
        return math.nan
    low, high = wilson_interval(k, n)
    return high if k == 0 else low if k == n else k / n


def plan_from_pilot(
    trials: pd.DataFrame, within: float, gain: float | None, power: float = 0.8
) -> pd.DataFrame:
    """One row per arm of a finished pilot sweep (PLAN_COLUMNS)."""
    rows = []
    for _, group in trials.groupby("config_hash", sort=False):
        done = group[group["status"] == "finished"]
        first = group.iloc[0]
        arm = " ".join(filter(None, [str(first["scheme"]), str(first["hparam_label"] or "")]))
        n, k = len(done), int(done["failed"].sum())
        p = planning_rate(k, n)
        sd = math.nan
        if first["scheme"] != BASELINE:
            gains = paired_gains_vs(trials, str(first["scheme"]), BASELINE)
            g = gains.loc[gains["config_hash"] == first["config_hash"], "gain"].to_numpy(float)
            if g.size >= 2 and np.std(g, ddof=1) > 0:
                sd = float(np.std(g, ddof=1))
        rows.append(_row(arm, n, p, within, sd, gain, power))
    return pd.DataFrame(rows, columns=list(PLAN_COLUMNS))


def plan_from_rates(
    rates: list[float], within: float, gain: float | None, gain_sd: float | None, power: float = 0.8
) -> pd.DataFrame:
    """Rows for given failure rates and, if given, a paired gain's sd (no pilot)."""
    rows = [_row(f"rate {p:g}", math.nan, p, within, math.nan, None, power) for p in rates]
    if gain_sd is not None:
        rows.append(_row(f"gain sd {gain_sd:g}", math.nan, math.nan, within, gain_sd, gain, power))
    return pd.DataFrame(rows, columns=list(PLAN_COLUMNS))


def _row(
    arm: str, n: float, p: float, within: float, sd: float, gain: float | None, power: float
) -> dict[str, object]:
    has_rate = not math.isnan(p)
    has_sd = not math.isnan(sd) and gain
    return {
        "arm": arm,
        "pilot n": n,
        "failure rate": p,
        "seeds for +-w (fixed)": rate_sample_size(p, within) if has_rate else math.nan,
        "seeds for +-w (sequential)": rate_sample_size_anytime(p, within) if has_rate else math.nan,
        "gain sd": sd,
        "seeds for gain d": paired_sample_size(gain, sd, power) if has_sd else math.nan,
    }
