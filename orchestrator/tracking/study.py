"""MLflow as the study's view: the runs table grouped by arm, and the study on the parent run.

The runs table opens through a shared view state: an experiment tag `mlflow.sharedViewState.<key>`
holding its state (filter, columns, their order and widths, grouping) that MLflow's UI applies when the
URL carries `viewStateShareKey=<key>` (MLflow 3.x; what the UI's own "Share" button writes). It groups
the child runs by their `arm` tag (scheme, width, every hyperparameter: a grid's arms are never
pooled) and shows `outcome` first. `lottery ui` opens it through orchestrator/tracking/ui_server.py,
which keeps MLflow in its training view and gives each arm its own colour.

After `lottery aggregate`, the parent run carries the study: a description (the spec's question, the
setting, the per-arm table, the report's link, the stamp), the table as `summary/arms.json`, a few
`summary/<arm>/<statistic>` metrics, and tags `summary.fingerprint/trials/at` naming the trials the
numbers came from, so `lottery ui` can say when the sweep has moved on. The numbers are the
aggregate summary's (dashboards/stats.py), only formatted here.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from dashboards.setting import arm_text, setting_line
from dashboards.stats import BASELINE, never_acted
from orchestrator import layout
from orchestrator.aggregate import trials_fingerprint
from orchestrator.errors import UserError, one_line
from orchestrator.tracking.runs import flatten, log_batches

VIEW_TAG = "mlflow.sharedViewState."
NAME_COLUMN = "attributes.`Run Name`"  # the grid's id of the run-name column (not tags.mlflow.runName)
STUDY_COLUMNS = [  # what a row says, first to last: outcome first, so a lottery failure shows at a glance
    "tags.`outcome`",
    "tags.`arm`",
    "tags.`seed`",
    "metrics.`final_test_acc`",
    "metrics.`failed`",
    "metrics.`total_resets`",
    "attributes.`Source`",
]
# The runs table as the study reads it: child runs only, grouped by arm (scheme, width and every
# hyperparameter: a grid's arms are never pooled; failed averages into the failure rate).
RUNS_VIEW: dict[str, Any] = {
    "searchFilter": "tags.trial_key LIKE '%'",
    "orderByKey": "attributes.start_time",
    "orderByAsc": False,
    "selectedColumns": STUDY_COLUMNS,
    "columnOrder": [NAME_COLUMN, *STUDY_COLUMNS],  # MLflow applies a width only to a column listed here
    "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "arm"}]},
    # Run names are read whole, " [lottery-failed]" included; an arm's label too.
    "columnWidths": {NAME_COLUMN: 380, "tags.`arm`": 220},
    "runListHidden": False,
}
# Per arm on the parent run, as `summary/<arm>/<statistic>`: one chart section ("summary") after the
# runs' own metrics, a few charts per arm; the whole table is `summary/arms.json` and the description.
SUMMARY_METRICS = ("failure_rate", "failure_ci_low", "failure_ci_high", "acc_median", "acc_iqr")
SUMMARY = "summary"
ARMS_TABLE = f"{SUMMARY}/arms.json"
REPORT_FILE = f"{layout.REPORT}/report.html"  # the report as `lottery report` attaches it
STAMP_TAGS = ("summary.fingerprint", "summary.trials", "summary.at")


def spec_params(spec_doc: dict[str, Any]) -> dict[str, str]:
    """The spec as dotted params; lists as JSON (MLflow params are strings of at most 6000 chars)."""
    plain = {k: json.dumps(v) if isinstance(v, list) else v for k, v in spec_doc.items()}
    return {k: v[:6000] for k, v in flatten(plain).items()}


def log_spec_params(client: MlflowClient, run_id: str, spec: Any) -> None:
    """Every field of the sweep spec on its parent run (the run page read "Parameters (0)")."""
    params = [Param(k, v) for k, v in spec_params(spec.model_dump(mode="json")).items()]
    log_batches(client, run_id, params=params)


def arm_key(label: str) -> str:
    """An arm label as a metric-key part: 'randomout 8f P=1 tau=1e-08' -> 'randomout_8f_P1_tau1e-08'."""
    return re.sub(r"[^\w.\-]", "", label.replace(" ", "_"))


def arm_labels(client: MlflowClient, record: Any) -> dict[str, str]:
    """config_hash -> the `arm` tag of its child runs (one paged search), so the parent's table names
    each arm exactly as the runs table groups it."""
    found: dict[str, str] = {}
    token = None
    while True:
        page = client.search_runs(
            [record.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{record.parent_run_id}'",
            max_results=1000,
            page_token=token,
        )
        for run in page:
            tags = run.data.tags
            if "arm" in tags and "config_hash" in tags:
                found.setdefault(tags["config_hash"], tags["arm"])
        token = page.token
        if not token:
            return found


def _labels(summary: pd.DataFrame, known: dict[str, str]) -> list[str]:
    """Each summary row's arm: its runs' tag, else said from the row (no run logged yet)."""
    return [
        known.get(str(r.config_hash)) or arm_text(str(r.scheme), r.filters, r.hparams)
        for r in summary.itertuples(index=False)
    ]


def summary_metrics(summary: pd.DataFrame, labels: list[str]) -> list[Metric]:
    now = int(time.time() * 1000)
    metrics = []
    for row, label in zip(summary.itertuples(index=False), labels, strict=True):
        key = f"{SUMMARY}/{arm_key(label)}"
        metrics.append(Metric(f"{key}/n", float(row.n), now, 0))
        for stat in SUMMARY_METRICS:
            value = getattr(row, stat)
            if not pd.isna(value):
                metrics.append(Metric(f"{key}/{stat}", float(value), now, 0))
    return metrics


def _pct(value: object, digits: int = 1) -> str:
    return "-" if pd.isna(value) else f"{100 * float(value):.{digits}f}"  # type: ignore[arg-type]


def _interval(value: object, low: object, high: object, percent: bool) -> str:
    if pd.isna(value):
        return "-"
    text = _pct if percent else (lambda v: f"{float(v):.2f}")
    return f"{text(value)} [{text(low)}, {text(high)}]" if not pd.isna(low) else text(value)


def arms_table(
    summary: pd.DataFrame, labels: list[str], decision: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The per-arm table of the parent run (its description and `summary/arms.json`): the summary's own
    numbers (dashboards/stats.py) and the decision-grade ones (dashboards/decision.py), in percent and
    points, one row per arm."""
    decided = {} if decision is None else {str(d.config_hash): d for d in decision.itertuples(index=False)}
    rows = []
    for r, label in zip(summary.itertuples(index=False), labels, strict=True):
        d = decided.get(str(r.config_hash))
        base = r.scheme == BASELINE
        ci = f"{_pct(r.failure_rate)} [{_pct(r.failure_ci_low)}, {_pct(r.failure_ci_high)}]"
        test = "-" if base or pd.isna(r.wilcoxon_p) else f"{r.wilcoxon_p:.3g} (n={r.wilcoxon_n})"
        rows.append(
            {
                "arm": label,
                "n": int(r.n),
                "failed": int(r.n_failed),
                "fail % [95% CI]": ci if r.n else "-",
                "median %": _pct(r.acc_median, 2),
                "IQR %": _pct(r.acc_iqr, 2),
                "gain pts (median)": "baseline" if base else _pct(r.gain_median, 2),
                "better/tied/worse": "-" if base or not r.n_pairs else f"{r.n_better}/{r.n_tied}/{r.n_worse}",
                "Wilcoxon p": test,
                "IQM % [95% CI]": "-" if d is None else _interval(d.iqm, d.iqm_ci_low, d.iqm_ci_high, True),
                "P(better) [95% CI]": "-"
                if d is None or base
                else _interval(d.p_improve, d.p_improve_ci_low, d.p_improve_ci_high, False),
            }
        )
    return pd.DataFrame(rows)


def study_note(
    question: str, summary: pd.DataFrame, table: pd.DataFrame, stamp: dict[str, str], report_link: str
) -> str:
    """The parent run's description (markdown): the question, the setting, the per-arm table, the
    report, and when and from which trials the numbers were made."""
    head = "| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns)
    body = "\n".join("| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False))
    notes = "".join(f"**Note**: {line}\n\n" for line in never_acted(summary))
    return (
        f"**Question**: {question or 'not stated in the spec (add a description)'}\n\n"
        f"**Setting**: {setting_line(summary)}\n\n"
        "**Per arm** (failure rate with Wilson 95% CI; accuracies in %, gains in points, paired by seed "
        "against the reference arm; Wilcoxon signed-rank, two-sided; interquartile mean with a "
        "bootstrap CI; P(better): share of seed pairs the arm wins, ties counting 1/2):\n\n"
        f"{head}\n{body}\n\n"
        f"{notes}"
        f"**Report**: [{REPORT_FILE}]({report_link}) (after `lottery report`)\n\n"
        f"Summary of {stamp['summary.trials']} trials at {stamp['summary.at']} "
        f"(fingerprint `{stamp['summary.fingerprint']}`); `lottery aggregate` refreshes it, and `lottery ui` "
        "says when the sweep has moved on."
    )


def log_summary(
    record: Any,
    sweep_dir: Any,
    summary: pd.DataFrame,
    trials: pd.DataFrame,
    decision: pd.DataFrame | None = None,
) -> int:
    """The study on the parent run: summary metrics, the per-arm table (artifact and description) and
    the stamp of the trials it summarises; returns how many metrics were logged."""
    client = MlflowClient(tracking_uri=record.tracking_uri)
    labels = _labels(summary, arm_labels(client, record))
    metrics = summary_metrics(summary, labels)
    table = arms_table(summary, labels, decision)
    stamp = {
        "summary.fingerprint": trials_fingerprint(trials),
        "summary.trials": str(len(trials)),
        "summary.at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    question = str(layout.read_spec(layout.location(sweep_dir)).get("description") or "")
    link = f"{run_route(record.experiment_id, record.parent_run_id).split('?')[0]}/artifacts/{REPORT_FILE}"
    note = study_note(question, summary, table, stamp, link)
    client.log_table(record.parent_run_id, data=table, artifact_file=ARMS_TABLE)
    tags = [RunTag(k, v) for k, v in stamp.items()] + [RunTag("mlflow.note.content", note)]
    log_batches(client, record.parent_run_id, metrics=metrics, tags=tags)
    return len(metrics)


def stale_line(record: Any, trials: pd.DataFrame, sweep_dir: Any) -> str | None:
    """One line when the parent run's summary was made from other trials than the sweep's now (or
    there is none yet); None when it matches."""
    tags = MlflowClient(tracking_uri=record.tracking_uri).get_run(record.parent_run_id).data.tags
    stamp = tags.get("summary.fingerprint")
    if stamp == trials_fingerprint(trials):
        return None
    fix = f"run `lottery aggregate {sweep_dir}`"
    if stamp is None:
        return f"note: the parent run has no per-arm summary yet; {fix}"
    return (
        f"warning: the parent run's summary ({tags.get('summary.trials')} trials, {tags.get('summary.at')}) "
        f"no longer matches the sweep's {len(trials)} trials on disk; {fix}"
    )


def save_runs_view(client: MlflowClient, experiment_id: str) -> str:
    """Store RUNS_VIEW as the experiment's shared view state; returns its key (stable per content)."""
    value = json.dumps(RUNS_VIEW, sort_keys=True)
    key = hashlib.sha256(value.encode()).hexdigest()[:16]
    client.set_experiment_tag(experiment_id, f"{VIEW_TAG}{key}", value)
    return key


def experiment_route(experiment_id: str, view_key: str | None) -> str:
    """The experiment's runs page (a hash route of MLflow's app) in the training view, grouped."""
    query = {"workflowType": "machine_learning"} | ({"viewStateShareKey": view_key} if view_key else {})
    return f"#/experiments/{experiment_id}/runs?{urlencode(query)}"


def run_route(experiment_id: str, run_id: str) -> str:
    """A run's page (the parent's: the study) in the training view."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def refuse_busy_port(port: int, host: str = "127.0.0.1") -> None:
    """A busy port is a user mistake (another UI is already there): say so before starting anything."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            raise UserError(f"--port: {host}:{port} is already in use; pick another with --port") from None


def summary_to_parent(record: Any, sweep_dir: Any, tables: Any, console: Any) -> None:
    """The study (`log_summary`) on the parent run of `record` (a SweepRecord that
    tracking.sweep.parent_record has checked is the sweep's own), from aggregate's `tables`
    (summary and trials); a warning if that fails, saying the parent's numbers are now stale."""
    try:
        n = log_summary(record, sweep_dir, tables.summary, tables.trials, getattr(tables, "decision", None))
    except Exception as exc:  # the tables are on disk; a later `lottery aggregate` logs them again
        console.print(
            f"[yellow]tracking: summary not logged ({one_line(exc)}); the parent run's summary, if any, is "
            "from an earlier aggregate[/]",
            highlight=False,
        )
        return
    console.print(
        f"logged {n} per-arm summary metrics, {ARMS_TABLE} and the study description on run "
        f"{record.parent_run_id}",
        highlight=False,
        soft_wrap=True,
    )
