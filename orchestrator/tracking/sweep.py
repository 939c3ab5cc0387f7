"""MLflow for a sweep: one experiment, one parent run, one child run per trial key.

Logging happens in the driver, from the trial directories, never in the trials:
  * one process at a time writes the store (the driver before and after Tune, its logging
    process while Tune runs), so a sqlite file sees no concurrent writers or racing migrations,
    and workers need no tracking credentials or route to the server;
  * a trial writes its directory first; the driver's Tune callback has it logged (by the
    driver's logging process, orchestrator/tracking/log_process.py) when Tune reports the
    trial complete (or errored after its last retry). `log_trial` is idempotent
    by trial key, so a callback repeated after a restore cannot duplicate a run;
  * `reconcile` replays any trial directory that has no complete run yet: at start-up (a
    driver killed between a trial's result and its run) and at the end (an outage).
A tracking failure is reported and skipped: the results are on disk, and `reconcile` (on the
next invocation) or `lottery sync` (orchestrator/tracking/sync.py) catches up.

`<sweep_dir>/sweep.json` (SweepRecord, orchestrator/tracking/record.py) remembers the tracking URI,
experiment and parent run, so a resumed sweep reuses its parent run, and `lottery aggregate/report/ui`
find the store.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from rich.console import Console

from orchestrator import layout
from orchestrator.errors import UserError
from orchestrator.spec import SweepPlan
from orchestrator.tracking import log_process
from orchestrator.tracking.log_process import LogProcess
from orchestrator.tracking.record import CopiedSweep, SweepRecord, check_own_record
from orchestrator.tracking.runs import (
    client_for,
    default_tracking_uri,
    ensure_experiment,
    log_trial,
    result_end_ms,
)
from orchestrator.tracking.source import LIBRARIES, git_state, source_tags
from orchestrator.tracking.store import prepare_store
from orchestrator.tracking.study import log_spec_params

PAGE = 1000


def open_sweep(plan: SweepPlan, sweep_dir: Path, tracking_uri: str, *, adopt: bool = False) -> SweepRecord:
    """Create (or reopen) the experiment and the parent run before any trial starts.

    The parent is found again by what it is, not only by sweep.json: a driver killed between
    creating it and writing sweep.json must not leave a second parent behind. Parents of the
    same plan and directory still RUNNING besides the one kept (an older driver's) are closed.
    `adopt` ignores a sweep.json written for another directory (`lottery sync` of a copy);
    otherwise such a record is refused (CopiedSweep).
    """
    spec = plan.spec
    sweep_dir = layout.location(sweep_dir).resolve()
    previous = SweepRecord.load(sweep_dir)
    if previous is not None and adopt and previous.written_elsewhere(sweep_dir):
        previous = None
    elif previous is not None:
        check_own_record(previous, sweep_dir)
    prepare_store(tracking_uri)
    client = client_for(tracking_uri)
    experiment_id = ensure_experiment(client, spec.name, layout.artifacts_dir(sweep_dir))
    parent = _reusable_parent(client, previous, tracking_uri)
    found = _parents_of(client, experiment_id, plan, sweep_dir)
    if parent is None and found:
        parent = found[0].info.run_id  # the newest; its artifacts may not have been logged yet
        _log_plan_files(client, parent, sweep_dir)
    if parent is None:
        run = client.create_run(
            experiment_id, run_name=f"sweep {spec.name}", tags=_parent_tags(plan, sweep_dir)
        )
        parent = run.info.run_id
        log_spec_params(client, parent, spec)
        _log_plan_files(client, parent, sweep_dir)
    else:
        client.update_run(parent, status="RUNNING")
    for run in found:
        if run.info.run_id != parent and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    record = SweepRecord(spec.name, tracking_uri, experiment_id, parent, str(sweep_dir))
    record.save(sweep_dir)
    return record


def _log_plan_files(client: MlflowClient, parent: str, sweep_dir: Path) -> None:
    for path in (layout.spec_file(sweep_dir), layout.plan_file(sweep_dir)):
        with layout.local_copy(path) as local:  # MLflow uploads from a local file
            client.log_artifact(parent, str(local))


def _parents_of(client: MlflowClient, experiment_id: str, plan: SweepPlan, sweep_dir: Path) -> list:
    """Active parent runs of this plan in this directory, newest first (tags set at creation)."""
    if "'" in str(sweep_dir):  # not expressible in a filter string; sweep.json alone then
        return []
    clause = (
        f"tags.role = 'sweep' and tags.fingerprint = '{plan.fingerprint}' and tags.sweep_dir = '{sweep_dir}'"
    )
    runs = client.search_runs([experiment_id], filter_string=clause, max_results=PAGE)
    return sorted(runs, key=lambda run: run.info.start_time or 0, reverse=True)


def _reusable_parent(client: MlflowClient, previous: SweepRecord | None, uri: str) -> str | None:
    if previous is None or previous.tracking_uri != uri:
        return None
    try:
        run = client.get_run(previous.parent_run_id)
    except Exception:  # deleted or never reached this store: start a new parent
        return None
    return run.info.run_id if run.info.lifecycle_stage == "active" else None


def _parent_tags(plan: SweepPlan, sweep_dir: Path) -> dict[str, str]:
    spec = plan.spec
    tags = {
        "sweep": spec.name,
        "sweep_dir": str(sweep_dir),
        "role": "sweep",
        "n_trials": str(len(plan.trials)),
        "seeds": json.dumps(spec.seeds),
        "schemes": ",".join(dict.fromkeys(e.name for e in spec.schemes)),
        "fingerprint": plan.fingerprint,
        "python": platform.python_version(),
    }
    tags |= {f"version.{lib}": metadata.version(lib) for lib in LIBRARIES}
    tags |= git_state(Path(__file__).resolve().parent) | source_tags()
    if spec.description:
        tags["mlflow.note.content"] = spec.description
    return tags


def logged_trials(
    client: MlflowClient, experiment_id: str, parent_run_id: str
) -> dict[str, tuple[str, int | None]]:
    """trial_key -> (status, end time in ms) of every completely logged child run of this parent, in pages."""
    found: dict[str, tuple[str, int | None]] = {}
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.logged = 'complete'",
            max_results=PAGE,
            page_token=token,
        )
        found |= {run.data.tags["trial_key"]: (run.info.status, run.info.end_time) for run in page}
        token = page.token
        if not token:
            return found


@dataclass(frozen=True)
class TrackingGaps:
    """How a sweep's trial directories compare with its runs: what `reconcile` and `lottery sync` act on."""

    missing: list[str]  # trial keys with a result (or error) but no complete run of it
    present: int  # trials whose complete run is already there
    unfinished: int  # trials with nothing to log yet (no result, and no error when errors count)
    damaged: tuple[tuple[str, str], ...] = ()  # (trial key, problem): nothing to log until trained again


def tracking_gaps(
    record: SweepRecord, sweep_dir: Path, trial_keys: list[str], *, errored: bool
) -> TrackingGaps:
    """One search for the sweep's complete runs, compared with the trial directories on disk.

    A finished trial's run is present when it ended when its result was written (`result_end_ms`):
    a run of an earlier result (the trial was trained again after damage) is stale, and logging the
    trial supersedes it."""
    logged = logged_trials(client_for(record.tracking_uri), record.experiment_id, record.parent_run_id)
    missing, present, unfinished, damaged = [], 0, 0, []
    for key in trial_keys:
        trial_dir = layout.trial_dir(sweep_dir, key)
        trial = layout.trial_status(trial_dir)
        status, end = logged.get(key, (None, None))
        if trial.finished:
            current = status == "FINISHED" and end == result_end_ms(trial_dir, trial.result or {})
        elif errored and trial.errored:
            current = status == "FAILED"
        elif trial.damaged:
            damaged.append((key, trial.problem or "damaged"))
            continue
        else:
            unfinished += 1
            continue
        if current:
            present += 1
        else:
            missing.append(key)
    return TrackingGaps(missing, present, unfinished, tuple(damaged))


def reconcile(
    record: SweepRecord,
    sweep_dir: Path,
    trial_keys: list[str],
    *,
    errored: bool,
    on_logged: Callable[[int, int], None] | None = None,
) -> TrackingGaps:
    """Log every finished (and, if `errored`, errored) trial directory whose run is missing or stale.

    Returns the gaps found before logging: `missing` is what was logged now. `on_logged(done,
    total)` is called once before the first run and after each (a progress bar).
    """
    gaps = tracking_gaps(record, sweep_dir, trial_keys, errored=errored)
    client = client_for(record.tracking_uri)
    if on_logged:
        on_logged(0, len(gaps.missing))
    for done, key in enumerate(gaps.missing, 1):
        log_trial(
            client, record.experiment_id, layout.trial_dir(sweep_dir, key), parent_run_id=record.parent_run_id
        )
        if on_logged:
            on_logged(done, len(gaps.missing))
    return gaps


def close_sweep(record: SweepRecord, counts: dict[str, int], *, complete: bool) -> None:
    """Summary metrics on the parent; FINISHED when every trial ended, KILLED when interrupted."""
    client = client_for(record.tracking_uri)
    client.log_batch(record.parent_run_id, metrics=_count_metrics(counts))
    status = RunStatus.to_string(RunStatus.FINISHED if complete else RunStatus.KILLED)
    client.set_terminated(record.parent_run_id, status)


def _count_metrics(counts: dict[str, int]) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(f"n_{k}", float(v), now, 0) for k, v in sorted(counts.items())]


def parent_record(sweep_dir: Path, console: Console) -> SweepRecord | None:
    """sweep.json, when this directory's own runs are where it points; else None, said in one line.

    A copied sweep's record names the original's store and parent run: anything written through
    it (tables, summary metrics, the report) would land on the original (CopiedSweep says the fix).
    """
    record = SweepRecord.load(sweep_dir)
    if record is None:
        console.print(f"[yellow]tracking: {layout.record_file(sweep_dir)} is missing; nothing attached[/]")
        return None
    try:
        check_own_record(record, sweep_dir)
    except CopiedSweep as exc:
        console.print(f"[yellow]{exc}[/]", highlight=False, soft_wrap=True)
        return None
    return record


def attach_to_parent(sweep_dir: Path, paths: list[Path], artifact_path: str, console: Console) -> None:
    """Attach files (aggregate tables, the report) to the sweep's parent run; a warning if that fails."""
    record = parent_record(sweep_dir, console)
    if record is not None:
        attach_files(record, paths, artifact_path, console)


def attach_files(record: SweepRecord, paths: list[Path], artifact_path: str, console: Console) -> None:
    """Attach files to `record`'s parent run (checked by `parent_record`); a warning if that fails."""
    try:
        client = client_for(record.tracking_uri)
        for path in paths:
            with layout.local_copy(path) as local:
                client.log_artifact(record.parent_run_id, str(local), artifact_path)
    except Exception as exc:
        console.print(f"[yellow]tracking: not attached to the parent run ({type(exc).__name__}: {exc})[/]")
        return
    console.print(f"attached {len(paths)} file(s) to run {record.parent_run_id} under '{artifact_path}/'")


def ui_tracking_uri(sweep_dir: Path) -> str:
    """The store `lottery ui` serves: the sweep's own (a tracking server has its own UI already)."""
    record = SweepRecord.load(sweep_dir)
    if record is not None:
        check_own_record(record, sweep_dir)
    uri = record.tracking_uri if record else default_tracking_uri(sweep_dir)
    if uri.startswith(("http://", "https://")):
        raise UserError(f"sweep '{sweep_dir.name}' is tracked on a server: open {uri}")
    return uri


class TrackingCallback(Callback):
    """Has each trial's directory logged to MLflow when Tune is done with the trial.

    Logging runs in one process of its own (orchestrator/tracking/log_process.py), so Tune's
    event loop neither waits on the store (a run with its artifacts takes ~0.1 s on sqlite,
    longer on a server) nor shares the GIL with it, and the store still sees a single writer.
    The driver holds that process open across every Tune experiment of the sweep
    (`log_process.sweep_logging`) and drains it before its final reconcile; a callback with none open (no
    tracking) logs nothing. After a failed attempt the logger pauses, so a dead server costs one
    failed attempt per pause, not one per trial (see log_process).

    Holds only plain data: Tune pickles its callbacks into the experiment and uses the pickled
    copy after `Tuner.restore`, so the process is looked up by sweep directory in `setup`.
    """

    def __init__(self, sweep_dir: Path, unit_keys: list[list[str]]) -> None:
        self.sweep_dir = layout.location(sweep_dir)
        self.unit_keys = unit_keys  # the trial keys each Tune trial (a seed or a pack) trains
        self._process: LogProcess | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"sweep_dir": self.sweep_dir, "unit_keys": self.unit_keys, "_process": None}

    def setup(self, **info: Any) -> None:
        self._process = log_process.running(self.sweep_dir)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._submit(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._submit(trial)

    def _submit(self, trial: Any) -> None:
        if self._process is not None:
            for key in self.unit_keys[trial.config["unit"]]:
                self._process.submit(key)
