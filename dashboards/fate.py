"""The fate clock: by which step is the filter lottery drawn?

Each parent trial has, at each fork point k (a fraction of its training), M children that trained
its first k steps exactly as it did and then drew batches of their own (trainers/fork.py). If the
children of a parent agree with each other, whatever the batches after k, the outcome was settled by
k; if they scatter as widely as independent runs, it was not. Per arm and k the table gives:

- `unanimous`: the share of parents whose finished children all agree on failed / not failed;
- P(child fails | its parent failed) and P(child fails | its parent did not), each with a Wilson 95 %
  interval over the children (children of one parent are not independent, so the intervals are
  optimistic when M is large: the parents are the units, the counts say how many);
- the spread of children around their own parent's mean (pooled within-parent SD) next to the spread
  across parents: a drawn lottery shows a small first and a large second;
- the instability: the error barrier on the straight line between two children's final weights
  (trainers/instability.py), median and maximum over parents, in points.

A reset scheme that re-opens the lottery (RandomOut re-drawing a dead filter) shows as less
unanimity and more spread among its children at a late k than the baseline has.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dashboards.stats import wilson_interval
from trainers.config import SOURCE_SEEDS

PARENT = ("config_hash", "seed", *SOURCE_SEEDS)  # a parent within its arm; its children share these

FATE_COLUMNS: dict[str, str] = {
    "config_hash": "string",
    "scheme": "string",
    "hparam_label": "string",
    "fork_at": "float64",
    "n_parents": "int64",  # parents with at least 2 finished children at this k
    "n_children": "int64",  # their finished children
    "unanimous": "float64",  # share of those parents whose children agree on failed / not failed
    "n_parents_failed": "int64",
    "p_fail_after_failed": "float64",  # P(child fails | its parent failed)
    "p_fail_after_failed_low": "float64",  # Wilson 95 %
    "p_fail_after_failed_high": "float64",
    "p_fail_after_ok": "float64",  # P(child fails | its parent did not)
    "p_fail_after_ok_low": "float64",
    "p_fail_after_ok_high": "float64",
    "child_sd_pts": "float64",  # pooled SD of children around their parent's children's mean
    "parent_sd_pts": "float64",  # SD of the parents' own final accuracies
    "n_barriers": "int64",  # parents whose first two children's weights gave an instability
    "instability_median_pts": "float64",  # error barrier between two children, in points
    "instability_max_pts": "float64",
}


def empty_fate() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=d) for c, d in FATE_COLUMNS.items()})


def _key(frame: pd.DataFrame) -> pd.Series:
    """One hashable key per row from the PARENT columns (<NA> order/augment seeds included)."""
    return frame[list(PARENT)].astype("string").fillna("-").agg("|".join, axis=1)


def fate_table(
    parents: pd.DataFrame, children: pd.DataFrame, barriers: pd.DataFrame | None = None
) -> pd.DataFrame:
    """FATE_COLUMNS, one row per (arm, fork point). `barriers`: PARENT columns, fork_at, instability
    (a fraction of test error)."""
    done = children[children["status"] == "finished"]
    if done.empty:
        return empty_fate()
    parents = parents[parents["status"] == "finished"].assign(_key=_key)
    parent_failed = dict(zip(parents["_key"], parents["failed"].astype(bool), strict=True))
    parent_acc = dict(zip(parents["_key"], parents["final_test_acc"].astype(float), strict=True))
    done = done.assign(_key=_key(done))
    if barriers is not None and not barriers.empty:
        barriers = barriers.assign(_key=_key(barriers))
    rows = []
    for (config_hash, at), group in done.groupby(["config_hash", "fork_at"], sort=False):
        families = [
            (k, g) for k, g in group.groupby("_key", sort=False) if len(g) >= 2 and k in parent_failed
        ]
        failed_children = {True: [0, 0], False: [0, 0]}  # parent failed -> [children failed, children]
        unanimous, deviations, accs = 0, [], []
        for key, family in families:
            fails = family["failed"].astype(bool)
            unanimous += int(fails.all() or not fails.any())
            counts = failed_children[parent_failed[key]]
            counts[0] += int(fails.sum())
            counts[1] += len(fails)
            acc = family["final_test_acc"].astype(float).to_numpy()
            deviations.append(acc - acc.mean())
            accs.append(parent_acc[key])
        n_parents = len(families)
        within = np.concatenate(deviations) if deviations else np.array([])
        dof = len(within) - n_parents
        after_failed = _rate(*failed_children[True])
        after_ok = _rate(*failed_children[False])
        inst = _instabilities(barriers, config_hash, at)
        first = group.iloc[0]
        rows.append(
            {
                "config_hash": config_hash,
                "scheme": first["scheme"],
                "hparam_label": first["hparam_label"],
                "fork_at": at,
                "n_parents": n_parents,
                "n_children": sum(len(f) for _, f in families),
                "unanimous": unanimous / n_parents if n_parents else np.nan,
                "n_parents_failed": sum(parent_failed[k] for k, _ in families),
                **dict(
                    zip(
                        ("p_fail_after_failed", "p_fail_after_failed_low", "p_fail_after_failed_high"),
                        after_failed,
                        strict=True,
                    )
                ),
                **dict(
                    zip(
                        ("p_fail_after_ok", "p_fail_after_ok_low", "p_fail_after_ok_high"),
                        after_ok,
                        strict=True,
                    )
                ),
                "child_sd_pts": 100 * float(np.sqrt((within**2).sum() / dof)) if dof > 0 else np.nan,
                "parent_sd_pts": 100 * float(np.std(accs, ddof=1)) if len(accs) > 1 else np.nan,
                "n_barriers": len(inst),
                "instability_median_pts": 100 * float(np.median(inst)) if len(inst) else np.nan,
                "instability_max_pts": 100 * float(np.max(inst)) if len(inst) else np.nan,
            }
        )
    return (
        pd.DataFrame(rows, columns=list(FATE_COLUMNS))
        .astype(FATE_COLUMNS)
        .sort_values(["config_hash", "fork_at"], kind="stable", ignore_index=True)
    )


def _rate(failed: int, n: int) -> tuple[float, float, float]:
    low, high = wilson_interval(failed, n)
    return (failed / n if n else np.nan, low, high)


def _instabilities(barriers: pd.DataFrame | None, config_hash: str, at: float) -> np.ndarray:
    if barriers is None or barriers.empty:
        return np.array([])
    mine = barriers[(barriers["config_hash"] == config_hash) & np.isclose(barriers["fork_at"], at)]
    return mine["instability"].astype(float).dropna().to_numpy()
