"""MLflow, second: every run is built from a finished (or errored) trial directory.

Because the trial directory is complete before anything is sent, logging is
idempotent and replayable: `log_trial` finds a run by its `trial_key` tag and
only creates what is missing, which is all `lottery sync` needs after an
outage. A trial's run costs three tracking-store requests however many values
it has (the run with its tags; one `log_batch` of params, metrics and the
"logged" tag per 1,000 values; its end) plus one upload per artifact file;
never one call per value.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# A dead tracking server should cost seconds, not MLflow's default of minutes (7 retries, 120 s timeout).
for _key, _value in {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # two "View run" lines per run on a server
}.items():
    os.environ.setdefault(_key, _value)

import pandas as pd  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from orchestrator import layout  # noqa: E402
from orchestrator.errors import UserError  # noqa: E402
from orchestrator.tracking.cgn_metrics import cgn_metrics  # noqa: E402
from orchestrator.tracking.names import arm, grid_axes, outcome, run_name  # noqa: E402
from orchestrator.tracking.source import source_tags  # noqa: E402
from trainers.config import FORK_FIELDS, SOURCE_SEEDS  # noqa: E402
from trainers.events import EPOCH_COLUMNS, RESULT_METRICS  # noqa: E402

EPOCH_METRICS = tuple(name for name, column in EPOCH_COLUMNS.items() if column.per_epoch)
# IMP: one point per round (step = round) at the round's last epoch that counts (metrics.parquet round_end).
ROUND_METRICS = {name: column.per_round for name, column in EPOCH_COLUMNS.items() if column.per_round}
BATCH = 1000  # MLflow's per-request limit on metrics, and on params, metrics and tags together
BATCH_PARAMS = 100  # ... on params (and on tags)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the classic runs view


def default_tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI if set, else an embedded sqlite store beside the results."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{layout.tracking_db(root).resolve()}"


def refuse_password(uri: str, source: str) -> str:
    """A tracking URI is printed, kept in sweep.json and spec.json and sent to the cluster: no secrets in it.

    Credentials come from the environment only: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
    for a server, PGPASSWORD or ~/.pgpass for a database URI.
    """
    if urlsplit(uri).password is not None:
        raise UserError(
            f"{source}: the tracking URI carries a password; remove it and set MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD (a database URI: PGPASSWORD or ~/.pgpass) instead"
        )
    return uri


def client_for(tracking_uri: str) -> MlflowClient:
    """A client bound to one store, leaving the process-wide URI alone.

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI, so a second sweep in the same
    process, or any subprocess it starts, would log into the first sweep's store.
    """
    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Path | None = None) -> str:
    """Create once, in the driver: trials racing to create a store or experiment corrupt sqlite."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if artifact_root is not None and not client.tracking_uri.startswith("http"):
        location = (artifact_root / name).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def find_runs(client: MlflowClient, experiment_id: str, **tags: str) -> list:
    clause = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    return client.search_runs([experiment_id], filter_string=clause, max_results=1000)


PROVENANCE = (
    "device",
    "pack_key",
    "pack_size",
    "threads",
    "data_fingerprint",
    "builder",
    "builder_sha256",
    "parameters",
)


def flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> dotted params (MLflow rejects nested values)."""
    flat: dict[str, str] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = str(value)
    return flat


def log_batches(
    client: MlflowClient,
    run_id: str,
    params: Sequence[Param] = (),
    metrics: Sequence[Metric] = (),
    tags: Sequence[RunTag] = (),
) -> None:
    """Params, metrics and tags in as few `log_batch` requests as MLflow's limits allow.

    Each request is a store transaction (a server round trip); the tags ride in the last, so a tag
    that marks the run complete lands with, never before, its final metrics.
    """
    for batch_params, batch_metrics, batch_tags in _batches(list(params), list(metrics), list(tags)):
        client.log_batch(run_id, metrics=batch_metrics, params=batch_params, tags=batch_tags)


def _batches(
    params: list[Param], metrics: list[Metric], tags: list[RunTag]
) -> list[tuple[list[Param], list[Metric], list[RunTag]]]:
    if len(tags) > BATCH_PARAMS:
        raise ValueError(f"at most {BATCH_PARAMS} tags per batch")
    batches: list[tuple[list[Param], list[Metric], list[RunTag]]] = []
    while params or metrics:
        take_params, params = params[:BATCH_PARAMS], params[BATCH_PARAMS:]
        room = BATCH - len(take_params)
        take_metrics, metrics = metrics[:room], metrics[room:]
        batches.append((take_params, take_metrics, []))
    if batches and len(batches[-1][0]) + len(batches[-1][1]) + len(tags) <= BATCH:
        batches[-1] = (batches[-1][0], batches[-1][1], tags)
    elif tags:
        batches.append(([], [], tags))
    return batches


def _epoch_metrics(trial_dir: Path, start_ms: int, share: float = 1.0) -> list[Metric]:
    """Per-epoch metrics stamped at each epoch's end (start + cumulative epoch wall time, times `share`:
    a packed seed's run lasts its share of the pack's time, so its epochs end within it)."""
    path = trial_dir / layout.METRICS
    if not path.exists():
        return []
    rows = sorted(layout.read_table(path).to_pylist(), key=lambda row: row["epoch"])
    metrics, wall = [], 0.0
    for row in rows:
        wall += _number(row.get("wall_s"))
        step, stamp = int(row["epoch"]), start_ms + int(1000 * wall * share)
        for key in EPOCH_METRICS:
            if key in row:
                metrics.append(Metric(key, _value(row[key]), stamp, step))
        if _flag(row.get("round_end")):
            for key, name in ROUND_METRICS.items():
                metrics.append(Metric(name, _value(row[key]), stamp, int(row["round"])))
    return metrics


def _value(value: object) -> float:
    """A Parquet cell as a metric value: a null (a column this row does not have) is NaN."""
    return float("nan") if value is None else float(value)  # type: ignore[arg-type]


def _number(value: object) -> float:
    number = _value(value)
    return 0.0 if math.isnan(number) else number


def _flag(value: object) -> bool:
    return value is not None and value == value and bool(value)  # None and NaN are not set


def run_times(trial_dir: Path, result: dict[str, Any] | None) -> tuple[int, int]:
    """(start, end) in ms of the trial itself, not of its logging.

    A result: it ended when result.json was written (`result_end_ms`) and started its own time
    before: `seed_wall_s`, its share of its pack's time, so run durations compare schemes, not how
    seeds were packed (the pack's own time is the run's `pack_wall_s` tag). An error: from the first
    attempt's start to the error.
    """
    if result is not None:
        end = result_end_ms(trial_dir, result)
        return end - int(1000 * seed_wall_s(result)), end
    end = (trial_dir / layout.ERROR).stat().st_mtime
    attempts = trial_dir / layout.ATTEMPTS
    lines = attempts.read_text().splitlines() if attempts.exists() else []
    start = float(json.loads(lines[0]).get("started", end)) if lines else end
    return int(1000 * start), int(1000 * end)


def seed_wall_s(result: dict[str, Any]) -> float:
    """The seed's own time; the pack's where the share was not recorded (orchestrator/formats.py)."""
    own = result.get("seed_wall_s")
    return float(result["wall_s"] if own is None else own)


def result_end_ms(trial_dir: Path, result: dict[str, Any]) -> int:
    """When the result was written, in ms: the end time of its run, so a FINISHED run whose end differs
    was logged from an earlier result of the same trial (one trained again after damage)."""
    return int(1000 * _ended_at(trial_dir, result))


def _ended_at(trial_dir: Path, result: dict[str, Any]) -> float:
    """`ended_at`, or the file's modification time where it was not recorded (orchestrator/formats.py)."""
    ended_at = result["ended_at"]
    return float(ended_at if ended_at is not None else (trial_dir / layout.RESULT).stat().st_mtime)


def failure_note(result: dict[str, Any]) -> str:
    """The run description of a lottery-failed trial: what failed and by which rule."""
    reason = (
        "the loss diverged" if result["diverged"] else f"final test accuracy {result['final_test_acc']:.4f}"
    )
    return f"**Lottery failure**: {reason}. Rule: {result['failure_rule']}."


def _log_cgn_figure(
    client: MlflowClient, run_id: str, trial_dir: Path, title: str, hparams: dict[str, Any] | None
) -> None:
    """The trial's own drawing if it made one (trials draw it: see orchestrator/run/trial.py), else
    drawn here from the trace (directories written before trials drew it, or whose drawing failed)."""
    if (trial_dir / layout.CGN_FIGURE).exists():
        with layout.local_copy(trial_dir / layout.CGN_FIGURE) as local:
            client.log_artifact(run_id, str(local))
        return
    path = trial_dir / layout.TRACE
    if not path.exists():
        return
    from dashboards.cgn_figure import filter_cgn_figure, scheme_tau  # matplotlib only when there is a trace

    source, filesystem = layout.parquet_source(path)
    trace = pd.read_parquet(source, filesystem=filesystem)
    if trace.empty:  # a net without convs: no filter to draw
        return
    figure = filter_cgn_figure(trace, title, tau=scheme_tau(hparams))
    client.log_figure(run_id, figure, layout.CGN_FIGURE)


def _cgn_curves(trial_dir: Path, epoch_metrics: list[Metric], start_ms: int) -> list[Metric]:
    """Per-layer CGN median and min per epoch (orchestrator/tracking/cgn_metrics.py), stamped as the
    epoch's other metrics; none without a trace."""
    path = trial_dir / layout.TRACE
    if not path.exists():
        return []
    source, filesystem = layout.parquet_source(path)
    columns = ["epoch", "step", "layer", "cgn"]
    trace = pd.read_parquet(source, filesystem=filesystem, columns=columns, filters=[("step", "==", -1)])
    stamps = {m.step: m.timestamp for m in epoch_metrics if m.key == "test_acc"}
    return cgn_metrics(trace, stamps, start_ms)


@functools.lru_cache(maxsize=8)
def _sweep_axes(sweep_dir: str) -> tuple[str, ...]:
    """What the sweep's grid varies besides width and scheme hyperparameters (its spec.json, read once
    per logging process); none for a trial outside a sweep (`lottery train`)."""
    try:
        return tuple(grid_axes(layout.read_spec(layout.location(sweep_dir))))
    except (FileNotFoundError, ValueError):
        return ()


def log_trial(
    client: MlflowClient,
    experiment_id: str,
    trial_dir: Path,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str | None:
    """Create (or complete) the MLflow run of one trial directory; returns its run id.

    Returns None for a trial that has neither a result nor an error yet, or is damaged (nothing to
    log). A run left unfinished by an interrupted earlier attempt is deleted and logged again in
    full, so each trial key ends with exactly one run carrying its whole metric history. A complete
    run of an earlier result (the trial was trained again after damage) is superseded (see
    `supersede`) once the new result's run exists.
    """
    trial = layout.trial_status(trial_dir)
    if not (trial.finished or trial.errored):
        return None
    meta = layout.read_json(trial_dir / layout.CONFIG)
    result = trial.result
    status = "FINISHED" if trial.finished else "FAILED"
    end = result_end_ms(trial_dir, result) if result is not None else None
    current, earlier = None, []
    for run in find_runs(client, experiment_id, trial_key=meta["trial_key"]):
        complete = run.data.tags.get("logged") == "complete"
        if complete and run.info.status == status and (end is None or run.info.end_time == end):
            current = current or run.info.run_id
        elif complete and run.info.status == "FINISHED" and end is not None:
            earlier.append(run.info.run_id)  # this trial's earlier result
        else:
            client.delete_run(run.info.run_id)
    if current is not None:
        supersede(client, earlier, current)
        return current

    run_tags = {
        "trial_key": meta["trial_key"],
        "config_hash": meta["config_hash"],
        "pair_key": meta["pair_key"],
        "sweep": meta["sweep"],
        "scheme": meta["scheme"],
        "seed": str(meta["seed"]),
        "data_seed": str(meta["data_seed"]),
        "model": meta["model"],
        "dataset": meta["dataset"],
        "hparams": meta["hparam_label"] or "default",
        "arm": arm(meta, _sweep_axes(str(trial_dir.parent.parent))),  # what the runs table groups by
        "outcome": outcome(result),
    } | (tags or {})
    # Seeds split by source and a fate-clock child's fork point: tagged where set (docs/seeds.md).
    run_tags |= {k: str(meta[k]) for k in (*SOURCE_SEEDS, *FORK_FIELDS) if meta.get(k) not in (None, 0)}
    if meta.get("fork_at") is not None:  # a child sits in its own group, apart from the lottery's runs
        run_tags["arm"] = f"{run_tags['arm']} fork@{meta['fork_at']:g}"
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    if result is not None:
        run_tags |= {"failed": str(result["failed"]).lower(), "diverged": str(result["diverged"]).lower()}
        run_tags["failure_rule"] = result["failure_rule"]
        # Outside the trial key but changes its exact numbers (None, "" or no device where not recorded).
        for name in PROVENANCE:
            if result.get(name) not in (None, ""):
                run_tags[name] = str(result[name])
        run_tags["pack_wall_s"] = f"{float(result['wall_s']):.3f}"  # the time it shared with its pack
        if result["failed"]:
            run_tags["mlflow.note.content"] = failure_note(result)
    run_tags = source_tags() | run_tags
    start_ms, end_ms = run_times(trial_dir, result)
    title = run_name(meta, result)
    run = client.create_run(experiment_id, start_time=start_ms, run_name=title, tags=run_tags)
    run_id = run.info.run_id
    params = [Param(k, v[:6000]) for k, v in flatten(meta["trial"]).items()]
    share = seed_wall_s(result) / float(result["wall_s"]) if result and result["wall_s"] else 1.0
    metrics = _epoch_metrics(trial_dir, start_ms, share)
    metrics += _cgn_curves(trial_dir, metrics, start_ms)
    if result is not None:
        metrics += [  # a field not recorded (None) has no metric
            Metric(name, float(result[k]), end_ms, 0)
            for k, name in RESULT_METRICS.items()
            if result[k] is not None
        ]
    for name in (layout.CONFIG, layout.METRICS, layout.LAYERS, layout.TRACE, layout.RESULT, layout.ERROR):
        if (trial_dir / name).exists():
            with layout.local_copy(trial_dir / name) as local:  # MLflow uploads from a local file
                client.log_artifact(run_id, str(local))
    if meta.get("run_figure", True):
        _log_cgn_figure(client, run_id, trial_dir, title, meta.get("hparams"))
    # Last, with the values: a run without this tag is incomplete, and is deleted and logged again.
    log_batches(client, run_id, params, metrics, [RunTag("logged", "complete")])
    client.set_terminated(run_id, status, end_time=end_ms)
    supersede(client, earlier, run_id)
    return run_id


SUPERSEDED_BY = "superseded_by"


def supersede(client: MlflowClient, run_ids: list[str], by: str) -> None:
    """Retire the runs of a trial's earlier result: tagged `superseded_by` and a note naming the run
    that replaces them, ended KILLED, then deleted.

    Deleted, not only tagged: MLflow's runs view, its comparisons and every search (this project's
    too) show active runs, so a run left active would keep showing the old result beside the new one
    under the same trial key. MLflow's delete is soft: the run stays in the store, restorable from
    the "Deleted" view, where its tag and note say why it went.
    """
    for run_id in run_ids:
        note = (
            f"**Superseded** by run {by}: this trial's files were damaged, so it was trained again; "
            "that run holds the result on disk."
        )
        client.log_batch(run_id, tags=[RunTag(SUPERSEDED_BY, by), RunTag("mlflow.note.content", note)])
        client.set_terminated(run_id, "KILLED")
        client.delete_run(run_id)
