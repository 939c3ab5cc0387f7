"""The Ray Tune function trainable: one planned unit, a trial or a pack of seeds of one configuration.

The driver passes the whole expanded plan (see TrialContext) and its units through
`tune.with_parameters`, and Tune's only search dimension is `unit`, so Tune's grid order
never decides which configuration runs. Trial directories are the source of truth: finished
seeds are never retrained; an unfinished unit resumes from its own checkpoint (in the trial
directory for a lone seed, in `packs/<pack_key>/` for a pack), written atomically every epoch.

The checkpoint reported to Tune every epoch but the last holds only that epoch (`epoch.json`),
and Tune keeps all of them. The last epoch reports nothing: its result follows at once.
Tune deletes checkpoints beyond `num_to_keep` as soon as a newer one is registered but saves
its experiment state asynchronously, so a driver killed in between
leaves a state that points at a deleted checkpoint and the trial can never be restored.
Marker checkpoints cost a few bytes each, so none needs deleting; the model state is written
once per epoch instead of twice.

Every attempt appends a line to `<trial_dir>/attempts.jsonl` of each seed it trains (pid, the Ray
node's id and IP, start time, the epoch it resumed from, from which checkpoint, and the epoch of the
checkpoint Tune restored), so a retry, and where it ran, is visible on disk. A finished seed of the
unit gets none: it is not trained again (its pack mate retrained after damage, say).

A unit that fails because the sweep directory is full or read-only raises StorageFault
(orchestrator/storage_fault.py), whatever its underlying error, so the driver stops the sweep
instead of retrying it.

Fault injection for tests: the driver reads `LOTTERY_FAULT_ONCE=<trial_key>:<epoch>` and
passes it here; that trial raises once, right after epoch `<epoch>` (not its last, which makes no
checkpoint) has been reported with its checkpoint. A marker file in the trial directory makes it
fire only once. `LOTTERY_FAULT_ALWAYS=<trial_key>:<epoch>` (tests only, too) makes that trial raise
the same error in every attempt, at the end of epoch `<epoch>` (0-based) before its checkpoint: a
deterministic error. For either, `*` in place of the trial key means every trial.

A failed attempt is recorded in the unit's `failure.json`; one that repeats the error its
predecessor left, at the same epoch, is not retried again (orchestrator/run/repeats.py).

Barrier for tests: `LOTTERY_HOLD=<epoch>:<directory>` (read by the driver, passed here the same way)
holds a trial right after epoch `<epoch>` (counted from 0 as above; not its last) has been
checkpointed and reported to Tune: it writes `<directory>/reached-<trial_key>` (each seed of a pack)
and waits until `<directory>/release` exists (or `release-<trial_key>`, which releases that trial
alone: every seed of its pack). A kill test so lands its fault where it says, at
any load: the trial's epochs up to then are on disk and reported to Tune, nothing after. If
`<directory>/only` exists, it lists the trial keys that hold (one a line); the others run through,
so a test can let some trials finish while others wait. A retry that resumes after `<epoch>` never
holds again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from orchestrator import layout
from orchestrator.run import repeats
from orchestrator.run.trial import TrialDirSink, load_checkpoint, pack_key, run_trials
from orchestrator.storage_fault import StorageFault, storage_fault
from trainers.config import DataConfig, TrialConfig
from trainers.data import LoadedData, load_data
from trainers.events import TUNE, EpochRecord, result_fields
from trainers.loop import pick_device

FAULT_ENV = "LOTTERY_FAULT_ONCE"
FAULT_ALWAYS_ENV = "LOTTERY_FAULT_ALWAYS"  # tests only: a deterministic error (see the module docstring)
HOLD_ENV = "LOTTERY_HOLD"  # tests only: see the module docstring
HOLD_POLL_S = 0.05
HOLD_REACHED, HOLD_RELEASE, HOLD_ONLY = "reached-", "release", "only"  # the barrier's file names
RESULT_KEYS = result_fields(TUNE)


class InjectedFault(RuntimeError):
    """Raised by the test-only fault hook; never by real training."""


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one sweep shares; sent once through the object store.

    Every trial start fetches and unpickles all of it, so the plan is held in its smallest form:
    each distinct configuration once (JSON text, which unpickles as one object), and per planned
    trial the index of its configuration and its seed. A plan's trials differ only by seed within
    a configuration (spec.expand), so 500 seeds of one configuration are one document, not 500.
    """

    sweep: str
    sweep_dir: str
    configs: tuple[str, ...]  # distinct TrialConfig documents (JSON), seed aside
    trials: tuple[tuple[int, int], ...]  # per plan index: (index into configs, seed)
    units: tuple[tuple[int, ...], ...]  # plan indices trained together (a pack) or alone
    threads: int  # torch intra-op threads: the trial's CPU share
    run_figures: bool = True  # each seed's CGN figure for its MLflow run (SweepSpec.run_figures)
    fault_once: str | None = None  # "<trial_key>:<epoch>", tests only
    fault_always: str | None = None  # "<trial_key>:<epoch>", tests only
    hold: str | None = None  # "<epoch>:<directory>", tests only

    @classmethod
    def for_plan(
        cls,
        sweep: str,
        sweep_dir: str,
        trials: tuple[TrialConfig, ...],
        units: tuple[tuple[int, ...], ...],
        threads: int,
        run_figures: bool = True,
        fault_once: str | None = None,
        fault_always: str | None = None,
        hold: str | None = None,
    ) -> TrialContext:
        configs: dict[str, int] = {}
        planned = []
        for trial in trials:
            document = trial.with_seed(0).model_dump_json()
            planned.append((configs.setdefault(document, len(configs)), trial.seed))
        return cls(
            sweep,
            sweep_dir,
            tuple(configs),
            tuple(planned),
            units,
            threads,
            run_figures,
            fault_once,
            fault_always,
            hold,
        )

    def members(self, unit: int) -> list[TrialConfig]:
        """The trials one Tune trial trains, as planned."""
        configs: dict[int, TrialConfig] = {}
        members = []
        for index in self.units[unit]:
            config, seed = self.trials[index]
            if config not in configs:
                configs[config] = TrialConfig.model_validate_json(self.configs[config])
            members.append(configs[config].with_seed(seed))
        return members


def run_planned_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Tune entry point: `config` is `{"unit": i}`."""
    try:
        _run_unit(config, context)
    except StorageFault:
        raise
    except Exception as exc:  # a full or read-only disk under another error (Tune's checkpoint upload)
        fault = storage_fault(exc, context.sweep_dir)
        if fault is None:
            raise
        raise fault from None


def _run_unit(config: dict[str, Any], context: TrialContext) -> None:
    members = context.members(config["unit"])
    sweep_dir = layout.location(context.sweep_dir)  # a local path, or a URI this worker writes to itself
    trial_dirs = [layout.trial_dir(sweep_dir, t.trial_key()) for t in members]
    unit_dir = trial_dirs[0] if len(members) == 1 else layout.pack_dir(sweep_dir, pack_key(members))
    done = [layout.trial_status(d) for d in trial_dirs]  # the only reading: passed on below
    if all(s.finished for s in done):  # finished in an earlier attempt or driver: report, never retrain
        tune.report(_result_metrics([s.result for s in done]))
        return
    torch.set_num_threads(context.threads)
    resume, epoch, source = _resume_state(unit_dir)
    tune_epoch = _tune_checkpoint_epoch()
    for directory, status in zip(trial_dirs, done, strict=True):
        if not status.finished:  # only the seeds this attempt trains
            _record_attempt(directory, epoch, source, tune_epoch)
    fault_epoch = _members_fault_epoch(context.fault_once, members)
    always_epoch = _members_fault_epoch(context.fault_always, members)
    previous_failure = repeats.last_failure(unit_dir)
    reached = [epoch]  # the unit's checkpointed epoch: what a retry resumes from
    last: dict[str, float] = {}

    def on_epoch(record: EpochRecord) -> None:
        last.clear()
        last.update(epoch=record.epoch, train_loss=record.train_loss, test_acc=record.test_acc)
        if record.epoch == always_epoch:
            raise InjectedFault(f"{FAULT_ALWAYS_ENV}: injected failure in epoch {record.epoch}")

    def on_checkpoint(epoch: int, state: dict[str, Any]) -> None:
        # The state itself was just written to the unit's own checkpoint; Tune's marks the epoch.
        # The loop makes none after the last epoch: the result follows at once, and every report is
        # a round trip to the driver (the trainable waits for it), a large share of a short trial's cost.
        reached[0] = int(state["progress"]["epoch"])
        with tempfile.TemporaryDirectory() as tmp:
            mark = {"epoch": reached[0]}
            (Path(tmp) / layout.EPOCH_MARK).write_text(json.dumps(mark))
            tune.report(dict(last), checkpoint=tune.Checkpoint.from_directory(tmp))
        if context.hold:
            _hold(context.hold, epoch, [t.trial_key() for t in members])
        if epoch == fault_epoch:
            _inject_fault_once(unit_dir, epoch)

    try:
        data = _load_data_or_record(members, trial_dirs, context.sweep, done)
        results = run_trials(
            members,
            trial_dirs,
            sweep=context.sweep,
            pack_dir=unit_dir,
            data=data,
            resume=resume,
            on_epoch=on_epoch,
            on_checkpoint=on_checkpoint,
            run_figures=context.run_figures,
            statuses=done,
        )
    except Exception:
        if repeats.record_failure(unit_dir, previous_failure, traceback.format_exc(), reached[0]):
            with contextlib.suppress(Exception):  # then Tune retries as usual
                tune.report({repeats.REPEATED_KEY: 1})  # handled by the driver before the error below
        raise
    tune.report(_result_metrics(results))


def _resume_state(unit_dir: layout.Location) -> tuple[dict[str, Any] | None, int, str | None]:
    """The unit's own checkpoint: (state, epoch to start from, "trial_dir"), or a fresh start."""
    state = load_checkpoint(unit_dir)
    if state is None:
        return None, 0, None
    return state, int(state["progress"]["epoch"]), "trial_dir"


def _tune_checkpoint_epoch() -> int | None:
    """The epoch marked by the checkpoint Tune restored (a retry or a restored driver), if any."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        marker = Path(path) / layout.EPOCH_MARK
        return int(json.loads(marker.read_text())["epoch"]) if marker.exists() else None


def _record_attempt(
    trial_dir: layout.Location, epoch: int, source: str | None, tune_epoch: int | None
) -> None:
    trial_dir.mkdir(parents=True, exist_ok=True)
    line = {
        "pid": os.getpid(),
        "node_id": ray.get_runtime_context().get_node_id(),  # which cluster node ran this attempt
        "node_ip": ray.util.get_node_ip_address(),
        "started": time.time(),
        "resumed_from_epoch": epoch,
        "checkpoint": source,
        "tune_checkpoint_epoch": tune_epoch,
    }
    layout.append_line(trial_dir / layout.ATTEMPTS, json.dumps(line))


def read_attempts(trial_dir: layout.Location) -> list[dict[str, Any]]:
    path = trial_dir / layout.ATTEMPTS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _load_data_or_record(
    members: list[TrialConfig],
    trial_dirs: list[layout.Location],
    sweep: str,
    statuses: list[layout.TrialStatus],
) -> LoadedData:
    """Data outside run_trials (to cache it), so a loading error is recorded here, as run_trials would."""
    trial = members[0]
    try:
        device = _device_here(trial.device)
        return _cached_data(trial.data.model_dump_json(), trial.data_seed, str(device))
    except Exception:
        for member, trial_dir, status in zip(members, trial_dirs, statuses, strict=True):
            TrialDirSink(trial_dir, member, sweep, status=status).on_error(traceback.format_exc())
        raise


class DeviceUnavailable(RuntimeError):
    """The trial's device does not exist on the Ray node that runs it (e.g. cuda on a CPU node)."""


def _device_here(name: str) -> torch.device:
    """The trial's device on this node; if it is missing, one line naming the device and the node."""
    try:
        return pick_device(name)
    except ValueError:
        node = f"{ray.util.get_node_ip_address()} (node id {ray.get_runtime_context().get_node_id()[:12]})"
        raise DeviceUnavailable(
            f"device: '{name}' requested but Ray node {node} has no CUDA device; give the trial "
            "resources.gpu only on nodes with CUDA, or use device 'auto' or 'cpu'"
        ) from None


@functools.lru_cache(maxsize=1)
def _cached_data(data_json: str, data_seed: int, device: str) -> LoadedData:
    """One load per worker process: with reuse_actors, consecutive trials share the data."""
    return load_data(DataConfig.model_validate_json(data_json), data_seed, torch.device(device))


def _result_metrics(results: list[dict[str, Any] | None]) -> dict[str, Any]:
    """What Tune sees of a unit: its seeds' mean final metrics (the per-seed truth is on disk)."""
    done = [r for r in results if r]
    metrics: dict[str, Any] = {"seeds": len(results), "seeds_finished": len(done)}
    metrics["seeds_failed"] = sum(1 for r in done if r.get("failed"))  # `failed` below is a mean
    for key in RESULT_KEYS:
        values = [float(r[key]) for r in done if key in r]
        if values:
            metrics[key] = sum(values) / len(values)
    return metrics


def _fault_epoch(fault: str | None, trial_key: str) -> int | None:
    if not fault:
        return None
    key, _, epoch = fault.partition(":")
    return int(epoch) if key in (trial_key, "*") else None


def _members_fault_epoch(fault: str | None, members: list[TrialConfig]) -> int | None:
    return next((e for t in members if (e := _fault_epoch(fault, t.trial_key())) is not None), None)


def _inject_fault_once(unit_dir: layout.Location, epoch: int) -> None:
    unit_dir.mkdir(parents=True, exist_ok=True)
    marker = unit_dir / layout.FAULT_MARKER
    if marker.exists():
        return
    marker.write_text(str(epoch))
    raise InjectedFault(f"{FAULT_ENV}: injected failure after epoch {epoch}")


def _hold(hold: str, epoch: int, keys: list[str]) -> None:
    """The test barrier (see the module docstring): announce the epoch, then wait for the release."""
    at, _, where = hold.partition(":")
    directory = Path(where)
    if epoch != int(at):
        return
    only = directory / HOLD_ONLY
    if only.exists() and not set(keys) & set(only.read_text().split()):
        return
    for key in keys:
        (directory / f"{HOLD_REACHED}{key}").touch()
    released = [directory / HOLD_RELEASE, *(directory / f"{HOLD_RELEASE}-{key}" for key in keys)]
    while not released[0].exists() and not all(path.exists() for path in released[1:]):
        time.sleep(HOLD_POLL_S)
