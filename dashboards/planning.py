"""How many seeds per arm a study needs (`lottery plan`), from a pilot's rates or from given ones.

Two questions, each with its method named next to the number:
- estimate a failure rate within +-w at 95%: the fixed design's normal-approximation size
  n = z^2 p (1 - p) / w^2 (z = 1.96), and the seeds a sequential study stopping at
  `failure_rate_ci_width <= 2w` would run at that rate (the first n whose beta-binomial confidence
  sequence of dashboards/sequential.py is at most 2w wide, taking p*n failures);
- detect a paired gain d at power 0.8: the smallest n whose two-sided one-sample t-test on the
  paired gains (alpha 0.05) reaches the power, from the noncentral t distribution with the gains'
  standard deviation s (scipy.stats.nct), not the normal shortcut ((z_a + z_b) s / d)^2;
- the same gain for a sequential study that stops on `until: {paired: ...}`: the seeds by which its
  sign-test confidence sequence (dashboards/sequential.py) has declared "better" with the given
  power, looking after every batch of B pairs (`seeds.batch`). That sequence decides on the count of
  positive gains alone, a binomial walk with P(gain > 0) = Phi(d / s) for normal gains, so the
  chance of having decided by n is computed exactly by a forward pass over (pairs, positives) with
  the decided mass absorbed: no simulation (a Monte Carlo of the sequence itself agrees: tests).
  Valid at every look, it needs about 3-4x the fixed t-test's pairs: at batch 20, 100 against 34 at
  d = 0.5 s and 40 against 10 at d = s (90 and 25 looking after every pair): the price of being
  free to stop early.

A rate of exactly 0 or 1 plans nothing (the formula gives 0 seeds), so a pilot's rate is clipped
to its Wilson 95% bound nearer 1/2 when it saw no failures or only failures.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import scipy.stats

from dashboards.sequential import paired_gains_vs, rate_cs, sign_critical_counts
from dashboards.stats import BASELINE, wilson_interval

MAX_PLAN = 1_000_000
NEGLIGIBLE = 1e-20  # probability mass the sequential paired plan drops at the walk's far tail
SEQUENTIAL_PAIRED_MAX = 20_000  # the sequential paired plan's exact pass stops here ("> 20000")
METHOD_FIXED = "fixed n: normal approximation z^2 p(1-p)/w^2"
METHOD_ANYTIME = "sequential: beta-binomial confidence sequence width <= 2w"
METHOD_PAIRED = "paired t-test power (noncentral t), alpha 0.05 two-sided"
METHOD_PAIRED_SEQUENTIAL = "sequential: sign-test confidence sequence decides 'better' (exact, normal gains)"
PLAN_COLUMNS = (
    "arm",
    "pilot n",
    "failure rate",
    "seeds for +-w (fixed)",
    "seeds for +-w (sequential)",
    "gain sd",
    "seeds for gain d",
    "seeds for gain d (sequential)",
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


def sequential_paired_power(
    n: int, gain: float, sd: float, confidence: float = 0.95, batch: int = 1
) -> float:
    """P(the sign-test sequence has declared "better" by n pairs), looking after every `batch` pairs."""
    return float(_sequential_paired_decided(n, gain, sd, confidence, batch)[-1])


def _sequential_paired_decided(
    horizon: int, gain: float, sd: float, confidence: float = 0.95, batch: int = 1
) -> np.ndarray:
    """decided[n] = P(decided "better" by n pairs), n = 0..horizon (normal gains, mean gain, sd sd)."""
    q = float(scipy.stats.norm.sf(0, loc=gain, scale=sd))  # P(gain > 0)
    critical = sign_critical_counts(horizon, confidence)
    alive = np.zeros(horizon + 2)  # alive[c]: P(c positives so far and not yet decided)
    alive[0] = 1.0
    low, high = 0, 0  # where alive holds mass (the rest is below NEGLIGIBLE and dropped)
    decided = np.zeros(horizon + 1)
    for n in range(1, horizon + 1):
        alive[low + 1 : high + 2] = alive[low + 1 : high + 2] * (1 - q) + alive[low : high + 1] * q
        alive[low] *= 1 - q
        high += 1
        decided[n] = decided[n - 1]
        if n % batch == 0 and critical[n] and critical[n] <= high:
            decided[n] += alive[critical[n] : high + 1].sum()
            alive[critical[n] : high + 1] = 0.0
            high = max(low, critical[n] - 1)
        while low < high and alive[low] < NEGLIGIBLE:
            low += 1
    return decided


def sequential_paired_sample_size(
    gain: float, sd: float, power: float = 0.8, confidence: float = 0.95, batch: int = 1
) -> float:
    """Smallest n by which the sequential paired study has declared "better" with the given power;
    inf beyond SEQUENTIAL_PAIRED_MAX pairs."""
    horizon = min(SEQUENTIAL_PAIRED_MAX, max(64, 6 * paired_sample_size(gain, sd, power)))
    while True:
        reached = np.nonzero(_sequential_paired_decided(horizon, gain, sd, confidence, batch) >= power)[0]
        if reached.size:
            return int(reached[0])
        if horizon == SEQUENTIAL_PAIRED_MAX:
            return math.inf
        horizon = min(SEQUENTIAL_PAIRED_MAX, 4 * horizon)


def planning_rate(k: int, n: int) -> float:
    """A pilot's rate, clipped off 0 and 1 to its Wilson bound (see the module docstring)."""
    if n == 0:
        return math.nan
    low, high = wilson_interval(k, n)
    return high if k == 0 else low if k == n else k / n


def plan_from_pilot(
    trials: pd.DataFrame, within: float, gain: float | None, power: float = 0.8, batch: int = 1
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
        rows.append(_row(arm, n, p, within, sd, gain, power, batch))
    return pd.DataFrame(rows, columns=list(PLAN_COLUMNS))


def plan_from_rates(
    rates: list[float],
    within: float,
    gain: float | None,
    gain_sd: float | None,
    power: float = 0.8,
    batch: int = 1,
) -> pd.DataFrame:
    """Rows for given failure rates and, if given, a paired gain's sd (no pilot)."""
    rows = [_row(f"rate {p:g}", math.nan, p, within, math.nan, None, power, batch) for p in rates]
    if gain_sd is not None:
        rows.append(_row(f"gain sd {gain_sd:g}", math.nan, math.nan, within, gain_sd, gain, power, batch))
    return pd.DataFrame(rows, columns=list(PLAN_COLUMNS))


def _row(
    arm: str, n: float, p: float, within: float, sd: float, gain: float | None, power: float, batch: int
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
        "seeds for gain d (sequential)": sequential_paired_sample_size(gain, sd, power, batch=batch)
        if has_sd
        else math.nan,
    }
