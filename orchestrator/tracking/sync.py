"""`lottery sync SWEEP`: give every finished trial directory of a sweep its one MLflow run.

The driver logs each trial when Tune is done with it; while the tracking server is down it
skips, and the results stay in the trial directories (they are written before anything is
sent). Sync replays what is missing once the server is back: it compares the trial
directories with the sweep's complete child runs and logs exactly the missing ones through
`log_trial`, which is idempotent by trial key, so running it twice changes nothing. A damaged
trial (a file missing or unreadable: layout.trial_status) has nothing to log: sync names it and
goes on; the next `lottery sweep` trains it again.

It reuses the parent run recorded in `<sweep>/sweep.json`. When there is none to reuse (the
server was down before the sweep's first trial, or `--tracking-uri` names another store), it
opens the experiment and parent run from the recorded plan (`spec.json`), as the driver would
have. Once every trial has ended, a parent run left RUNNING by an outage is closed.

A parent run that sync opens anew (a copied sweep made its own, a store rebuilt) lacks what
`lottery aggregate` attached to the old one: the aggregate tables on disk and their per-arm
summary metrics are attached again. The report is not (its provenance names the old parent
run); sync says how to build it for the new one.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError

from orchestrator import layout
from orchestrator.errors import UserError, one_line
from orchestrator.spec import SweepPlan, SweepSpec, expand
from orchestrator.tracking.record import SweepRecord
from orchestrator.tracking.runs import client_for, default_tracking_uri, refuse_password
from orchestrator.tracking.store import embedded_uri, move_aside, prepare_store
from orchestrator.tracking.study import summary_to_parent
from orchestrator.tracking.sweep import attach_files, close_sweep, open_sweep, reconcile

PLAN_IDENTITY = ("fingerprint", "n_trials")  # what spec.json adds to the spec itself
# What a store can raise: MLflow's own errors, SQLAlchemy's (OperationalError: locked, disk full,
# a broken schema), sqlite's from the store check, and the OS's (permissions, a missing mount).
STORE_ERRORS = (MlflowException, SQLAlchemyError, sqlite3.Error, OSError)


@dataclass(frozen=True)
class SyncReport:
    record: SweepRecord
    created: int  # runs logged now
    present: int  # trials whose complete run was already there
    unfinished: int  # trials with neither a result nor an error yet
    damaged: tuple[tuple[str, str], ...] = ()  # (trial key, problem): skipped, trained again by the sweep


def sync_sweep(
    sweep_dir: Path,
    tracking_uri: str | None = None,
    on_logged: Callable[[int, int], None] | None = None,
    console: Console | None = None,
) -> SyncReport:
    """Log the missing runs of `sweep_dir`'s finished and errored trials; see the module docstring.

    `on_logged(done, total)` follows the logging (the CLI's one progress bar)."""
    keys = layout.planned_keys(sweep_dir)
    before = SweepRecord.load(sweep_dir)
    record = _sweep_record(sweep_dir, tracking_uri)
    gaps = reconcile(record, sweep_dir, keys, errored=True, on_logged=on_logged)
    counts = layout.count_trials(sweep_dir, keys)
    parent = client_for(record.tracking_uri).get_run(record.parent_run_id)
    if (
        counts["unfinished"] == 0
        and counts["damaged"] == 0
        and parent.info.status != RunStatus.to_string(RunStatus.FINISHED)
    ):
        close_sweep(record, counts, complete=True)
    if before is None or before.parent_run_id != record.parent_run_id:
        summary_to_new_parent(record, sweep_dir, console or Console(stderr=True))
    return SyncReport(record, len(gaps.missing), gaps.present, gaps.unfinished, gaps.damaged)


def summary_to_new_parent(record: SweepRecord, sweep_dir: Path, console: Console) -> None:
    """What `lottery aggregate` attached to the old parent run, attached to the new one from the tables
    on disk; the report is only named (it was built for the old run). Nothing to say without them."""
    from orchestrator.aggregate import read_aggregate  # pandas and the statistics: only when needed

    if layout.aggregate_dir(sweep_dir).exists():
        try:
            aggregated = read_aggregate(sweep_dir)
        except UserError as exc:  # an aggregate cut short: its message says to run it again
            console.print(f"[yellow]tracking: {exc}[/]", highlight=False, soft_wrap=True)
        else:
            tables = sorted(layout.aggregate_dir(sweep_dir).glob("*.parquet"))
            attach_files(record, tables, layout.AGGREGATE, console)
            summary_to_parent(record, sweep_dir, aggregated, console)
    report = layout.report_dir(sweep_dir)
    if report.exists() and any(report.iterdir()):
        console.print(
            f"tracking: the report in {report} names the previous parent run; run `lottery report "
            f"{sweep_dir}` to build it for run {record.parent_run_id} and attach it there",
            highlight=False,
            soft_wrap=True,
        )


def store_error_line(exc: BaseException, sweep_dir: Path, tracking_uri: str | None) -> str:
    """A store failure as one line with the fix: the trial directories are intact either way."""
    record = SweepRecord.load(sweep_dir)
    uri = tracking_uri or (record.tracking_uri if record else None) or _planned_uri(sweep_dir)
    return (
        f"error: tracking store {uri} failed ({one_line(exc, 200)}); every result is safe in "
        f"{layout.trials_root(sweep_dir)}: make the store reachable (not locked, server up, disk "
        f"not full) and run `lottery sync {sweep_dir}` again, or pass --tracking-uri for another store"
    )


def _sweep_record(sweep_dir: Path, tracking_uri: str | None) -> SweepRecord:
    """The recorded experiment and parent run if `tracking_uri` holds them, else newly opened ones.

    A copied sweep (its sweep.json names another directory) becomes its own: a new parent in
    `--tracking-uri`, or in a new sqlite store inside the copy (the copied store file, which
    holds the original's runs and points at the original's artifacts, is moved aside).
    """
    record = SweepRecord.load(sweep_dir)
    uri = tracking_uri and refuse_password(tracking_uri, "--tracking-uri")
    if record is not None and record.written_elsewhere(sweep_dir):
        return open_sweep(recorded_plan(sweep_dir), sweep_dir, uri or _own_store(sweep_dir), adopt=True)
    uri = uri or (record.tracking_uri if record else None) or _planned_uri(sweep_dir)
    prepare_store(uri)  # a broken sqlite store is set aside here, and rebuilt below
    if record is not None:
        try:
            parent = client_for(uri).get_run(record.parent_run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        else:
            if parent.info.lifecycle_stage == "active":
                return replace(record, tracking_uri=uri)
    return open_sweep(recorded_plan(sweep_dir), sweep_dir, uri)


def _own_store(sweep_dir: Path) -> str:
    """A new embedded store for a copied sweep; a store file copied along is kept aside."""
    db = layout.tracking_db(sweep_dir)
    if os.path.lexists(db):
        aside = move_aside(db, layout.COPIED)
        Console(stderr=True).print(
            f"tracking: {db} came with the copy and holds the original's runs; kept as {aside}",
            highlight=False,
            soft_wrap=True,
        )
    return embedded_uri(sweep_dir)


def _planned_uri(sweep_dir: Path) -> str:
    """Where the driver would have logged: the spec's tracking_uri, $MLFLOW_TRACKING_URI or sqlite."""
    return layout.read_spec(sweep_dir).get("tracking_uri") or default_tracking_uri(sweep_dir)


def recorded_plan(sweep_dir: Path) -> SweepPlan:
    """The plan `spec.json` recorded, re-expanded; refused if it no longer yields the same trials."""
    document = layout.read_spec(sweep_dir)
    spec = SweepSpec.model_validate({k: v for k, v in document.items() if k not in PLAN_IDENTITY})
    plan = expand(spec)
    if plan.fingerprint != document.get("fingerprint"):
        raise UserError(
            f"sync: {layout.spec_file(sweep_dir)} expands to other trials with this code "
            f"(fingerprint {plan.fingerprint}, recorded {document.get('fingerprint')})"
        )
    return plan
