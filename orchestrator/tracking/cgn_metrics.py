"""Per-layer CGN summary curves as MLflow metrics, so MLflow's own charts compare runs.

The per-filter picture (dashboards/cgn_figure.py) shows one run; to put runs side by side MLflow needs
metrics. Per layer and epoch, over the filters' epoch-mean CGN (the trace's step -1 rows): the median
(how the layer's typical filter learns) and the minimum (how close its weakest filter is to tau, or
dead at 0), logged as `cgn/<layer>/median` and `cgn/<layer>/min` at step = epoch.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from mlflow.entities import Metric

PREFIX = "cgn"
STATISTICS = ("median", "min")
_UNSAFE = re.compile(r"[^0-9A-Za-z_.\- ]")  # what MLflow refuses in a metric key (besides "/")


def metric_name(layer: str, statistic: str) -> str:
    """'cgn/features.0/median': a layer name reduced to the characters MLflow accepts in a key."""
    return f"{PREFIX}/{_UNSAFE.sub('_', layer)}/{statistic}"


def cgn_metrics(trace: pd.DataFrame, stamps: dict[int, int], default_stamp: int) -> list[Metric]:
    """The curves of one trial's trace; `stamps`: epoch -> the ms its epoch metrics carry."""
    rows = trace[trace["step"] == -1] if "step" in trace else trace
    if rows.empty:
        return []
    grouped = rows.groupby(["layer", "epoch"], sort=True)["cgn"]
    table = pd.DataFrame({"median": grouped.median(), "min": grouped.min()})
    metrics = []
    for (layer, epoch), values in table.iterrows():
        stamp = stamps.get(int(epoch), default_stamp)
        for statistic in STATISTICS:
            value = float(values[statistic])
            if np.isfinite(value):
                metrics.append(Metric(metric_name(str(layer), statistic), value, stamp, int(epoch)))
    return metrics
