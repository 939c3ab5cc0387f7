"""Variance by source: how much of one arm's seed-to-seed spread of test accuracy comes from the initial
weights, the batch order, the augmentation draws, their interactions and run-to-run nondeterminism.

A trial carries one seed per source of randomness (`seed` for the weights, `order_seed`, `augment_seed`)
and a `replicate` index that repeats identical seeds. A spec expands a full factorial over them, so one
arm's trials form a crossed random-effects design: accuracy = mean + one effect per source level + the
interactions of the levels + the residual, all independent with variances to estimate (Bouthillier et
al. 2021, "Accounting for variance in machine learning benchmarks", split benchmark variance this way).

Estimator: the ANOVA (method-of-moments) estimators of a balanced design. Every subset T of the
varying sources has a mean square MS_T; in a crossed random design E[MS_T] = sigma_e^2 + sum over the
subsets U containing T of r * prod_{k not in U} a_k * sigma_U^2 (a_k levels of source k, r replicates
per cell), a triangular system solved for the sigma^2. Reported: each source's main effect, the
interactions pooled into one "interaction" component (their estimates summed) and, with replicates, the
within-cell variance as "nondeterminism". With one trial per cell nothing separates nondeterminism from
the highest interaction: that component is labelled as including it. The estimators are unbiased but
can be negative when a component is small; a negative estimate is reported as 0 (truncation, the
usual choice; it biases a near-zero component up slightly) and the shares are each component over the
sum of the reported components, so they add up to 100 %.

Missing cells (a trial that failed, diverged or never ran) break the balance the estimators need.
Rather than a likelihood fit, the design is cut to a balanced one: levels are dropped greedily, each
time the level (of a source or of the replicate index) with the most missing cells, until every cell
is present, and the rows say how many trials were used and how many left out. The largest balanced
sub-design is a hard combinatorial problem; the greedy cut keeps all levels for the usual case of a
few failed trials scattered over a large grid, losing one level per failure at most.

Intervals: the pigeonhole bootstrap for crossed designs (Owen 2007, "The pigeonhole bootstrap", Annals
of Applied Statistics 1(2)): each resample draws the levels of every varying source independently with
replacement and keeps the cells where the drawn levels cross, each with its replicates (a cell's
replicates are nested in it, not crossed); bias-corrected percentile intervals of each component
and share (`_interval`). When no
source varies the replicates are the only units and are resampled themselves. Owen shows this
bootstrap errs on the conservative side for a crossed mean; the coverage of the share intervals is
measured in tests/test_variance.py.

Beside the components each arm carries two floors: the nondeterminism SD (the within-cell SD, when
there are replicates) and the test-set floor (Jordan 2024: the accuracy SD that per-example coin flips
on a finite test set give, sqrt(sum_i p_i (1 - p_i)) / n; trainers/correctness.py). The floor is not a
component of its own: the test set's sampling shows up through whichever source moves a prediction.

Pure functions, pandas in and out, deterministic for a given bootstrap seed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.stats

from trainers.correctness import decode, finite_test_set_sd

SOURCES: tuple[str, ...] = ("seed", "order_seed", "augment_seed")  # weights, batch order, augmentation
REPLICATE = "replicate"
VALUE = "test_accuracy"
ARM = "arm"
INTERACTION = "interaction"
NONDETERMINISM = "nondeterminism"
CONFIDENCE = 0.95
N_BOOT = 1000
BOOTSTRAP_SEED = 0
CHUNK_VALUES = 4_000_000  # resampled accuracies held at once (32 MB of float64)
TITLE = "Variance by source"

VARIANCE_COLUMNS: dict[str, str] = {
    "arm": "string",
    "source": "string",  # a source column, "interaction" or "nondeterminism"
    "variance": "float64",  # the component, in accuracy^2 (accuracy as a fraction)
    "sd_pts": "float64",  # its square root in percentage points
    "sd_ci_low": "float64",  # bootstrap 95 % of sd_pts
    "sd_ci_high": "float64",
    "share_pct": "float64",  # component / sum of the arm's components, in %
    "share_ci_low": "float64",
    "share_ci_high": "float64",
    "n_levels": "Int64",  # levels of the source (cells for the interaction, replicates per cell)
    "n_trials": "int64",  # trials of the arm the estimate used (the balanced design)
    "n_dropped": "int64",  # trials of the arm left out (missing accuracy, or cut to balance the design)
    "note": "string",  # why a component is NaN, or what it includes
    "total_sd_pts": "float64",  # sqrt of the sum of the arm's components, in points
    "nondeterminism_sd_pts": "float64",  # within-cell SD across replicates (NaN: no replicates)
    "test_floor_sd_pts": "float64",  # the SD a finite test set alone gives (NaN: no correctness given)
    "test_floor_n": "int64",  # trials the test-set floor is computed from
}


def _subsets(k: int) -> list[tuple[int, ...]]:
    """Every non-empty subset of k axes, smallest first (main effects, then interactions)."""
    return [s for size in range(1, k + 1) for s in itertools.combinations(range(k), size)]


def _mean_squares(y: np.ndarray) -> np.ndarray:
    """Mean squares of a batch of balanced designs y (batch, a_1 .. a_K, r): one column per subset of
    the K axes (`_subsets` order), then the within-cell mean square when r > 1."""
    k, r = y.ndim - 2, y.shape[-1]
    sizes = y.shape[1:-1]
    cell = y.mean(axis=-1)
    axes = tuple(range(1, k + 1))
    columns = []
    for subset in _subsets(k):
        others = tuple(1 + a for a in range(k) if a not in subset)
        effect = cell.mean(axis=others, keepdims=True) if others else cell
        for a in subset:  # centre the marginal means along each axis of the subset: its effect alone
            effect = effect - effect.mean(axis=1 + a, keepdims=True)
        weight = r * math.prod(sizes[a] for a in range(k) if a not in subset)
        df = math.prod(sizes[a] - 1 for a in subset)
        columns.append(weight * (effect**2).sum(axis=axes) / df)
    if r > 1:  # deviations from the first replicate first, so identical replicates give exactly 0
        shifted = y - y[..., :1]
        within = ((shifted - shifted.mean(axis=-1, keepdims=True)) ** 2).sum(axis=axes + (k + 1,))
        columns.append(within / (math.prod(sizes) * (r - 1)))
    return np.stack(columns, axis=1)


def _expected_mean_squares(sizes: tuple[int, ...], r: int) -> np.ndarray:
    """C with E[MS] = C @ sigma^2 for a crossed random design (rows and columns as `_mean_squares`)."""
    subsets = _subsets(len(sizes))
    m = len(subsets) + (r > 1)
    c = np.zeros((m, m))
    for i, t in enumerate(subsets):
        for j, u in enumerate(subsets):
            if set(t) <= set(u):
                c[i, j] = r * math.prod(sizes[a] for a in range(len(sizes)) if a not in u)
    if r > 1:
        c[:, -1] = 1.0
    return c


def _components(y: np.ndarray) -> np.ndarray:
    """Reported components (batch, K mains [+ interaction] [+ nondeterminism]), truncated at 0."""
    k, r = y.ndim - 2, y.shape[-1]
    if k == 0:  # replicates only: the within-cell variance is all there is
        return _mean_squares(y)
    # Upper triangular (a subset's mean square holds only the components of its supersets): back
    # substitution, which keeps an exact 0 exact.
    sigma = scipy.linalg.solve_triangular(_expected_mean_squares(y.shape[1:-1], r), _mean_squares(y).T).T
    parts = [sigma[:, :k]]
    n_subsets = 2**k - 1
    if k > 1:
        parts.append(sigma[:, k:n_subsets].sum(axis=1, keepdims=True))
    if r > 1:
        parts.append(sigma[:, n_subsets:])
    return np.clip(np.concatenate(parts, axis=1), 0.0, None)


def _bootstrap(y: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Components of n_boot pigeonhole resamples of the design y (a_1 .. a_K, r)."""
    k, r = y.ndim - 1, y.shape[-1]
    per_chunk = max(1, CHUNK_VALUES // y.size)
    out = []
    for start in range(0, n_boot, per_chunk):
        b = min(per_chunk, n_boot - start)
        if k == 0:
            index: tuple[np.ndarray, ...] = (rng.integers(0, r, size=(b, r)),)
        else:
            index = tuple(
                rng.integers(0, n, size=(b, n)).reshape((b,) + (1,) * a + (n,) + (1,) * (k - a))
                for a, n in enumerate(y.shape[:-1])
            ) + (np.arange(r).reshape((1,) * (k + 1) + (r,)),)
        out.append(_components(y[index]))
    return np.concatenate(out, axis=0)


def _balanced(present: np.ndarray) -> list[np.ndarray]:
    """Per axis, the levels kept: levels are dropped greedily (the one with most missing cells, ties to
    the one holding fewer trials) until every remaining cell is present."""
    keep = [np.ones(n, dtype=bool) for n in present.shape]
    while True:
        sub = present[np.ix_(*keep)]
        if sub.size == 0 or sub.all():
            return keep
        best: tuple[int, int, int, int] | None = None  # (missing, -present, axis, level)
        for axis in range(sub.ndim):
            others = tuple(a for a in range(sub.ndim) if a != axis)
            have = sub.sum(axis=others)
            missing = sub.size // sub.shape[axis] - have
            level = int(np.lexsort((have, -missing))[0])
            candidate = (int(missing[level]), -int(have[level]), axis, level)
            if best is None or candidate[:2] > best[:2]:
                best = candidate
        assert best is not None
        _, _, axis, level = best
        kept = np.flatnonzero(keep[axis])
        keep[axis][kept[level]] = False


def _no_estimate(names: list[str], notes: dict[str, str], n_trials: int, n_dropped: int) -> dict:
    nan = float("nan")
    components = {
        name: {
            "variance": nan,
            "share": nan,
            "variance_ci": (nan, nan),
            "share_ci": (nan, nan),
            "n_levels": pd.NA,
            "note": notes.get(name, ""),
        }
        for name in names
    }
    return {"components": components, "n_trials": n_trials, "n_dropped": n_dropped, "replicates": 0}


def variance_components(
    frame: pd.DataFrame,
    sources: Sequence[str] = SOURCES,
    value: str = VALUE,
    replicate: str = REPLICATE,
    n_boot: int = N_BOOT,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> dict:
    """The variance components of ONE arm's trials, with pigeonhole-bootstrap intervals.

    Returns {"components": {name: {"variance", "share", "variance_ci", "share_ci", "n_levels", "note"}},
    "n_trials", "n_dropped", "replicates", "total"}: one component per source (in `sources` order), then
    "interaction" and "nondeterminism". Variances are in accuracy^2, shares fractions of the total.
    A source absent from the frame or with one level has NaN and says so in its note; so does every
    component when nothing varies. Rows whose `value` is not finite are left out (counted in
    n_dropped); rows without a `replicate` column are numbered in order within their cell. Two rows
    with the same seeds and replicate are refused (ValueError): the design is ambiguous.
    n_boot = 0 skips the intervals (NaN).
    """
    names = [*sources, INTERACTION, NONDETERMINISM]
    notes: dict[str, str] = {}
    finite = np.isfinite(pd.to_numeric(frame[value], errors="coerce").to_numpy(dtype=float))
    done = frame.loc[finite]
    varying = []
    for source in sources:
        if source not in done:
            notes[source] = "not in the table: no component"
        elif done[source].nunique(dropna=False) < 2:
            notes[source] = "one level: no spread to attribute"
        else:
            varying.append(source)
    codes = [pd.factorize(done[s], use_na_sentinel=False)[0] for s in varying]
    if replicate in done:
        rep = pd.factorize(done[replicate].fillna(0), sort=True, use_na_sentinel=False)[0]
    else:
        cell_key = pd.DataFrame(dict(enumerate(codes))) if codes else pd.DataFrame(index=range(len(done)))
        rep = (
            cell_key.groupby(list(cell_key.columns)).cumcount().to_numpy() if codes else np.arange(len(done))
        )
    shape = tuple(int(c.max()) + 1 for c in codes) + (int(rep.max()) + 1 if len(rep) else 0,)
    index = (*codes, rep)
    present = np.zeros(shape, dtype=bool)
    y = np.full(shape, np.nan)
    if len(done):
        flat = np.ravel_multi_index(index, shape)
        if len(np.unique(flat)) < len(flat):
            raise ValueError(
                f"several trials share the same {', '.join(varying) or 'seeds'} and {replicate}: "
                f"give repeated trials distinct `{replicate}` values"
            )
        present[index] = True
        y[index] = done[value].to_numpy(dtype=float)
    keep = _balanced(present)
    y = y[np.ix_(*keep)]
    n_trials = int(y.size)
    n_dropped = len(frame) - n_trials
    cut = f" ({n_dropped} trial(s) left out to balance the design)" if n_dropped else ""
    for source, kept in zip(list(varying), keep[:-1], strict=True):
        if kept.sum() < 2:
            notes[source] = f"one level left after balancing{cut}: no component"
    axes = [a for a, kept in enumerate(keep[:-1]) if kept.sum() >= 2]
    varying = [varying[a] for a in axes]
    y = y.reshape(tuple(y.shape[a] for a in axes) + (y.shape[-1],)) if n_trials else y
    k, r = len(varying), (y.shape[-1] if n_trials else 0)
    if k < 2:
        notes[INTERACTION] = "fewer than 2 sources vary: no interaction"
    if r < 2:
        confounded = INTERACTION if k > 1 else (varying[0] if k else "")
        notes[NONDETERMINISM] = f"no replicates: included in {confounded}" if k else "no replicates"
        if k:
            notes[confounded] = "includes nondeterminism (no replicates separate them)"
    if (k == 0 and r < 2) or n_trials == 0:
        notes.update({n: notes.get(n) or "nothing varies" for n in names})
        return _no_estimate(names, notes, n_trials, n_dropped) | {"total": float("nan")}
    estimated = [*varying, *([INTERACTION] if k > 1 else []), *([NONDETERMINISM] if r > 1 else [])]
    levels = [y.shape[a] for a in range(k)] + ([math.prod(y.shape[:k])] if k > 1 else []) + [r] * (r > 1)
    point = _components(y[None])[0]
    total = float(point.sum())
    boot = (
        _bootstrap(y, n_boot, np.random.default_rng(seed)) if n_boot > 0 else np.full((1, len(point)), np.nan)
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        boot_share = boot / boot.sum(axis=1, keepdims=True)
    result = _no_estimate(names, notes, n_trials, n_dropped) | {"replicates": r, "total": total}
    for i, name in enumerate(estimated):
        share = float(point[i] / total) if total > 0 else float("nan")
        result["components"][name].update(
            variance=float(point[i]),
            share=share,
            variance_ci=_interval(boot[:, i], float(point[i]), confidence),
            share_ci=_interval(boot_share[:, i], share, confidence),
            n_levels=int(levels[i]),
        )
    return result


def _interval(draws: np.ndarray, point: float, confidence: float) -> tuple[float, float]:
    """Bias-corrected percentile interval (Efron 1982; BCa without the acceleration, which would need
    a jackknife the crossed design does not have). A resample with duplicated levels sees less
    spread than the data, so the bootstrap distribution sits below the estimate; the correction
    moves the percentiles by how far (z0 = the normal quantile of the share of draws below it)."""
    finite = draws[np.isfinite(draws)]
    if finite.size == 0 or not np.isfinite(point):
        return (float("nan"), float("nan"))
    below = np.mean(finite < point) + 0.5 * np.mean(finite == point)
    z0 = scipy.stats.norm.ppf(np.clip(below, 1 / (finite.size + 1), finite.size / (finite.size + 1)))
    z = scipy.stats.norm.ppf(0.5 + confidence / 2)
    low, high = np.quantile(finite, scipy.stats.norm.cdf([2 * z0 - z, 2 * z0 + z]))
    return (float(low), float(high))


def _test_floor(arm: object, test_correct: Mapping | None) -> tuple[float, int]:
    """(test-set floor SD in points, trials it is computed from) from per-example correctness rows,
    given as bool arrays or as the encoded text of trainers/correctness.py."""
    raw = [] if test_correct is None else list(test_correct.get(arm, []))
    rows = [decode(r) if isinstance(r, str) else np.asarray(r, dtype=bool) for r in raw]
    rows = [r for r in rows if r is not None]
    return 100 * finite_test_set_sd(rows), len(rows)


def variance_by_source(
    frame: pd.DataFrame,
    sources: Sequence[str] = SOURCES,
    value: str = VALUE,
    replicate: str = REPLICATE,
    arm: str = ARM,
    test_correct: Mapping[object, Sequence[np.ndarray | str]] | None = None,
    n_boot: int = N_BOOT,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> pd.DataFrame:
    """One row per (arm, component) (VARIANCE_COLUMNS), arms in order of first appearance: each
    source, "interaction", "nondeterminism"; per arm the total SD, the nondeterminism floor and the
    test-set floor (from `test_correct`: arm -> its trials' per-example correctness) on every row."""
    rows = []
    for name, group in frame.groupby(arm, sort=False):
        result = variance_components(group, sources, value, replicate, n_boot, seed, confidence)
        parts = result["components"]
        floor, floor_n = _test_floor(name, test_correct)
        nondet = parts[NONDETERMINISM]["variance"]
        for source, part in parts.items():
            sd_low, sd_high = part["variance_ci"]
            share_low, share_high = part["share_ci"]
            rows.append(
                {
                    "arm": str(name),
                    "source": source,
                    "variance": part["variance"],
                    "sd_pts": 100 * math.sqrt(part["variance"]),
                    "sd_ci_low": 100 * math.sqrt(sd_low),
                    "sd_ci_high": 100 * math.sqrt(sd_high),
                    "share_pct": 100 * part["share"],
                    "share_ci_low": 100 * share_low,
                    "share_ci_high": 100 * share_high,
                    "n_levels": part["n_levels"],
                    "n_trials": result["n_trials"],
                    "n_dropped": result["n_dropped"],
                    "note": part["note"],
                    "total_sd_pts": 100 * math.sqrt(result["total"]),
                    "nondeterminism_sd_pts": 100 * math.sqrt(nondet),
                    "test_floor_sd_pts": floor,
                    "test_floor_n": floor_n,
                }
            )
    return pd.DataFrame(rows, columns=list(VARIANCE_COLUMNS)).astype(VARIANCE_COLUMNS)


def share_ci_width(
    frame: pd.DataFrame,
    source: str,
    sources: Sequence[str] = SOURCES,
    value: str = VALUE,
    replicate: str = REPLICATE,
    arm: str = ARM,
    n_boot: int = N_BOOT,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> float:
    """Width of the bootstrap interval of `source`'s share, as a fraction (0.1 = 10 points), widest over
    the arms (the frame without an `arm` column is one arm). NaN when any arm cannot estimate it, so a
    rule `width <= target` does not hold. The interval is a fixed-n one: a study that stops on it has
    intervals that are somewhat too narrow (no correction for the optional stopping)."""
    groups = frame.groupby(arm, sort=False) if arm in frame else [(None, frame)]
    widths = []
    for _, group in groups:
        part = variance_components(group, sources, value, replicate, n_boot, seed, confidence)["components"]
        if source not in part:
            raise ValueError(f"unknown component {source!r}: one of {', '.join(part)}")
        low, high = part[source]["share_ci"]
        widths.append(high - low)
    return float(max(widths)) if widths and np.all(np.isfinite(widths)) else float("nan")


def variance_display(table: pd.DataFrame) -> pd.DataFrame:
    """The table as text cells to print: SD and share with their intervals, the floors per arm."""

    def interval(v: float, low: float, high: float, digits: int) -> str:
        if pd.isna(v):
            return "-"
        return f"{v:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]" if pd.notna(low) else f"{v:.{digits}f}"

    def sd(v: float) -> str:
        return "-" if pd.isna(v) else f"{v:.2f}"

    return pd.DataFrame(
        {
            "arm": table["arm"],
            "source": table["source"],
            "SD pts [95% CI]": [
                interval(*v, 2) for v in zip(table.sd_pts, table.sd_ci_low, table.sd_ci_high, strict=True)
            ],
            "share % [95% CI]": [
                interval(*v, 1)
                for v in zip(table.share_pct, table.share_ci_low, table.share_ci_high, strict=True)
            ],
            "levels": table["n_levels"].astype("string").fillna("-"),
            "trials (left out)": [f"{n} ({d})" for n, d in zip(table.n_trials, table.n_dropped, strict=True)],
            "total SD pts": table["total_sd_pts"].map(sd),
            "nondet. SD pts": table["nondeterminism_sd_pts"].map(sd),
            "test-set floor SD pts": table["test_floor_sd_pts"].map(sd),
            "note": table["note"].fillna(""),
        }
    )


def format_variance_table(table: pd.DataFrame) -> str:
    """Plain text: the title "Variance by source" over `variance_display`."""
    return f"{TITLE}\n{variance_display(table).to_string(index=False)}"
