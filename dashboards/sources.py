"""The trials table to the "Variance by source" table: which arms split their seeds, and how.

An arm of a plain sweep varies its init seed alone, where the table would only restate the
summary's SD; the table is made for arms whose trials vary a second source (an order or augment
seed, or a replicate: `seeds: {init, order, ...}`, docs/seeds.md). The estimator and its intervals
are dashboards/variance.py's; this module picks the finished trials, names the arms as the other
tables do, and hands over each arm's per-example correctness for its test-set floor.
"""

from __future__ import annotations

import pandas as pd
from rich.table import Table

from dashboards.variance import TITLE as VARIANCE_TITLE
from dashboards.variance import VARIANCE_COLUMNS, variance_by_source, variance_display
from trainers.config import SOURCE_SEEDS

SOURCES: tuple[str, ...] = ("seed", *SOURCE_SEEDS[:-1])  # init, order, augment (the replicate aside)
REPLICATE = SOURCE_SEEDS[-1]
# How the table names each source: as the spec's `seeds: {init, order, augment}` does.
SOURCE_NAMES: dict[str, str] = {"seed": "init", "order_seed": "order", "augment_seed": "augment"}


def empty_variance() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=d) for c, d in VARIANCE_COLUMNS.items()})


def arm_labels(trials: pd.DataFrame) -> pd.Series:
    """config_hash -> "scheme hparams", with the hash's head where two arms would read alike."""
    first = trials.drop_duplicates("config_hash").set_index("config_hash")
    labels = (first["scheme"].astype(str) + " " + first["hparam_label"].fillna("").astype(str)).str.strip()
    alike = labels.duplicated(keep=False)
    return labels.where(~alike, labels + " (" + labels.index.str[:6] + ")")


def splits_seeds(group: pd.DataFrame) -> bool:
    """Whether an arm's trials vary anything besides the init seed."""
    return any(group[c].nunique(dropna=False) > 1 for c in SOURCE_SEEDS)


def variance_table(trials: pd.DataFrame, n_boot: int = 1000) -> pd.DataFrame:
    """VARIANCE_COLUMNS for every arm that splits its seeds (empty when none does); the `arm`
    column holds the arm's label. Finished trials only; a missing cell is dealt with as
    dashboards/variance.py says (the design is cut to a balanced one, and the rows say by how much)."""
    done = trials[trials["status"] == "finished"]
    arms = [h for h, g in done.groupby("config_hash", sort=False) if splits_seeds(g)]
    if not arms:
        return empty_variance()
    labels = arm_labels(trials)
    frame = done[done["config_hash"].isin(arms)].copy()
    frame["arm"] = frame["config_hash"].map(labels)
    frame["test_accuracy"] = frame["final_test_acc"].astype(float)
    for column in (*SOURCES, REPLICATE):  # an unsplit source is one level: <NA> everywhere
        frame[column] = frame[column].astype("Int64").fillna(-1).astype("int64")
    correct = {
        arm: [c for c in group["test_correct"].dropna() if c]
        for arm, group in frame.groupby("arm", sort=False)
    }
    table = variance_by_source(frame, SOURCES, replicate=REPLICATE, test_correct=correct, n_boot=n_boot)
    return table.assign(source=table["source"].replace(SOURCE_NAMES))


def format_variance_table(variance: pd.DataFrame) -> Table:
    """Variance by source: per arm that splits its seeds, each source's SD and share of the variance."""
    table = Table(
        title=f"{VARIANCE_TITLE} (SD of final test accuracy in points; share of the variance, "
        "pigeonhole bootstrap 95% CI)",
        caption=(
            "Two-way (or more) crossed random-effects ANOVA per arm, components truncated at 0 "
            "(docs/statistics.md). nondet.: the SD across identical replicates. Test-set floor: the SD the "
            "finite test set alone gives (sqrt(sum p_i(1-p_i)) / n from the seeds' per-example correctness)."
        ),
        caption_justify="left",
    )
    display = variance_display(variance)
    for column in display.columns:
        table.add_column(column, justify="left" if column in ("arm", "source", "note") else "right")
    for row in display.itertuples(index=False):
        table.add_row(*map(str, row))
    return table


def variance_share_look(
    trials: pd.DataFrame, source: str, width: float, n_boot: int = 1000
) -> list[dict[str, object]]:
    """One sequential look per arm (dashboards.sequential.LOOK_COLUMNS): `source`'s share of the
    variance with its bootstrap interval, met when the interval is at most `width` wide. An arm
    that cannot estimate the share yet (too few levels) has not met it."""
    table = variance_table(trials, n_boot=n_boot)
    labels = arm_labels(trials)
    rows = []
    for config_hash, group in trials.groupby("config_hash", sort=False):
        first = group.iloc[0]
        mine = table[(table["arm"] == labels[config_hash]) & (table["source"] == source)]
        share = mine["share_pct"].iloc[0] / 100 if len(mine) else float("nan")
        low = mine["share_ci_low"].iloc[0] / 100 if len(mine) else float("nan")
        high = mine["share_ci_high"].iloc[0] / 100 if len(mine) else float("nan")
        met = bool(pd.notna(low) and pd.notna(high) and high - low <= width)
        rows.append(
            {
                "config_hash": config_hash,
                "scheme": first["scheme"],
                "hparam_label": first["hparam_label"],
                "statistic": f"{source}_share",
                "n": int(mine["n_trials"].iloc[0]) if len(mine) else 0,
                "estimate": share,
                "cs_low": low,
                "cs_high": high,
                "met": met,
                "verdict": f"width {high - low:.3f} {'<=' if met else '>'} {width:g}"
                if pd.notna(low)
                else "not estimable yet",
            }
        )
    return rows
