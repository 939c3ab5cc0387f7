"""The sweep's Tune experiment: its trainable, names, concurrency and callbacks; restored when it can be.

A sequential study runs one experiment per seed batch (orchestrator/run/study.py).
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from orchestrator import layout
from orchestrator.spec import Resources, SweepPlan

if TYPE_CHECKING:  # imports Ray, which a dry run never needs
    from ray.tune import Tuner


REUSE_ACTORS = True  # Tune's actor reuse; bench/retry_delay.py measures both ways after a worker kill


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
