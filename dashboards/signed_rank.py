"""The two-sided Wilcoxon signed-rank test of paired gains, exact with ties.

scipy's exact method assumes no ties and no zeros; paired accuracy gains (counts over a test set)
have both. Zeros are dropped (ZERO_METHOD, stated with every p) and the remaining ranks' exact
distribution is counted over all 2^n sign patterns, midranks included, up to EXACT_MAX_N pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.stats

EXACT_MAX_N = 50  # exact signed-rank distribution up to here (cost ~n^3 / 4 additions), normal above
ZERO_METHOD = "wilcox"  # tied pairs dropped before ranking (Wilcoxon 1945); stated with every p
TIE_TOLERANCE = 1e-12  # gains and |gains| closer than this are equal (accuracies are counts / n_test)


@dataclass(frozen=True)
class SignedRankTest:
    """A two-sided Wilcoxon signed-rank test as reported: p, the pairs it used and how p was found."""

    p: float
    n: int  # non-zero pairs: what the test used
    n_zero: int  # tied pairs, dropped (ZERO_METHOD)
    method: str  # "exact" | "normal approximation" | "" (not tested)


def _exact_signed_rank_p(nonzero: np.ndarray) -> float:
    """Exact two-sided p of the signed-rank sum, conditional on the observed (mid)ranks.

    Every one of the 2^n sign patterns is equally likely under the null; a dynamic program over
    doubled ranks (integers even with midranks) counts how many give each positive-rank sum.
    Without ties it equals scipy's exact distribution; with ties it stays exact, where scipy
    falls back to the normal approximation.
    """
    ranks2 = np.rint(2 * scipy.stats.rankdata(np.round(np.abs(nonzero), 12))).astype(np.int64)
    counts = np.zeros(int(ranks2.sum()) + 1)
    counts[0] = 1.0
    for r in ranks2:
        shifted = np.zeros_like(counts)
        shifted[r:] = counts[: len(counts) - r]
        counts = counts + shifted
    total, observed = ranks2.sum(), ranks2[nonzero > 0].sum()
    distance = np.abs(2 * np.arange(len(counts)) - total)  # |T+ - T-| in doubled units
    p = counts[distance >= abs(2 * observed - total)].sum() / counts.sum()
    return float(min(1.0, p))


def signed_rank_test(gains: np.ndarray | None) -> SignedRankTest:
    """Wilcoxon signed-rank test of paired gains with the zero method and the method stated.

    NaN p with fewer than 2 non-zero gains. Exact up to EXACT_MAX_N non-zero pairs: with 5
    non-zero pairs all positive, the exact p is 2/32 = 0.0625 where the normal approximation
    says 0.043.
    """
    g = np.asarray([] if gains is None else gains, dtype=float)
    nonzero = g[np.abs(g) > TIE_TOLERANCE]
    n, n_zero = int(nonzero.size), int(g.size - nonzero.size)
    if n < 2:
        return SignedRankTest(float("nan"), n, n_zero, "")
    if n <= EXACT_MAX_N:
        return SignedRankTest(_exact_signed_rank_p(nonzero), n, n_zero, "exact")
    res = scipy.stats.wilcoxon(nonzero, zero_method=ZERO_METHOD, method="asymptotic")
    return SignedRankTest(float(res.pvalue), n, n_zero, "normal approximation")


def wilcoxon_p(gains: np.ndarray) -> float:
    """Two-sided signed-rank p of paired gains (see `signed_rank_test`)."""
    return signed_rank_test(gains).p
