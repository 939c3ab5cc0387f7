"""Each failed seed beside the same seed under the arms it is paired with.

A failure rate says how often an arm fails; whether a scheme rescues a seed the baseline loses (or
loses one the baseline keeps) is read seed by seed. Seeds pair within one context (model, dataset,
width: a `pair_key`), so the table has one row per (context, seed) where any arm failed, and a column
per arm of that context: the seed's final accuracy there, marked when it failed.
"""

from __future__ import annotations

import html

import pandas as pd

from dashboards.figures import arm_label

MAX_ROWS = 200  # a sweep with more failed seeds lists the first ones and says how many it left out


def failed_seed_rows(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (context, seed) with a failure: `context`, `seed` and per arm `(accuracy, failed)`
    (None where the arm has no finished trial of that seed in that context)."""
    done = trials[trials["status"] == "finished"].copy()
    if done.empty:
        return pd.DataFrame(columns=["pair_key", "context", "seed"])
    done["arm"] = [arm_label(s, h) for s, h in zip(done["scheme"], done["hparam_label"], strict=True)]
    arms = list(dict.fromkeys(done["arm"]))
    failed = done.loc[done["failed"], ["pair_key", "seed"]].drop_duplicates()
    rows = []
    for key, seed in failed.itertuples(index=False):
        same = done[(done["pair_key"] == key) & (done["seed"] == seed)]
        first = same.iloc[0]
        width = "" if pd.isna(first["filters"]) else f", {first['filters']} filters"
        row: dict[str, object] = {
            "pair_key": key,
            "context": f"{first['model']}, {first['dataset']}{width}",
            "seed": int(seed),
        }
        for arm in arms:
            mine = same[same["arm"] == arm]
            row[arm] = (
                None if mine.empty else (float(mine["final_test_acc"].iloc[0]), bool(mine["failed"].iloc[0]))
            )
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["pair_key", "context", "seed", *arms])
    return frame.sort_values(["context", "seed"], kind="stable").reset_index(drop=True)


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "<td>–</td>"
    acc, failed = value  # type: ignore[misc]
    number = "diverged" if pd.isna(acc) else f"{100 * acc:.1f}"
    if failed:
        return f"<td class=failed>{number} failed</td>"
    return f"<td>{number}</td>"


def failed_seeds_html(trials: pd.DataFrame) -> str:
    """The table as HTML (in a scrolling wrapper), or a sentence when no seed failed."""
    rows = failed_seed_rows(trials)
    if rows.empty:
        return "<p id=failed-seeds>No finished seed failed.</p>"
    arms = [c for c in rows.columns if c not in ("pair_key", "context", "seed")]
    head = "<tr><th class=l>context</th><th>seed</th>" + "".join(
        f"<th>{html.escape(arm)}<br>final acc %</th>" for arm in arms
    )
    body = "".join(
        f"<tr><td class=l>{html.escape(str(r['context']))}</td><td>{r['seed']}</td>"
        + "".join(_cell(r[arm]) for arm in arms)
        + "</tr>"
        for _, r in rows.head(MAX_ROWS).iterrows()
    )
    more = len(rows) - MAX_ROWS
    note = f"<p class=note>{more} more seeds with a failure are not listed.</p>" if more > 0 else ""
    return (
        "<p class=note>Each seed that failed under some arm, with the same seed (same data order and "
        "initial draw) under every arm of its context: its final test accuracy, marked where it "
        "failed; – where that arm has no finished trial of the seed.</p>"
        f"<div class=scroll><table id=failed-seeds>{head}</tr>{body}</table></div>{note}"
    )
