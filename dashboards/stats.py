"""Seed statistics for a sweep: failure rates, spread and paired gains, with intervals.

Pure functions over the per-trial table (no I/O), so every number in the report can be
recomputed from `trials.parquet` alone and tested against hand-computed answers.

Conventions, chosen so that nothing disappears silently:
- only *finished* trials enter n, the failure rate and the accuracy statistics; errored,
  damaged (a trial file unreadable or failing its schema), incomplete and pending trials are
  counted in their own columns;
- a diverged trial is finished and failed; if its accuracy is not finite it is left out of
  the accuracy statistics (counted by `n_acc`), never replaced by a made-up value;
- a gain is paired by seed: accuracy of the trial minus accuracy of its reference trial with
  the same seed: the `baseline` trial with the same `pair_key`, or, for a trial that names a
  `reference_hash` (the IMP ticket control), the trial of that configuration (the rewound IMP).
  Accuracies are fractions, so gains are too.
- the paired test is the two-sided Wilcoxon signed-rank test with Wilcoxon's zero method: tied
  pairs (gain 0) are dropped and counted (`n_tied`), the test uses `wilcoxon_n` = the non-zero
  pairs, on the exact distribution of the signed-rank sum (midranks for tied |gains|) up to
  `EXACT_MAX_N` pairs and the normal approximation above; `wilcoxon_method` says which.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.stats

from dashboards.signed_rank import TIE_TOLERANCE, signed_rank_test
from trainers.config import RESETTING_SCHEMES, SOURCE_SEEDS

BASELINE = "baseline"
STATUSES: tuple[str, ...] = ("finished", "errored", "damaged", "incomplete", "pending")
NOT_FINISHED = STATUSES[1:]  # each counted as n_<status> per configuration; only finished trials enter n

# The per-trial table: one row per planned trial, whatever happened to it.
TRIAL_COLUMNS: dict[str, str] = {
    "trial_key": "string",
    "config_hash": "string",
    "pair_key": "string",
    "reference_hash": "string",  # config_hash of the arm a trial is compared with, when not the baseline
    "sweep": "string",
    "scheme": "string",
    "hparam_label": "string",
    "hparams": "string",  # canonical JSON (sorted keys) of the scheme's hyperparameters
    "setting": "string",  # canonical JSON of what else fixes the result: lr, optimizer, epochs, ...
    "model": "string",
    "dataset": "string",
    "filters": "Int64",
    "seed": "Int64",  # the init seed
    **dict.fromkeys(SOURCE_SEEDS, "Int64"),  # <NA> order/augment seed: the trial did not split it off
    "fork_at": "float64",  # a fate-clock child's fork point (NaN: not a child; trainers/fork.py)
    "fork_child": "Int64",
    "status": "string",  # one of STATUSES
    "final_test_acc": "float64",
    "best_test_acc": "float64",
    "final_train_acc": "float64",
    "failed": "bool",  # False unless finished
    "diverged": "bool",  # False unless finished
    "epochs_done": "Int64",
    "total_resets": "Int64",
    # Filters whose mean CGN over the trial's last epoch is below its tau (metrics.parquet's `dead`)
    "dead_filters": "Int64",
    "sparsity": "float64",  # share of conv/linear weights held at zero at the end (IMP, edge-popup)
    "chance": "float64",
    "failure_margin": "float64",
    "failure_rule": "string",
    "wall_s": "float64",  # of the whole pack the trial trained in
    "pack_size": "Int64",  # seeds trained at once with it (1 = alone)
    "seed_wall_s": "float64",  # wall_s / pack_size: its share of the pack's time, the one to compare
    "problem": "string",  # for a damaged trial: which file and what is wrong with it
    "test_correct": "string",  # final per-example correctness (trainers/correctness.py); "" if none
}

# The summary table: one row per config_hash (= everything but the seed).
SUMMARY_COLUMNS: dict[str, str] = {
    "config_hash": "string",
    "scheme": "string",
    "hparam_label": "string",
    "hparams": "string",  # every scheme hyperparameter, defaults included (canonical JSON)
    "setting": "string",  # lr, optimizer, epochs, batch, init, input scale, tau (canonical JSON)
    "pair_key": "string",
    "model": "string",
    "dataset": "string",
    "filters": "Int64",
    "failure_rule": "string",
    "reference": "string",  # what the gains are against: "baseline" or the reference arm's label
    "sparsity": "float64",  # median over finished trials
    "n_planned": "int64",
    "n": "int64",  # finished
    **{f"n_{status}": "int64" for status in NOT_FINISHED},
    "n_failed": "int64",
    "failure_rate": "float64",
    "failure_ci_low": "float64",  # Wilson 95%
    "failure_ci_high": "float64",
    "n_acc": "int64",  # finished trials with a finite final accuracy
    "acc_median": "float64",
    "acc_mean": "float64",
    "acc_std": "float64",  # ddof=1
    "acc_iqr": "float64",
    "acc_min": "float64",
    "acc_max": "float64",
    "std_ci_low": "float64",  # bootstrap 95% of acc_std
    "std_ci_high": "float64",
    "n_pairs": "int64",
    "gain_median": "float64",
    "gain_mean": "float64",
    "share_improved": "float64",  # share of pairs with gain > 0
    "n_better": "int64",  # pairs with gain > 0
    "n_tied": "int64",  # pairs with gain 0 (dropped by the test: ZERO_METHOD)
    "n_worse": "int64",  # pairs with gain < 0
    "wilcoxon_n": "int64",  # pairs the test used (n_better + n_worse)
    "wilcoxon_method": "string",  # "exact" or "normal approximation" ("" when not tested)
    "wilcoxon_p": "float64",  # two-sided signed-rank test of the paired gains
    "n_diverged": "int64",  # failed trials by kind (`failure_kind`): the loss was not finite
    "n_collapsed": "int64",  # at or below the majority-class accuracy
    "n_low": "int64",  # above it but within the failure margin
    "n_rescued": "int64",  # seed pairs whose reference failed and this arm did not
    "n_harmed": "int64",  # seed pairs where this arm failed and its reference did not
    "rescue_harm_p": "float64",  # exact two-sided McNemar p of rescued vs harmed (NaN: none discordant)
    "resets_median": "float64",  # filter resets per finished trial
    "n_reset": "int64",  # finished trials with at least one reset
    "dead_median": "float64",  # dead filters per finished trial (`dead_filters`), median and max
    "dead_max": "float64",
    "n_dead": "int64",  # finished trials with at least one dead filter
}

GAIN_COLUMNS: dict[str, str] = {
    "trial_key": "string",
    "config_hash": "string",
    "pair_key": "string",
    "seed": "Int64",
    "acc": "float64",
    "baseline_acc": "float64",
    "gain": "float64",
}


def trials_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows (dicts) as the per-trial table: every TRIAL_COLUMNS column typed, a missing one <NA>."""
    frame = pd.DataFrame.from_records(rows, columns=list(TRIAL_COLUMNS))
    for flag in ("failed", "diverged"):
        frame[flag] = frame[flag].fillna(False).astype(bool)
    for col, dtype in TRIAL_COLUMNS.items():
        if dtype == "float64":
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame.astype(TRIAL_COLUMNS)


def with_dead_filters(trials: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """`trials` with each trial's `dead_filters`: the `dead` count of its last recorded epoch (filters
    whose mean CGN over that epoch is below the trial's tau, in its units; trainers/cgn.py); NA where
    no epoch recorded it (a trial not started, or trained before the count existed)."""
    last = epochs.sort_values("epoch", kind="stable").drop_duplicates("trial_key", keep="last")
    dead = trials["trial_key"].map(last.set_index("trial_key")["dead"])
    return trials.assign(dead_filters=dead.astype("Int64"))


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes in n: honest near 0 and 1, unlike the Wald interval."""
    if n == 0:
        return (float("nan"), float("nan"))
    ci = scipy.stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def _sample_std(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.std(x, ddof=1, axis=axis)


def bootstrap_std_ci(
    values: np.ndarray | pd.Series | list[float],
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """BCa bootstrap interval of the sample std (ddof=1), deterministic for a given seed.

    The std is the paper's headline spread (2% vs 1.3%); with tens of seeds it is itself
    uncertain, and the interval says by how much.
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size < 3:
        return (float("nan"), float("nan"))
    if np.all(x == x[0]):  # every resample has std 0; BCa is undefined there
        return (0.0, 0.0)
    res = scipy.stats.bootstrap(
        (x,),
        _sample_std,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="BCa",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def _pair_with_reference(done: pd.DataFrame, value: str) -> pd.DataFrame:
    """Each trial of `done` that has a reference in `done`, with `value` and the same-seed reference's
    `value` as `reference_<value>`: the trial of configuration `reference_hash` where one is named,
    else the `baseline` trial of the same `pair_key`. Raises if a reference is ambiguous."""
    reference = done["reference_hash"] if "reference_hash" in done else pd.Series(pd.NA, index=done.index)
    named = reference.notna()
    is_base = (done["scheme"] == BASELINE) & ~named
    base = done.loc[is_base, ["pair_key", "seed", value]]
    if base.duplicated(["pair_key", "seed"]).any():
        raise ValueError("several baseline trials share a (pair_key, seed); cannot pair by seed")
    base = base.rename(columns={value: f"reference_{value}"})
    columns = ["trial_key", "config_hash", "pair_key", "seed", value]
    by_baseline = done.loc[~is_base & ~named, columns].merge(base, on=["pair_key", "seed"], how="inner")
    # An arm pools the cells of a seed factorial: its trial of the same seed is the one of the same
    # cell too (an unsplit trial's <NA> order/augment seeds match each other).
    unit = ["seed", *SOURCE_SEEDS]
    arms = done[["config_hash", *unit, value]].rename(
        columns={"config_hash": "reference_hash", value: f"reference_{value}"}
    )
    if arms.duplicated(["reference_hash", *unit]).any():
        raise ValueError("several trials share a (config_hash, seed, cell); cannot pair by seed")
    by_name = (
        done.loc[named, [*columns, *SOURCE_SEEDS, "reference_hash"]]
        .merge(arms, on=["reference_hash", *unit], how="inner")
        .drop(columns=["reference_hash", *SOURCE_SEEDS])
    )
    return pd.concat([by_baseline, by_name], ignore_index=True)


def paired_gains(trials: pd.DataFrame) -> pd.DataFrame:
    """Per finished trial that has a reference: its accuracy minus the same-seed reference's
    (GAIN_COLUMNS; the column `baseline_acc` holds the reference's accuracy).

    The reference is the trial of configuration `reference_hash` where one is named, else the
    `baseline` trial of the same `pair_key` (which pairs with every scheme of it). Pairs need a
    finite final accuracy on both sides. Raises if a reference is ambiguous (several trials).
    """
    done = trials[(trials["status"] == "finished") & np.isfinite(trials["final_test_acc"].astype(float))]
    merged = _pair_with_reference(done, "final_test_acc").rename(
        columns={"final_test_acc": "acc", "reference_final_test_acc": "baseline_acc"}
    )
    merged["gain"] = merged["acc"] - merged["baseline_acc"]
    return merged[list(GAIN_COLUMNS)].astype(GAIN_COLUMNS).reset_index(drop=True)


def failure_kind(failed: bool, diverged: bool, acc: float, chance: float) -> str:
    """How a finished trial failed: "diverged" (its loss was not finite), "collapsed" (at or below the
    majority-class accuracy: it predicts no better than one class), "low" (above that but within the
    failure margin); "" when it did not fail."""
    if not failed:
        return ""
    if diverged or not np.isfinite(acc):
        return "diverged"
    return "collapsed" if acc <= chance + TIE_TOLERANCE else "low"


def paired_failures(trials: pd.DataFrame) -> pd.DataFrame:
    """Per finished trial with a same-seed reference (diverged ones included): whether it failed and
    whether its reference did (`reference_failed`): a rescue is the reference failed and it did not,
    a harm the reverse."""
    done = trials[trials["status"] == "finished"]
    return _pair_with_reference(done, "failed")


def reference_label(trials: pd.DataFrame, group: pd.DataFrame) -> str:
    """What one configuration's gains are measured against, in words."""
    named = group["reference_hash"].dropna().unique() if "reference_hash" in group else []
    if len(named) == 0:
        return BASELINE
    ref = trials.loc[trials["config_hash"] == named[0], ["scheme", "hparam_label"]].head(1)
    if ref.empty:
        return f"config {named[0]} (not in this sweep)"
    scheme, label = ref["scheme"].iloc[0], ref["hparam_label"].iloc[0]
    return f"{scheme} {label}".strip() if isinstance(label, str) else str(scheme)


def _first_valid(column: pd.Series) -> object:
    valid = column.dropna()
    return valid.iloc[0] if len(valid) else pd.NA


def _identity(group: pd.DataFrame) -> dict[str, object]:
    keys = ("config_hash", "scheme", "hparam_label", "hparams", "setting", "pair_key", "model", "dataset")
    keys += ("filters",)
    row: dict[str, object] = {k: _first_valid(group[k]) for k in keys}
    finished_rules = group.loc[group["status"] == "finished", "failure_rule"].dropna().unique()
    rules = finished_rules if len(finished_rules) else group["failure_rule"].dropna().unique()
    row["failure_rule"] = "; ".join(sorted(str(r) for r in rules)) if len(rules) else pd.NA
    return row


def _counts(group: pd.DataFrame) -> dict[str, object]:
    status = group["status"]
    finished = status == "finished"
    n = int(finished.sum())
    n_failed = int(group.loc[finished, "failed"].sum())
    low, high = wilson_interval(n_failed, n)
    return {
        "n_planned": len(group),
        "n": n,
        **{f"n_{s}": int((status == s).sum()) for s in NOT_FINISHED},
        "n_failed": n_failed,
        "failure_rate": n_failed / n if n else float("nan"),
        "failure_ci_low": low,
        "failure_ci_high": high,
    }


def _accuracy(group: pd.DataFrame) -> dict[str, object]:
    acc = group.loc[group["status"] == "finished", "final_test_acc"].to_numpy(dtype=float)
    acc = acc[np.isfinite(acc)]
    if acc.size == 0:
        empty = dict.fromkeys(("acc_median", "acc_mean", "acc_std", "acc_iqr", "acc_min", "acc_max"), np.nan)
        return {"n_acc": 0, **empty, "std_ci_low": np.nan, "std_ci_high": np.nan}
    q25, q75 = np.percentile(acc, [25, 75])
    low, high = bootstrap_std_ci(acc)
    return {
        "n_acc": int(acc.size),
        "acc_median": float(np.median(acc)),
        "acc_mean": float(acc.mean()),
        "acc_std": float(acc.std(ddof=1)) if acc.size > 1 else np.nan,
        "acc_iqr": float(q75 - q25),
        "acc_min": float(acc.min()),
        "acc_max": float(acc.max()),
        "std_ci_low": low,
        "std_ci_high": high,
    }


def _gain_stats(gains: np.ndarray | None) -> dict[str, object]:
    test = signed_rank_test(gains)
    tested = {"wilcoxon_n": test.n, "wilcoxon_method": test.method, "wilcoxon_p": test.p}
    if gains is None or gains.size == 0:
        empty = {"gain_median": np.nan, "gain_mean": np.nan, "share_improved": np.nan}
        return {"n_pairs": 0, **empty, "n_better": 0, "n_tied": 0, "n_worse": 0, **tested}
    return {
        "n_pairs": int(gains.size),
        "gain_median": float(np.median(gains)),
        "gain_mean": float(gains.mean()),
        "share_improved": float((gains > TIE_TOLERANCE).mean()),
        "n_better": int((gains > TIE_TOLERANCE).sum()),
        "n_tied": test.n_zero,
        "n_worse": int((gains < -TIE_TOLERANCE).sum()),
        **tested,
    }


def summarise(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per config_hash (SUMMARY_COLUMNS), in order of first appearance in `trials`."""
    missing = set(TRIAL_COLUMNS) - set(trials.columns)
    if missing:
        raise ValueError(f"trials table lacks columns {sorted(missing)}")
    gains = paired_gains(trials)
    gains_by_config = {str(k): g["gain"].to_numpy(float) for k, g in gains.groupby("config_hash", sort=False)}
    failures = paired_failures(trials)
    failures_by_config = dict(iter(failures.groupby("config_hash", sort=False)))
    rows = []
    for config_hash, group in trials.groupby("config_hash", sort=False):
        g = gains_by_config.get(str(config_hash))
        finished = group["status"] == "finished"
        sparsity = group.loc[finished, "sparsity"].astype(float) if "sparsity" in group else pd.Series([])
        rows.append(
            {
                **_identity(group),
                "reference": reference_label(trials, group),
                "sparsity": float(sparsity.median()) if sparsity.notna().any() else np.nan,
                **_counts(group),
                **_accuracy(group),
                **_gain_stats(g),
                **_failure_kinds(group, failures_by_config.get(config_hash)),
                **_resets(group),
            }
        )
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS)).astype(SUMMARY_COLUMNS)


def _failure_kinds(group: pd.DataFrame, pairs: pd.DataFrame | None) -> dict[str, object]:
    done = group[group["status"] == "finished"]
    kinds = [
        failure_kind(bool(r.failed), bool(r.diverged), float(r.final_test_acc), float(r.chance))
        for r in done.itertuples(index=False)
    ]
    failed = pairs["failed"].astype(bool) if pairs is not None else pd.Series([], dtype=bool)
    reference = pairs["reference_failed"].astype(bool) if pairs is not None else pd.Series([], dtype=bool)
    return {
        "n_diverged": kinds.count("diverged"),
        "n_collapsed": kinds.count("collapsed"),
        "n_low": kinds.count("low"),
        "n_rescued": (rescued := int((reference & ~failed).sum())),
        "n_harmed": (harmed := int((failed & ~reference).sum())),
        "rescue_harm_p": rescue_harm_p(rescued, harmed),
    }


def rescue_harm_p(rescued: int, harmed: int) -> float:
    """Exact two-sided McNemar p: under no effect a discordant pair is a rescue or a harm with
    probability 1/2 each (binomial on the rescued + harmed pairs); NaN without discordant pairs."""
    n = rescued + harmed
    return float(scipy.stats.binomtest(rescued, n, 0.5).pvalue) if n else float("nan")


def _resets(group: pd.DataFrame) -> dict[str, object]:
    done = group[group["status"] == "finished"]
    resets, dead = (done[c].dropna().astype(float) for c in ("total_resets", "dead_filters"))
    return {
        "resets_median": float(resets.median()) if len(resets) else np.nan,
        "n_reset": int((resets > 0).sum()),
        "dead_median": float(dead.median()) if len(dead) else np.nan,
        "dead_max": float(dead.max()) if len(dead) else np.nan,
        "n_dead": int((dead > 0).sum()),
    }


def never_acted(summary: pd.DataFrame) -> list[str]:
    """One line per arm of a resetting scheme whose finished trials made no reset at all: it trained
    as its baseline did, so its gains are 0 by construction, not evidence that it does not help."""
    lines: list[str] = []
    if "n_reset" not in summary:  # a summary aggregated before resets were counted
        return lines
    for r in summary.itertuples(index=False):
        if r.scheme in RESETTING_SCHEMES and r.n > 0 and r.n_reset == 0:
            arm = f"{r.scheme} {'' if pd.isna(r.hparam_label) else r.hparam_label}".strip()
            lines.append(
                f"{arm} never reset a filter in {r.n} finished trial(s): its gains are 0 by construction "
                "(no filter fell below tau; choose a setting where filters die, from a pilot)"
            )
    return lines
