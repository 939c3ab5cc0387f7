"""Anytime-valid intervals for sequential seed studies, and the statistic a stopping rule reads.

A study that adds seeds until its interval is narrow enough, or until a comparison is decided,
looks at the data many times. A fixed-n interval (Wilson, a Wilcoxon p) checked after every batch
misses far more often than its nominal 5%: stopping at the first look that happens to look
decided is how optional stopping fools one. A *confidence sequence* holds at every sample size
at once, P(the true value is ever outside) <= alpha, so it stays valid whenever the study stops.

Both sequences here are Ville's inequality applied to a nonnegative (super)martingale built as
a mixture of likelihood ratios, the construction of Howard, Ramdas, McAuliffe and Sekhon,
"Time-uniform, nonparametric, nonasymptotic confidence sequences", Annals of Statistics 49(2),
2021 (the conjugate-mixture boundaries of their Section 3; Robbins 1970 for the mixture idea):

- failure rate (Bernoulli p): M_t(p) = integral of prod (q/p)^x (1-q/1-p)^(1-x) over q ~ Beta(1/2, 1/2)
  = B(k + 1/2, t - k + 1/2) / B(1/2, 1/2) / (p^k (1-p)^(t-k)), a martingale under p; the set
  {p : M_t(p) < 1/alpha} is an interval (log M_t is convex in p) found by root finding.
- median paired gain: the sign-test form of the quantile sequences of Howard and Ramdas,
  "Sequential estimation of quantiles with applications to A/B-testing and best-arm
  identification", Bernoulli 28(3), 2022. For a candidate median m the indicators 1{gain > m}
  have mean <= 1/2; the mixture over q ~ Uniform[1/2, 1] of prod (2q)^x (2(1-q))^(1-x) is a
  supermartingale for any mean <= 1/2, so "gain > m" in c of t pairs, with M_t(c) >= 2/alpha,
  rejects "median <= m" at alpha/2 uniformly in t; the same on the other side. The values not
  rejected are the order statistics [g_(t-c+1), g_(c)], so ties (gains of exactly 0) are fine.

Pure functions on arrays and the per-trial table (dashboards.stats.TRIAL_COLUMNS); no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.optimize
import scipy.special
import scipy.stats

RATE_PRIOR = 0.5  # Beta(1/2, 1/2) mixing distribution (fixed before any data; any choice is valid)
METHOD_RATE = "beta-binomial mixture confidence sequence (Howard et al. 2021)"
METHOD_MEDIAN = "sign-test mixture confidence sequence for the median (Howard & Ramdas 2022)"
METHOD_SHARE = "pigeonhole bootstrap of the share of the variance (Owen 2007)"


def interval_statement(statistics: pd.Series) -> str:
    """What the looks' intervals are, in words: anytime-valid confidence sequences for the failure-rate
    and paired rules, fixed-n bootstrap intervals for a variance share (dashboards/sources.py)."""
    if statistics.str.endswith("_share").all():
        return (
            f"Its intervals are fixed-n ({METHOD_SHARE}), not anytime-valid: the rule stopped on their "
            "width, never on the share's value, but they do not account for the looks"
        )
    method = METHOD_RATE if (statistics == "failure_rate").all() else METHOD_MEDIAN
    return f"Its intervals are anytime-valid ({method}), valid at whichever look the study stopped"


LOOK_COLUMNS: dict[str, str] = {
    "look": "int64",  # 1-based: the look after seed batch `look`
    "seeds": "int64",  # seeds per configuration opened so far
    "config_hash": "string",
    "scheme": "string",
    "hparam_label": "string",
    "statistic": "string",  # failure_rate | median_gain
    "n": "int64",  # finished trials (or complete pairs) it is computed from
    "estimate": "float64",
    "cs_low": "float64",
    "cs_high": "float64",
    "met": "bool",  # this arm meets the rule at this look
    "verdict": "string",
    "rule": "string",  # the stopping rule in words (the same on every row)
}


def _log_rate_martingale(k: float, n: float, p: float) -> float:
    a = RATE_PRIOR
    mixture = scipy.special.betaln(a + k, a + n - k) - scipy.special.betaln(a, a)
    return mixture - scipy.special.xlogy(k, p) - scipy.special.xlog1py(n - k, -p)


def rate_cs(k: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Anytime-valid interval for a Bernoulli rate after k events in n (k may be fractional, for
    planning); (0, 1) before any data."""
    if n <= 0:
        return (0.0, 1.0)
    threshold = math.log(1 / (1 - confidence))

    def excess(p: float) -> float:
        return _log_rate_martingale(k, n, p) - threshold

    mle = k / n
    tiny = 1e-15
    # an end stays at 0 (or 1) when no rate that far out is rejected yet (few events, or none)
    low = 0.0 if excess(tiny) < 0 else scipy.optimize.brentq(excess, tiny, mle, xtol=1e-12)
    high = 1.0 if excess(1 - tiny) < 0 else scipy.optimize.brentq(excess, mle, 1 - tiny, xtol=1e-12)
    return (float(low), float(high))


def rate_martingale(k: float, n: float, p: float) -> float:
    """M_t(p) itself (tests check the interval's ends against it)."""
    return math.exp(_log_rate_martingale(k, n, p))


def _sign_log_martingale(counts: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """log of 2^n * integral over q in [1/2, 1] of q^c (1-q)^(n-c) * 2 dq, for each count c."""
    c, n = np.asarray(counts, dtype=float), np.asarray(n, dtype=float)
    return (
        (n + 1) * math.log(2)
        + scipy.special.betaln(c + 1, n - c + 1)
        + scipy.stats.beta.logsf(0.5, c + 1, n - c + 1)
    )


def sign_critical_count(n: int, confidence: float = 0.95) -> int | None:
    """Smallest count c of n whose one-sided sign mixture reaches 2/alpha; None if none can yet."""
    if n <= 0:
        return None
    log_m = _sign_log_martingale(np.arange(n + 1), n)
    hits = np.nonzero(log_m >= math.log(2 / (1 - confidence)))[0]
    return int(hits[0]) if hits.size else None


def sign_critical_counts(horizon: int, confidence: float = 0.95) -> np.ndarray:
    """`sign_critical_count(n)` for n = 0..horizon (0 where none can yet), by one bisection over
    every n at once: the mixture grows with the count (its integrand's ratio q / (1 - q) >= 1 on
    [1/2, 1]), so the smallest count that reaches 2/alpha is where it first crosses."""
    threshold = math.log(2 / (1 - confidence))
    n = np.arange(1, horizon + 1)
    reachable = _sign_log_martingale(n, n) >= threshold
    low, high = np.zeros_like(n), n.copy()  # reaches(high) holds where reachable; reaches(low) never
    while np.any(high - low > 1):
        mid = (low + high) // 2
        hit = _sign_log_martingale(mid, n) >= threshold
        high, low = np.where(hit, mid, high), np.where(hit, low, mid)
    return np.concatenate([[0], np.where(reachable, high, 0)]).astype(np.int64)


def median_cs(gains: np.ndarray | list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Anytime-valid interval for the median of paired gains (unbounded until enough pairs)."""
    g = np.sort(np.asarray(gains, dtype=float))
    g = g[np.isfinite(g)]
    c = sign_critical_count(g.size, confidence)
    if c is None:
        return (-math.inf, math.inf)
    return (float(g[g.size - c]), float(g[c - 1]))


@dataclass(frozen=True)
class Decision:
    decided: bool
    verdict: str


def paired_decision(low: float, high: float, smallest_effect: float | None) -> Decision:
    """Decided when the interval excludes 0, or lies inside (-effect, +effect)."""
    if low > 0:
        return Decision(True, "better: median gain > 0")
    if high < 0:
        return Decision(True, "worse: median gain < 0")
    if smallest_effect is not None and -smallest_effect < low and high < smallest_effect:
        return Decision(True, f"no median gain as large as {smallest_effect:g} either way")
    return Decision(False, "undecided")


def _finished(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[trials["status"] == "finished"]


def _arm(group: pd.DataFrame) -> dict[str, object]:
    first = group.iloc[0]
    return {
        "config_hash": first["config_hash"],
        "scheme": first["scheme"],
        "hparam_label": first["hparam_label"],
    }


def failure_rate_look(
    trials: pd.DataFrame, width: float, confidence: float = 0.95
) -> list[dict[str, object]]:
    """Per configuration: its failure-rate sequence now, and whether it is at most `width` wide."""
    rows = []
    for _, group in trials.groupby("config_hash", sort=False):
        done = _finished(group)
        n, k = len(done), int(done["failed"].sum())
        low, high = rate_cs(k, n, confidence)
        met = n > 0 and high - low <= width
        rows.append(
            _arm(group)
            | {
                "statistic": "failure_rate",
                "n": n,
                "estimate": k / n if n else math.nan,
                "cs_low": low,
                "cs_high": high,
                "met": met,
                "verdict": f"width {high - low:.3f} {'<=' if met else '>'} {width:g}",
            }
        )
    return rows


def paired_gains_vs(trials: pd.DataFrame, scheme: str, vs: str) -> pd.DataFrame:
    """Finished trials of `scheme` joined with the `vs` trial of the same pair_key and seed."""
    done = _finished(trials)
    done = done[np.isfinite(done["final_test_acc"].astype(float))]
    ref = done.loc[done["scheme"] == vs, ["pair_key", "seed", "final_test_acc"]]
    if ref.duplicated(["pair_key", "seed"]).any():
        raise ValueError(f"several {vs} trials share a (pair_key, seed); cannot pair by seed")
    ref = ref.rename(columns={"final_test_acc": "vs_acc"})
    cols = ["config_hash", "scheme", "hparam_label", "pair_key", "seed", "final_test_acc"]
    merged = done.loc[done["scheme"] == scheme, cols].merge(ref, on=["pair_key", "seed"], how="inner")
    return merged.assign(gain=merged["final_test_acc"] - merged["vs_acc"])


def paired_look(
    trials: pd.DataFrame, scheme: str, vs: str, confidence: float = 0.95, smallest_effect: float | None = None
) -> list[dict[str, object]]:
    """Per configuration of `scheme`: the median paired gain's sequence, and whether it is decided."""
    gains = paired_gains_vs(trials, scheme, vs)
    rows = []
    arms = trials[trials["scheme"] == scheme]
    for config_hash, group in arms.groupby("config_hash", sort=False):
        g = gains.loc[gains["config_hash"] == config_hash, "gain"].to_numpy(float)
        low, high = median_cs(g, confidence)
        decision = paired_decision(low, high, smallest_effect)
        rows.append(
            _arm(group)
            | {
                "statistic": "median_gain",
                "n": int(g.size),
                "estimate": float(np.median(g)) if g.size else math.nan,
                "cs_low": low,
                "cs_high": high,
                "met": decision.decided,
                "verdict": decision.verdict,
            }
        )
    return rows


def looks_frame(rows: list[dict[str, object]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(LOOK_COLUMNS)).astype(LOOK_COLUMNS)


def look_cells(look: Any, pct: Callable[[float, int], str]) -> list[str]:
    """A look's n, estimate, anytime-valid interval, whether it met the rule and its verdict, as text
    (`pct` writes a share in percent, as the table it goes into writes one): the report's look table
    and the CLI's share these columns."""
    interval = f"[{pct(look.cs_low, 2)}, {pct(look.cs_high, 2)}]"
    return [str(look.n), pct(look.estimate, 2), interval, "yes" if look.met else "no", str(look.verdict)]
