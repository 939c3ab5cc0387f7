"""`lottery sweep`: run a sweep spec's trials with Ray Tune, resumable, tracked in MLflow.

Everything lands in the sweep directory `<storage>/<name>/` (its layout: orchestrator/layout.py).

Running the same spec again resumes: Tune restores its experiment (finished trials are
never re-run; unfinished and errored ones continue from their last checkpoint), a trial
directory with a result is reported without training, and MLflow logging is idempotent
by trial key. A spec whose trials differ from the recorded plan is refused. If Tune's saved
state is unreadable (a driver killed while Tune was writing it), that state is moved aside to
`tune.unreadable-<time>/` and Tune starts afresh: nothing is lost, because finished trials are
read from their directories and unfinished ones resume from their own checkpoints.

On a Ray cluster, submit the driver as a job (the job's RAY_ADDRESS attaches it to the cluster):
  lottery submit configs/X.yaml --address http://HEAD:8265   (orchestrator/run/submit.py)
which validates the spec here first and uploads this checkout as the job's working_dir. Trials write
`<storage_path>/<name>/` from the node that runs them, so storage_path must be storage every node
reaches: an object store URI (`s3://bucket/prefix`; each node needs the AWS_* variables) or a path
every node mounts (NFS). Tune keeps its own state there too (RunConfig storage_path and
storage_filesystem). Only the driver talks to MLflow, so the workers need no tracking credentials;
with storage on an object store the embedded sqlite store stays on the driver's disk
(layout.local_dir), so a team should set tracking_uri to a server.

Before anything starts, `preflight` makes every check the run depends on (and `--dry-run` makes
the same): device and resources against this machine, each dataset loaded once, stored results
against the data now loaded. Then the driver takes the sweep's lock (`layout.driver_lock`: one
driver per sweep) and turns SIGTERM into what Ctrl-C does, so a scheduler's stop saves Tune's state
and marks the parent run KILLED.

Its parts, one concern each: run/preflight.py (every check before anything starts), run/dry_run.py
(`--dry-run`'s plan table), run/ray_session.py (the Ray session, its environment, SIGTERM),
run/tuner.py (the Tune experiment), run/policy.py (the pre-training policy). This
module is the driver that runs them in order, and hooks up tracking.
"""

from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from orchestrator import layout
from orchestrator.errors import UserError, one_line
from orchestrator.run.policy import _set_aside_changed, set_aside_damaged
from orchestrator.run.preflight import check_cluster_resources, check_recorded_plan, preflight, sweep_dir_for
from orchestrator.run.ray_session import (
    DRIVER_ENV,
    _sigterm_as_ctrl_c,
    cluster_address,
    no_tune_loggers,
    ray_session,
    stop_on_sigterm,
)
from orchestrator.run.tuner import _fit_or_storage_fault
from orchestrator.sequential import opened_plan
from orchestrator.spec import SweepPlan

if TYPE_CHECKING:  # imports MLflow, which a dry run never needs
    from orchestrator.tracking.record import SweepRecord


@dataclass(frozen=True)
class SweepOutcome:
    sweep_dir: layout.Location
    counts: dict[str, int]  # planned, finished, failed, errored, damaged, unfinished
    parent_run_id: str | None
    tracked: bool = True  # every ended trial has its run and the parent was closed
    storage_fault: str | None = None  # the one line, when a full or read-only disk stopped the sweep

    @property
    def complete(self) -> bool:
        return self.counts["unfinished"] == 0 and self.counts.get("damaged", 0) == 0


def record_plan(plan: SweepPlan, sweep_dir: layout.Location, *, allow_mixed: bool = False) -> bool:
    """Write spec.json/trials.json, or check them against an earlier run; True if resuming.

    The same trials packed differently are a changed provenance, not a different plan: refused
    unless `allow_mixed`, and then Tune (whose saved units are the old packs) starts afresh.
    """
    if check_recorded_plan(plan, sweep_dir, allow_mixed=allow_mixed):
        tune_dir = layout.tune_dir(sweep_dir)
        if tune_dir.exists():
            tune_dir.rename(layout.set_aside(tune_dir, layout.REPACKED))
    spec_path = layout.spec_file(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    layout.atomic_write_json(spec_path, plan.spec_document())
    layout.atomic_write_json(layout.plan_file(sweep_dir), opened_plan(plan, sweep_dir).rows())
    return layout.tune_dir(sweep_dir).exists()


def run_sweep(
    plan: SweepPlan,
    *,
    root: layout.Location,
    resume: bool = False,
    address: str | None = None,
    console: Console | None = None,
    allow_mixed: bool = False,
    retrain_changed: bool = False,
) -> SweepOutcome:
    from orchestrator.run.progress import quiet_ray_logs
    from orchestrator.tracking import log_process
    from orchestrator.tracking.log_process import TrialLogger
    from orchestrator.tracking.runs import default_tracking_uri, refuse_password

    console = console or Console(stderr=True)
    sweep_dir = sweep_dir_for(plan, root)
    layout.check_storage(sweep_dir)
    layout.check_writable(sweep_dir, "storage_path" if plan.spec.storage_path else "LOTTERY_HOME")
    if resume and not layout.spec_file(sweep_dir).exists():
        raise UserError(f"--resume: no sweep '{plan.spec.name}' at {sweep_dir} to resume")
    uri = refuse_password(
        plan.spec.tracking_uri or default_tracking_uri(sweep_dir),
        "tracking_uri" if plan.spec.tracking_uri else "MLFLOW_TRACKING_URI",
    )
    address = cluster_address(plan, address)
    changed = preflight(plan, sweep_dir, address, allow_mixed=allow_mixed, retrain_changed=retrain_changed)
    with layout.driver_lock(sweep_dir), stop_on_sigterm(), contextlib.ExitStack() as cluster:
        for key, value in DRIVER_ENV.items():
            os.environ.setdefault(key, value)
        if address is not None:  # connect first: a cluster that cannot run the trials costs nothing
            from orchestrator.run.user_code import code_runtime_env

            cluster.enter_context(ray_session(address, code_runtime_env(plan)))
            _sigterm_as_ctrl_c()
            check_cluster_resources(plan, address)
        if changed:
            _set_aside_changed(changed, sweep_dir, console)
        resuming = record_plan(plan, sweep_dir, allow_mixed=allow_mixed)
        keys = [t.trial_key() for t in opened_plan(plan, sweep_dir).trials]
        set_aside_damaged(sweep_dir, keys, console)
        if not isinstance(sweep_dir, Path) and uri.startswith("sqlite:"):
            console.print(
                f"tracking: sqlite cannot live on {sweep_dir.scheme}://, so this sweep's MLflow store is on "
                f"this machine at {uri}; set tracking_uri (or MLFLOW_TRACKING_URI) to a server to share it",
                highlight=False,
                soft_wrap=True,
            )
        console.print(
            f"[bold]sweep[/] {plan.spec.name}: {len(keys)} trials"
            f"{f' open of at most {len(plan.trials)} (sequential study)' if plan.batch_ends else ''}"
            f"{' (resuming)' if resuming else ''} on {address or 'an embedded local Ray'}; "
            f"results in {sweep_dir}"
        )
        quiet_ray_logs()
        # Lists every never-started trial after an interrupt; our counts come from the trial directories.
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
        logging.getLogger("ray.tune.tune").addFilter(_no_tune_resume_hint)
        # The store opens (a new sqlite store: ~2 s of migrations) while Ray starts, and closes while Ray
        # stops: seconds of fixed cost per sweep that were paid one after the other (bench/scale.py).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracking") as tracking:
            opened = tracking.submit(_open_tracking, plan, sweep_dir, uri, keys, console)
            with ray_session(address), no_tune_loggers():  # a cluster's: connected above, so this reuses it
                _sigterm_as_ctrl_c()  # again: Ray's core worker installs its own handler in ray.init
                record = opened.result()  # before Tune: its TrackingCallback logs to the sweep's runs
                with (
                    contextlib.nullcontext()
                    if record is None
                    else log_process.sweep_logging(TrialLogger.for_sweep(record, sweep_dir), console)
                ) as logging_process:
                    keys, fault = _fit_or_storage_fault(plan, sweep_dir, keys, console)
                replay = logging_process is None or not logging_process.gave_up

                counts = layout.count_trials(sweep_dir, keys)
                complete = SweepOutcome(sweep_dir, counts, None).complete and fault is None
                closing = (
                    None
                    if record is None
                    else tracking.submit(
                        _close_tracking, record, sweep_dir, keys, counts, complete, console, replay=replay
                    )
                )
            tracked = closing is not None and closing.result()
        outcome = SweepOutcome(sweep_dir, counts, record.parent_run_id if record else None, tracked, fault)
        if not tracked:
            console.print(
                f"[yellow]tracking: MLflow at {uri} may miss some trials (results safe on disk); "
                f"once it is reachable run: lottery sync {sweep_dir}[/]",
                highlight=False,
                soft_wrap=True,  # one line, so the command can be copied whole
            )
    return outcome


def _no_tune_resume_hint(record: logging.LogRecord) -> bool:
    """After an interrupt Tune suggests `Tuner.restore(...)`; the way to resume here is `lottery sweep`,
    which the CLI prints."""
    return "Tuner.restore" not in record.getMessage()


def _open_tracking(
    plan: SweepPlan, sweep_dir: layout.Location, uri: str, keys: list[str], console: Console
) -> SweepRecord | None:
    """Experiment and parent run first, then catch up on finished trials that have no run yet."""
    from orchestrator.tracking.sweep import open_sweep, reconcile

    try:
        record = open_sweep(plan, sweep_dir, uri)
        caught_up = len(reconcile(record, sweep_dir, keys, errored=False).missing)
    except Exception as exc:  # tracking is second: the sweep runs and `lottery sync` catches up later
        console.print(
            f"[yellow]tracking unavailable at {uri} ({one_line(exc)}); running without it[/]",
            highlight=False,
            soft_wrap=True,  # one line however long the URI and the reason
        )
        return None
    if caught_up:
        console.print(f"tracking: logged {caught_up} finished trial(s) that had no run yet")
    return record


def _close_tracking(
    record: SweepRecord,
    sweep_dir: layout.Location,
    keys: list[str],
    counts: dict[str, int],
    complete: bool,
    console: Console,
    *,
    replay: bool = True,
) -> bool:
    """Log what the callback could not, then close the parent run; False if the store failed us.

    Without `replay` (the logging process died twice: log_process.RESTARTS) the driver logs no trial
    itself, lest whatever killed that process take the driver down too; the runs still missing are
    counted and left for `lottery sync`, which logs them in a process of its own."""
    from orchestrator.tracking.sweep import close_sweep, reconcile, tracking_gaps

    try:
        if replay:
            missing = []
            reconcile(record, sweep_dir, keys, errored=True)
        else:
            missing = tracking_gaps(record, sweep_dir, keys, errored=True).missing
        close_sweep(record, counts, complete=complete)
    except Exception as exc:
        console.print(f"[yellow]tracking: could not finish the parent run ({one_line(exc)})[/]")
        return False
    if missing:
        console.print(
            f"[yellow]tracking: {len(missing)} ended trial(s) have no MLflow run: the logging process died "
            "again after its restart, so they are left for `lottery sync`[/]",
            highlight=False,
        )
    return not missing
