"""IMP's rounds: per configuration and round, sparsity, accuracy and the paired gain over the arm it
names as reference, from the epochs table's round_end rows (the per-trial summary is dashboards/stats.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dashboards.signed_rank import wilcoxon_p
from dashboards.stats import reference_label

# IMP rounds: one row per (configuration, round), from the epochs table's round_end rows.
ROUND_COLUMNS: dict[str, str] = {
    "config_hash": "string",
    "scheme": "string",
    "hparam_label": "string",
    "round": "int64",
    "reference": "string",  # the arm its gains are against ("" when it names none)
    "n": "int64",  # finished trials that reached the round
    "sparsity": "float64",  # median
    "acc_median": "float64",
    "acc_iqr": "float64",
    "n_pairs": "int64",
    "gain_median": "float64",  # this arm minus the reference at the same round and seed
    "share_improved": "float64",
    "wilcoxon_p": "float64",
}


def round_summary(trials: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """Per IMP configuration and round: sparsity and test accuracy over seeds, and the paired gain
    over the arm it names as reference (the ticket control against the rewound IMP), seed by seed
    at the same round. Only finished trials count, as in `summarise`."""
    if "round_end" not in epochs or epochs.empty:
        return pd.DataFrame({c: pd.Series(dtype=d) for c, d in ROUND_COLUMNS.items()})
    ends = epochs[(epochs["round_end"].fillna(False).astype(bool)) & (epochs["status"] == "finished")]
    refs = trials.drop_duplicates("config_hash").set_index("config_hash")["reference_hash"]
    by_arm = {key: g.set_index("seed")["test_acc"] for key, g in ends.groupby(["config_hash", "round"])}
    rows = []
    for (config_hash, round_), group in ends.groupby(["config_hash", "round"], sort=False):
        values = group["test_acc"].to_numpy(float)
        reference = refs.get(config_hash)
        gains = np.array([])
        label = ""
        if isinstance(reference, str):
            label = reference_label(trials, trials[trials["config_hash"] == config_hash])
            theirs = by_arm.get((reference, round_))
            if theirs is not None:
                paired = pd.concat(
                    [group.set_index("seed")["test_acc"], theirs], axis=1, join="inner"
                ).dropna()
                gains = (paired.iloc[:, 0] - paired.iloc[:, 1]).to_numpy(float)
        q25, q75 = np.percentile(values, [25, 75])
        rows.append(
            {
                "config_hash": config_hash,
                "scheme": group["scheme"].iloc[0],
                "hparam_label": group["hparam_label"].iloc[0],
                "round": int(round_),
                "reference": label,
                "n": len(values),
                "sparsity": float(group["sparsity"].median()),
                "acc_median": float(np.median(values)),
                "acc_iqr": float(q75 - q25),
                "n_pairs": int(gains.size),
                "gain_median": float(np.median(gains)) if gains.size else np.nan,
                "share_improved": float((gains > 0).mean()) if gains.size else np.nan,
                "wilcoxon_p": wilcoxon_p(gains),
            }
        )
    return pd.DataFrame(rows, columns=list(ROUND_COLUMNS)).astype(ROUND_COLUMNS)
