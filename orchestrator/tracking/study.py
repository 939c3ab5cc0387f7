"""MLflow as the study's view: the spec on the parent run, per-arm summaries, and a runs table
that opens grouped by scheme.

The parent run carries the spec's fields as params and, after `lottery aggregate`, each arm's
failure rate with its Wilson bounds, median and IQR as metrics (`<arm>/<statistic>`). `lottery ui`
opens the experiment in MLflow's classic (machine learning) view, through a shared view state: an
experiment tag `mlflow.sharedViewState.<key>` holding the runs table's state (filter, columns,
grouping) that MLflow's UI applies when the URL carries `viewStateShareKey=<key>` (MLflow 3.x;
it is what the UI's own "Share" button writes).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from typing import Any
from urllib.parse import urlencode

import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from orchestrator.errors import UserError, one_line
from orchestrator.tracking.runs import flatten, log_batches

VIEW_TAG = "mlflow.sharedViewState."
# The runs table as the study reads it: child runs only, grouped by scheme (failed averages into
# the failure rate), with scheme, seed, width, final accuracy and failed as columns.
RUNS_VIEW: dict[str, Any] = {
    "searchFilter": "tags.trial_key LIKE '%'",
    "orderByKey": "attributes.start_time",
    "orderByAsc": False,
    "selectedColumns": [
        "tags.`scheme`",
        "tags.`seed`",
        "tags.`hparams`",
        "params.`model.filters`",
        "metrics.`final_test_acc`",
        "metrics.`failed`",
        "metrics.`total_resets`",
        "attributes.`Source`",
    ],
    "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "scheme"}]},
    "columnWidths": {"tags.`mlflow.runName`": 330},  # run names are read whole: scheme, seed, width, hparams
    "runListHidden": False,
}
SUMMARY_METRICS = ("failure_rate", "failure_ci_low", "failure_ci_high", "acc_median", "acc_iqr", "acc_mean")


def spec_params(spec_doc: dict[str, Any]) -> dict[str, str]:
    """The spec as dotted params; lists as JSON (MLflow params are strings of at most 6000 chars)."""
    plain = {k: json.dumps(v) if isinstance(v, list) else v for k, v in spec_doc.items()}
    return {k: v[:6000] for k, v in flatten(plain).items()}


def log_spec_params(client: MlflowClient, run_id: str, spec: Any) -> None:
    """Every field of the sweep spec on its parent run (the run page read "Parameters (0)")."""
    params = [Param(k, v) for k, v in spec_params(spec.model_dump(mode="json")).items()]
    log_batches(client, run_id, params=params)


def arm_key(row: Any) -> str:
    """A metric-key-safe name of one summary row: 'randomout_tau1e-08_P1_f8'."""
    label = str(row.hparam_label or "").replace("=", "").replace(" ", "_")
    filters = "" if pd.isna(row.filters) else f"_f{row.filters}"
    return re.sub(r"[^\w.\-]", "", f"{row.scheme}{'_' + label if label else ''}{filters}")


def summary_metrics(summary: pd.DataFrame) -> list[Metric]:
    now = int(time.time() * 1000)
    metrics = []
    for row in summary.itertuples(index=False):
        key = arm_key(row)
        metrics.append(Metric(f"{key}/n", float(row.n), now, 0))
        for stat in SUMMARY_METRICS:
            value = getattr(row, stat)
            if not pd.isna(value):
                metrics.append(Metric(f"{key}/{stat}", float(value), now, 0))
    return metrics


def log_summary_metrics(tracking_uri: str, parent_run_id: str, summary: pd.DataFrame) -> int:
    """Per-arm summary metrics on the parent run; returns how many were logged."""
    client = MlflowClient(tracking_uri=tracking_uri)
    metrics = summary_metrics(summary)
    log_batches(client, parent_run_id, metrics=metrics)
    return len(metrics)


def save_runs_view(client: MlflowClient, experiment_id: str) -> str:
    """Store RUNS_VIEW as the experiment's shared view state; returns its key (stable per content)."""
    value = json.dumps(RUNS_VIEW, sort_keys=True)
    key = hashlib.sha256(value.encode()).hexdigest()[:16]
    client.set_experiment_tag(experiment_id, f"{VIEW_TAG}{key}", value)
    return key


def experiment_url(base: str, experiment_id: str, view_key: str | None) -> str:
    """The experiment's runs page in MLflow's machine-learning view (not the GenAI one), grouped."""
    query = {"workflowType": "machine_learning"} | ({"viewStateShareKey": view_key} if view_key else {})
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode(query)}"


def refuse_busy_port(port: int, host: str = "127.0.0.1") -> None:
    """A busy port is a user mistake (another UI is already there): say so before starting anything."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            raise UserError(f"--port: {host}:{port} is already in use; pick another with --port") from None


def summary_to_parent(record: Any, summary: pd.DataFrame, console: Any) -> None:
    """Per-arm summary metrics on the parent run of `record` (a SweepRecord that
    tracking.sweep.parent_record has checked is the sweep's own); a warning if that fails."""
    try:
        n = log_summary_metrics(record.tracking_uri, record.parent_run_id, summary)
    except Exception as exc:  # the tables are on disk; a later `lottery aggregate` logs them again
        console.print(f"[yellow]tracking: summary metrics not logged ({one_line(exc)})[/]", highlight=False)
        return
    console.print(f"logged {n} per-arm summary metrics on run {record.parent_run_id}")
