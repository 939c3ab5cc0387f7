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

The embedded local cluster is secure by default: Ray 2.60's token auth stays on (ray.init
generates a token into ~/.ray/auth_token unless RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH name one;
every GCS, raylet and worker RPC must carry it) and every Ray port listens on loopback only.
Ray binds its servers to all interfaces unless the node's IP is literally 127.0.0.1, and on Linux
it resolves 127.0.0.1 to the machine's routable IP unless its single-machine mode is on
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the default on macOS and Windows), so the embedded cluster
sets that. A cluster (--address, the spec's ray_address, $RAY_ADDRESS) keeps the caller's auth
environment: RAY_AUTH_MODE=token and the cluster's RAY_AUTH_TOKEN.

Environment, set here before Ray starts (all `setdefault`, so the caller can override):
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  embedded cluster only: node IP 127.0.0.1, loopback ports
  RAY_USAGE_STATS_ENABLED=0     no usage reporting
  TUNE_GLOBAL_CHECKPOINT_S=auto Tune's own period for saving its experiment state (>= 10 s,
                                at most 5 % of the driver's time). Not on every controller step: that
                                serialised every trial's state and copied it to storage back to back
                                (about half a core on a 130-unit sweep, growing with the trial
                                count). A state a killed driver left behind is then up to one
                                period old, which costs nothing: a unit whose trial directories are
                                finished reports from them without training, an unfinished one
                                resumes from its own checkpoint, and MLflow logging is by trial key.
  TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S=0  no warning about forced snapshots
  RAY_AIR_NEW_OUTPUT=0          the legacy reporter honours verbose=0; the new one prints a banner
  TUNE_PRINT_ALL_TRIAL_ERRORS=0 one line per trial error (tracebacks stay in the trial's error.txt)
  RAY_CHDIR_TO_TRIAL_DIR=0      trials keep the driver's working directory (relative data paths)
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from rich.console import Console
from rich.table import Table

from orchestrator import layout
from orchestrator.errors import UserError, one_line
from orchestrator.run.preflight_model import DataShape, check_models, known_shapes
from orchestrator.sequential import check_design, opened_plan
from orchestrator.spec import Resources, SweepPlan

if TYPE_CHECKING:  # both import Ray or MLflow, which a dry run never needs
    from ray.tune import Tuner

    from orchestrator.tracking.record import SweepRecord

LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2  # trials pass only the plan and small metrics through it
REUSE_ACTORS = True  # Tune's actor reuse; bench/retry_delay.py measures both ways after a worker kill
DRIVER_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TUNE_GLOBAL_CHECKPOINT_S": "auto",  # the trial directories are the record: see the module docstring
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_AIR_NEW_OUTPUT": "0",  # the new output engine prints its banner even at verbose=0
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",  # one line per error from ProgressCallback instead
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
}
# The embedded cluster only (see the module docstring): node IP 127.0.0.1, so Ray binds loopback.
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
TUNE_LOGGERS_ENV = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"  # "1": Tune adds no logger callbacks
PLAN_TABLE_ROWS = 20  # configurations the dry run lists one by one; the rest are summed in one row


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


def sweep_dir_for(plan: SweepPlan, root: layout.Location) -> layout.Location:
    try:
        return layout.sweep_location(plan.spec.storage_path, plan.spec.name, root)
    except (OSError, ValueError) as exc:  # e.g. a NUL byte, which YAML's "\0" can put in a path
        raise UserError(f"storage_path: not a usable path ({exc})") from None


def dry_run(
    plan: SweepPlan,
    root: layout.Location,
    console: Console,
    *,
    address: str | None = None,
    allow_mixed: bool = False,
    retrain_changed: bool = False,
    estimate_cost: bool = True,
) -> None:
    """The run's own checks (data, device, resources, stored results), the plan and its cost; nothing
    is started or written."""
    sweep_dir = sweep_dir_for(plan, root)
    address = cluster_address(plan, address)
    changed = preflight(plan, sweep_dir, address, allow_mixed=allow_mixed, retrain_changed=retrain_changed)
    if address is not None:
        with ray_session(address):
            check_cluster_resources(plan, address)
    console.print(f"{len(plan.trials)} trials in sweep '{plan.spec.name}' (dry run: nothing started)")
    console.print(pack_text(plan))
    if plan.spec.sequential:
        rule = plan.spec.sequential
        console.print(
            f"sequential study: up to {len(plan.spec.seeds)} seeds per configuration, {rule.batch} per batch "
            f"({plan.n_batches} batches at most), stopping once {rule.describe()}"
        )
    console.print(f"sweep directory: {sweep_dir}")
    if changed:
        console.print(
            f"{len(changed)} stored result(s) trained on other data would be set aside and retrained"
        )
    console.print(plan_table(plan))
    if estimate_cost:
        from orchestrator.run.estimate import estimate
        from trainers.errors import DataError

        try:
            text = estimate(plan, sweep_dir).text()
        except DataError as exc:  # a cluster's data may live on its workers only
            text = f"estimated cost: not measured here ({exc})"
        console.print(text, soft_wrap=True, highlight=False)


def preflight(
    plan: SweepPlan, sweep_dir: Path, address: str | None, *, allow_mixed: bool, retrain_changed: bool
) -> list[tuple[Path, str]]:
    """Every check the run makes before it starts anything (a dry run makes the same ones).

    Returns the finished trials whose stored result was trained on other data than the data here (only
    with `retrain_changed`; otherwise they are refused). For a local Ray: this machine's device, CPUs
    and GPUs against what the trials ask, then each distinct dataset loaded once (files, record
    counts, batch size). On a cluster the data may live on the workers alone and the resources are
    the cluster's: the resources are checked right after connecting (`check_cluster_resources`); the
    data only by the workers, where a unit that still trains refuses its seeds' results of other data
    (run_trials), while a unit whose seeds all finished is reported without loading the data again.
    """
    check_tracking_uri(plan)
    if address is None:
        check_local_resources(plan)
        fingerprints = check_local_data(plan)
    else:
        fingerprints = {}
        check_models(plan, known_shapes(plan))  # the data is the workers': its shape is known
    check_recorded_plan(plan, sweep_dir, allow_mixed=allow_mixed)
    check_device_provenance(plan, sweep_dir, embedded=address is None, allow_mixed=allow_mixed)
    changed = check_stored_data(plan, sweep_dir, fingerprints, retrain_changed=retrain_changed)
    from orchestrator.run.preflight_custom import check_custom_models

    changed += check_custom_models(plan, sweep_dir, local=address is None, retrain_changed=retrain_changed)
    return list(dict(changed).items())  # a trial changed in data and code is set aside once


def check_tracking_uri(plan: SweepPlan) -> None:
    """No password in the tracking URI (tracking.runs.refuse_password says why), MLflow imported only
    when there is one to refuse."""
    uri, source = plan.spec.tracking_uri, "tracking_uri"
    if uri is None:
        uri, source = os.environ.get("MLFLOW_TRACKING_URI", ""), "MLFLOW_TRACKING_URI"
    if urlsplit(uri).password is not None:
        from orchestrator.tracking.runs import refuse_password

        refuse_password(uri, source)


def check_local_resources(plan: SweepPlan) -> None:
    """What the trials ask of an embedded Ray against this machine: a trial that can never be placed
    would wait forever, and `device: cuda` without CUDA would fail every try inside Ray."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if any(t.device == "cuda" for t in plan.trials) and not gpus:
        raise UserError("base.device: 'cuda' but this machine has no CUDA device; use device: auto or cpu")
    _check_resources(plan, cpus=float(os.cpu_count() or 1), gpus=float(gpus), where="this machine")


def check_cluster_resources(plan: SweepPlan, address: str) -> None:
    """The same check against the cluster just connected to (its current resources)."""
    import ray

    offered = ray.cluster_resources()
    gpus = float(offered.get("GPU", 0))
    if any(t.device == "cuda" for t in plan.trials) and not gpus:
        raise UserError(
            f"base.device: 'cuda' but the Ray cluster at {address} has no GPUs; use device: auto or cpu"
        )
    _check_resources(
        plan, cpus=float(offered.get("CPU", 0)), gpus=gpus, where=f"the Ray cluster at {address}"
    )


def _check_resources(plan: SweepPlan, *, cpus: float, gpus: float, where: str) -> None:
    wanted = plan.spec.resources
    if wanted.gpu > gpus:
        raise UserError(
            f"resources.gpu: each trial asks for {wanted.gpu:g} GPU(s) but {where} has {gpus:g}, so no "
            "trial could ever start; lower resources.gpu (0 trains on CPU)"
        )
    if wanted.cpu > cpus:
        raise UserError(
            f"resources.cpu: each trial asks for {wanted.cpu:g} CPUs but {where} has {cpus:g}, so no "
            f"trial could ever start; set resources.cpu to at most {cpus:g}"
        )


def check_stored_data(
    plan: SweepPlan, sweep_dir: Path, fingerprints: dict[str, str], *, retrain_changed: bool
) -> list[tuple[Path, str]]:
    """Finished trials whose result was trained on other data than the data loaded now: refused in one
    line, or (retrain_changed) returned, to be set aside and trained again. Never reported as theirs."""
    if not fingerprints or not layout.trials_root(sweep_dir).exists():
        return []
    from orchestrator.run.trial import changed_data_message, stored_on_other_data

    changed: list[tuple[Path, str]] = []
    by_data: dict[str, list[Path]] = {}
    for trial in plan.trials:
        by_data.setdefault(trial.data.model_dump_json(), []).append(
            layout.trial_dir(sweep_dir, trial.trial_key())
        )
    for key, directories in by_data.items():
        if key not in fingerprints:
            continue
        found = stored_on_other_data(directories, fingerprints[key])
        if found and not retrain_changed:
            raise UserError(changed_data_message(found, fingerprints[key], "base.data"))
        changed += found
    return changed


def pack_text(plan: SweepPlan) -> str:
    """How the trials are grouped into Tune trials (seed packs train several seeds in one process)."""
    sizes = sorted({len(u) for u in plan.units})
    if sizes == [1]:
        return f"{len(plan.units)} Tune trials, one seed each (pack_size {plan.spec.pack_size})"
    return (
        f"{len(plan.units)} Tune trials: seed packs of {', '.join(map(str, sizes))} "
        f"(pack_size {plan.spec.pack_size}; see trainers/pack.py)"
    )


def plan_table(plan: SweepPlan, rows: int = PLAN_TABLE_ROWS) -> Table:
    """One row per configuration (scheme x grid point), with its seeds; not one row per trial. Past
    `rows` configurations the rest are one closing row, so a large plan stays a screenful."""
    table = Table(title=f"{plan.spec.name}: {len(plan.trials)} trials")
    for column in ("#", "scheme", "hyperparameters", "config_hash", "seeds", "trials"):
        table.add_column(column, justify="right" if column in ("#", "trials") else "left")
    groups: dict[str, list] = {}
    for trial in plan.trials:
        groups.setdefault(trial.config_hash(), []).append(trial)
    for i, (config_hash, trials) in enumerate(groups.items()):
        if i == rows and len(groups) > rows + 1:
            rest = sum(len(t) for t in list(groups.values())[rows:])
            table.add_row("...", "", f"{len(groups) - rows} more configurations", "", "", str(rest))
            break
        first = trials[0]
        label = " ".join(
            filter(None, [first.hparam_label(), _axes_label(first.model_dump(mode="json"), plan)])
        )
        table.add_row(
            str(i),
            first.scheme.name,
            label or "defaults",
            config_hash,
            _seed_text(t.seed for t in trials),
            str(len(trials)),
        )
    return table


def _axes_label(trial: dict[str, Any], plan: SweepPlan) -> str:
    """Grid axes that are TrialConfig paths (e.g. model.filters), shown with their values."""
    axes = list(plan.spec.grid) + [k for e in plan.spec.schemes for k in e.grid if "." in k]
    parts = []
    for key in dict.fromkeys(axes):
        node: Any = trial
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        parts.append(f"{key}={node}")
    return " ".join(parts)


def _seed_text(seeds: Any) -> str:
    seeds = list(seeds)
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}..{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])
    return ",".join(map(str, seeds[:6])) + (",..." if len(seeds) > 6 else "")


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


def check_recorded_plan(plan: SweepPlan, sweep_dir: Path, *, allow_mixed: bool) -> bool:
    """Refuse a plan that differs from the one recorded in `sweep_dir` (reads only); True when the
    same trials were packed differently and `allow_mixed` lets the run go on with both."""
    spec_path = layout.spec_file(sweep_dir)
    if spec_path.exists():
        old = layout.read_json(spec_path)
        check_design(old, plan)
        # The same trials, in any order (packing orders the plan); trials.json is written second.
        planned = layout.planned_keys(sweep_dir) if layout.plan_file(sweep_dir).exists() else []
        keys = sorted(t.trial_key() for t in plan.trials)
        # a sequential study records its open batches only
        same_trials = set(planned) <= set(keys) if plan.batch_ends else sorted(planned) == keys
        if old.get("fingerprint") != plan.fingerprint and same_trials:
            if not allow_mixed:
                raise UserError(
                    f"pack_size: the trials of sweep '{plan.spec.name}' were packed (pack_size "
                    f"{old.get('pack_size')!r}) or ordered differently from this run's "
                    f"(pack_size {plan.spec.pack_size!r}); "
                    "a trial's exact numbers depend on its pack, so restore that pack_size or pass "
                    "--allow-mixed to continue with both"
                )
            return True
        if old.get("fingerprint") != plan.fingerprint:
            raise UserError(
                f"sweep '{plan.spec.name}': {sweep_dir} holds a different plan "
                f"({old.get('n_trials')} trials, "
                f"fingerprint {old.get('fingerprint')}; this spec: {len(plan.trials)}, {plan.fingerprint}); "
                "rename the sweep or remove that directory"
            )
    return False


def check_device_provenance(
    plan: SweepPlan, sweep_dir: layout.Location, *, embedded: bool, allow_mixed: bool
) -> None:
    """Refuse to resume on another kind of device than the finished trials used, or over trials of an
    earlier trainer version (unless `allow_mixed`): both are outside the trial key but change its
    numbers. On a cluster, `device: auto` resolves on the workers, so only an explicit device can be
    checked there."""
    if allow_mixed or not layout.trials_root(sweep_dir).exists():
        return
    local = None
    if embedded:
        import torch

        local = "cuda" if torch.cuda.is_available() else "cpu"
    for trial in plan.trials:
        wanted = trial.device if trial.device != "auto" else local
        result = layout.read_result(layout.trial_dir(sweep_dir, trial.trial_key()))
        if result is not None and "device" not in result:
            raise UserError(
                f"sweep '{plan.spec.name}': its finished trials were trained by an earlier filter-lottery "
                "(before the majority-class failure rule, the reference input option and per-filter Adam "
                "steps; their results record no device); start a new sweep name, or pass --allow-mixed "
                "to continue with both"
            )
        used = (result or {}).get("device") or ""
        if wanted and used and used.split(":")[0] != wanted:
            raise UserError(
                f"device: finished trials of sweep '{plan.spec.name}' ran on {used} and this run would "
                f"train the rest on {wanted}; a trial's exact numbers depend on the device, so run on "
                f"{used.split(':')[0]} or pass --allow-mixed to continue with both"
            )


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


def _fit_or_storage_fault(
    plan: SweepPlan, sweep_dir: layout.Location, keys: list[str], console: Console
) -> tuple[list[str], str | None]:
    """`_fit`, and the one line of the storage fault that stopped it, if one did: a trial's (Tune was
    stopped at once: orchestrator/run/storage_stop.py) or Tune's own (its state cannot be saved)."""
    from orchestrator.run import storage_stop
    from orchestrator.storage_fault import storage_fault

    storage_stop.forget(sweep_dir)
    try:
        keys = _fit(plan, sweep_dir, keys, console)
    except Exception as exc:
        fault = storage_fault(exc, layout.tune_dir(sweep_dir))
        if fault is None:
            raise
        return keys, fault.line()
    fault = storage_stop.fault_for(sweep_dir)
    return keys, fault.line() if fault else None


def _fit(plan: SweepPlan, sweep_dir: layout.Location, keys: list[str], console: Console) -> list[str]:
    """Run the sweep's Tune experiments; the trial keys opened (a sequential study opens batches)."""
    if not plan.batch_ends:
        _tuner(plan, sweep_dir, keys, console).fit()
        return keys
    from orchestrator.run.study import run_study  # one Tune experiment per seed batch

    def fit(batch: SweepPlan, path: Path) -> None:
        _tuner(batch, sweep_dir, [t.trial_key() for t in batch.trials], console, path).fit()

    return [t.trial_key() for t in run_study(plan, sweep_dir, fit, console).trials]


def set_aside_damaged(sweep_dir: Path, keys: list[str], console: Console) -> list[str]:
    """Move each damaged trial directory to damaged/ (kept, never deleted) so the trial trains again.

    Tune's saved state counts those trials as done, so it is set aside too and Tune starts
    afresh: finished trials only report their stored results, unfinished ones resume from their
    own checkpoints. Returns the keys moved.
    """
    moved = []
    for key in keys:
        status = layout.trial_status(layout.trial_dir(sweep_dir, key))
        if not status.damaged:
            continue
        aside = layout.damaged_aside(sweep_dir, key)
        aside.parent.mkdir(parents=True, exist_ok=True)
        layout.trial_dir(sweep_dir, key).rename(aside)
        moved.append(key)
        console.print(
            f"[yellow]trial {key} is damaged ({status.problem}); moved to {aside}, training it again[/]",
            highlight=False,
            soft_wrap=True,
        )
    tune_dir = layout.tune_dir(sweep_dir)
    if moved and tune_dir.exists():
        tune_dir.rename(layout.set_aside(tune_dir, layout.DAMAGED))
    return moved


def _no_tune_resume_hint(record: logging.LogRecord) -> bool:
    """After an interrupt Tune suggests `Tuner.restore(...)`; the way to resume here is `lottery sweep`,
    which the CLI prints."""
    return "Tuner.restore" not in record.getMessage()


def _set_aside_changed(changed: list[tuple[Path, str]], sweep_dir: Path, console: Console) -> None:
    """--retrain-changed: the results trained on other data move aside (kept), and so does Tune's state,
    which counts those trials as done; Tune starts afresh and the other finished trials report from
    their directories."""
    from orchestrator.run.trial import set_aside_changed

    set_aside_changed(changed)
    tune_dir = layout.tune_dir(sweep_dir)
    if tune_dir.exists():
        tune_dir.rename(layout.set_aside(tune_dir, layout.CHANGED_DATA))
    console.print(
        f"{len(changed)} result(s) trained on other data set aside in {layout.trials_root(sweep_dir)}"
    )


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (`timeout`, a scheduler, `kill`) stops the sweep as Ctrl-C does: Tune saves its state and
    returns, the parent run is marked KILLED and the resume command printed; no C++ stack dump."""
    previous = signal.getsignal(signal.SIGTERM)
    _sigterm_as_ctrl_c()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sigterm_as_ctrl_c() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    """Whatever Ctrl-C does now: Tune's handler while it runs (a graceful stop), else KeyboardInterrupt."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def cluster_address(plan: SweepPlan, address: str | None) -> str | None:
    """The Ray cluster to run on: --address, then the spec, then $RAY_ADDRESS; None for a local Ray."""
    return address or plan.spec.ray_address or os.environ.get("RAY_ADDRESS")


def check_local_data(plan: SweepPlan) -> dict[str, str]:
    """Load each distinct dataset once, so a missing or damaged data dir fails before anything starts,
    and run each distinct model on a batch of its data's shape (orchestrator/run/preflight_model.py).

    Returns each file-backed dataset's fingerprint (keyed by its config) for the stored-result check.
    Raises UserError naming the spec field (base.data..., base.batch_size), one line, exit 2.
    """
    import torch

    from orchestrator.run.trial import data_fingerprint
    from trainers.data import check_batch_fits, load_data
    from trainers.errors import DataError

    fingerprints: dict[str, str] = {}
    train_sizes: dict[str, tuple[int, str]] = {}
    shapes: dict[str, DataShape] = {}
    for trial in plan.trials:
        key = trial.data.model_dump_json()
        try:
            if key not in train_sizes:
                data = load_data(trial.data, trial.data_seed, torch.device("cpu"))
                fingerprints[key] = data_fingerprint(data)
                train_sizes[key] = (len(data.y_train), data.variant)
                shapes[key] = DataShape.of(data)
                del data  # one dataset in memory at a time
            check_batch_fits(trial.batch_size, trial.full_batch, *train_sizes[key])
        except DataError as exc:
            raise UserError(_spec_field(str(exc))) from None
    check_models(plan, shapes)  # each distinct model meets its data's shape once (preflight_model.py)
    return {k: v for k, v in fingerprints.items() if v}


def _spec_field(message: str) -> str:
    """A trainer's data message in the spec's terms: its field under base, and no flag the sweep lacks."""
    message = message.replace(
        "pass --data-dir or set LOTTERY_DATA_DIR", "set base.data.data_dir or LOTTERY_DATA_DIR"
    )
    return message if message.startswith("base.") else f"base.{message}"


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


@contextlib.contextmanager
def ray_session(address: str | None, runtime_env: dict[str, Any] | None = None) -> Iterator[None]:
    """Use a running Ray if this process has one; else connect to `address` (with `runtime_env`: the
    user's code shipped to its workers, orchestrator/run/user_code.py); else start a local one."""
    import ray

    if ray.is_initialized():
        yield
        return
    with contextlib.ExitStack() as stack:
        if address:
            ray.init(address=address, logging_level="WARNING", runtime_env=runtime_env)
        else:
            stack.enter_context(loopback_only())
            stack.enter_context(ray_processes_in_own_sessions())
            ray.init(
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                logging_level="WARNING",
                log_to_driver=False,
            )
        try:
            yield
        finally:
            ray.shutdown()


@contextlib.contextmanager
def ray_processes_in_own_sessions() -> Iterator[None]:
    """The processes a local ray.init starts (GCS, raylet, log monitor) each lead a session of their
    own, as the logging process does (tracking/log_process.py); the raylet's workers and agents
    share the raylet's.

    A scheduler stops a job by signalling its whole process group (`timeout`, Kubernetes, a shell's
    `kill -- -PGID`). Ray blocks SIGINT in its processes, so Ctrl-C reaches the driver alone, but
    SIGTERM killed the GCS and raylet under a driver that was still saving Tune's state: it hung
    60 s waiting for them, left the parent run RUNNING and finished trials unlogged. In sessions
    of their own they receive only what the driver sends them (ray.shutdown), and they still die
    with the driver: on Linux Ray starts each with the kernel's parent-death signal, and the
    raylet's workers and agents exit once they see it gone. Without that signal (Ray then cleans
    up through a reaper that needs its processes in the driver's group) nothing is changed. Ray
    offers no setting for it, so its Popen is wrapped while ray.init runs.
    """
    from ray._private import services
    from ray._private.utils import detect_fate_sharing_support

    if not (sys.platform.startswith("linux") and detect_fate_sharing_support()):
        yield
        return
    popen = services.ConsolePopen

    class OwnSessionPopen(popen):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = OwnSessionPopen
    try:
        yield
    finally:
        services.ConsolePopen = popen


@contextlib.contextmanager
def env_default(name: str, value: str) -> Iterator[bool]:
    """`name=value` in the environment for the duration, unless the caller set `name` (theirs wins).

    Yields whether the default was applied; the variable is removed again afterwards.
    """
    applied = name not in os.environ
    if applied:
        os.environ[name] = value
    try:
        yield applied
    finally:
        if applied:
            os.environ.pop(name, None)


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Ray's single-machine mode for a local ray.init: node IP 127.0.0.1, so every port binds loopback.

    The environment variable reaches the processes Ray starts; this process read it when it first
    imported Ray, so its copy of the constant is set too (and both are restored afterwards). A value
    the caller set explicitly wins.
    """
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    with env_default(name, LOCAL_RAY_ENV[name]) as applied:
        if applied:
            ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            yield
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag


def no_tune_loggers() -> contextlib.AbstractContextManager[bool]:
    """Without Tune's default JSON, CSV and TensorBoard loggers for the duration of a fit.

    They write every reported result of every trial a second time (the trial directory holds
    the record), on the driver's event loop: per trial, work that delays the next trial's start.
    A value the caller set explicitly wins.
    """
    return env_default(TUNE_LOGGERS_ENV, "1")


def unreadable_tune_state(path: layout.Location) -> str | None:
    """Why Tune could not restore the experiment at `path`, or None if it can.

    Tune writes its experiment state in place and copies it into the experiment directory, so a
    driver killed at that moment can leave the newest file cut short. Tune then logs the error,
    carries on from an empty state and fails later with an unrelated KeyError. Checked here, the
    same files Tune restores from: the newest of each kind.
    """
    import ray.cloudpickle as cloudpickle
    from ray.tune.callback import CallbackList
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.search.basic_variant import BasicVariantGenerator

    loaders = {
        TuneController.CKPT_FILE_TMPL: json.loads,
        BasicVariantGenerator.CKPT_FILE_TMPL: cloudpickle.loads,
        CallbackList.CKPT_FILE_TMPL: cloudpickle.loads,
    }
    for template, load in loaders.items():
        files = sorted(path.glob(template.format("*")))
        if not files:
            continue
        try:
            load(files[-1].read_bytes())
        except Exception as exc:
            return f"{files[-1].name}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return None


def _restorable(path: layout.Location, console: Console) -> bool:
    """Whether to `Tuner.restore`; an unreadable state is moved aside (kept, never deleted) first."""
    from ray import tune

    tune_path, filesystem = layout.tune_storage(path)
    if not tune.Tuner.can_restore(tune_path, storage_filesystem=filesystem):
        return False
    problem = unreadable_tune_state(path)
    if problem is None:
        return True
    aside = layout.unreadable_aside(path)
    path.rename(aside)
    console.print(
        f"[yellow]Tune's saved state is unreadable ({problem}); moved it to {aside} and starting Tune "
        "afresh: finished trials are read from their directories, unfinished ones resume from "
        "their own checkpoints[/]",
        highlight=False,
        soft_wrap=True,
    )
    return False


def _tuner(
    plan: SweepPlan,
    sweep_dir: layout.Location,
    keys: list[str],
    console: Console,
    path: layout.Location | None = None,
) -> Tuner:
    from ray import tune

    from orchestrator.run.progress import ProgressCallback
    from orchestrator.run.repeats import StopRepeatedErrors
    from orchestrator.run.storage_stop import StopOnStorageFault
    from orchestrator.run.trainable import (
        FAULT_ALWAYS_ENV,
        FAULT_ENV,
        HOLD_ENV,
        TrialContext,
        run_planned_trial,
    )
    from orchestrator.tracking.sweep import TrackingCallback

    spec = plan.spec
    context = TrialContext.for_plan(
        spec.name,
        str(sweep_dir),
        plan.trials,
        plan.units,
        spec.resources.threads,
        run_figures=spec.run_figures,
        fault_once=os.environ.get(FAULT_ENV),
        fault_always=os.environ.get(FAULT_ALWAYS_ENV),
        hold=os.environ.get(HOLD_ENV),
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_planned_trial, context=context),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
    )
    path = path or layout.tune_dir(sweep_dir)
    storage_path, filesystem = layout.tune_storage(path.parent)
    if _restorable(path, console):
        return tune.Tuner.restore(
            layout.tune_storage(path)[0],
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=filesystem,
        )
    names = tuple(unit_name(i, unit, plan, keys) for i, unit in enumerate(plan.units))
    return tune.Tuner(
        trainable,
        param_space={"unit": tune.grid_search(list(range(len(plan.units))))},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=spec.max_concurrent_trials or trials_at_once(spec.resources),
            reuse_actors=REUSE_ACTORS,
            trial_name_creator=functools.partial(trial_name, names=names),
            trial_dirname_creator=functools.partial(trial_name, names=names),
        ),
        run_config=tune.RunConfig(
            name=path.name,  # Tune's experiment directory: storage_path / name = layout.tune_dir
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            # Keep every (epoch-marker) checkpoint: see orchestrator/run/trainable.py for why none is deleted.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            callbacks=[
                StopOnStorageFault(sweep_dir),  # first: the others then know a trial's error is the disk's
                ProgressCallback(spec.name, [len(unit) for unit in plan.units]),
                TrackingCallback(sweep_dir, [[keys[i] for i in unit] for unit in plan.units]),
                StopRepeatedErrors(spec.max_failures),
            ],
            verbose=0,
        ),
    )


def trials_at_once(resources: Resources) -> int:
    """How many trials the connected Ray cluster runs at once: Tune's limit when the spec sets none.

    Without a limit Tune creates every trial at once and asks Ray for resources for up to 200 of
    them, so after a worker dies its retry queues behind all the others' requests: the dead
    worker's CPU went to the next waiting trial, and the retry waited for a running trial to end
    (bench/retry_delay.py, packs of 16 seeds and 40 epochs on a loaded 2-core machine: 78 s; now
    12-15 s, nearly all of it the new worker process importing torch). With as many trials as
    fit, none waits, and the retry takes the slot its worker freed. A cluster that should grow
    under load (an autoscaler adds nodes for waiting trials) sets max_concurrent_trials itself.
    """
    import ray

    offered = ray.cluster_resources()
    fits = [offered.get("CPU", 0.0) / resources.cpu]
    if resources.gpu:
        fits.append(offered.get("GPU", 0.0) / resources.gpu)
    return max(1, math.floor(min(fits) + 1e-9))  # 0.3 / 0.1 is 2.999...: three fit


def unit_name(index: int, unit: tuple[int, ...], plan: SweepPlan, keys: list[str]) -> str:
    """Unit index, scheme, seed(s) and the first trial key: short, unique, readable."""
    first = plan.trials[unit[0]]
    seeds = f"s{first.seed}" if len(unit) == 1 else f"s{first.seed}-{plan.trials[unit[-1]].seed}"
    return f"{index:05d}_{first.scheme.name}_{seeds}_{keys[unit[0]]}"


def trial_name(trial: Any, names: tuple[str, ...]) -> str:
    """Tune's name and directory for a unit (see unit_name)."""
    return names[trial.config["unit"]]
