"""Stop the whole sweep the moment a trial reports a storage fault (a full or read-only disk).

Tune would retry the trial (`max_failures`), and every other running trial would fail the same way:
minutes of identical tracebacks that cannot succeed. `StopOnStorageFault` sees the trial's error
when Tune handles it, before any retry starts, records the fault for the driver, and ends the Tune
run the way Ctrl-C does (Tune's own interrupt handler): its loop stops, the running trials stop, and
the trials keep their Tune status, so the same `lottery sweep` command resumes them once the disk
has room. Stopping through Tune's stopper instead would mark every trial TERMINATED, and a restored
experiment never runs a terminated trial again.

Tune pickles its callbacks into the experiment and uses that copy after `Tuner.restore`, so the
fault is kept here by sweep directory (`fault_for`), not on the callback.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import ray.cloudpickle as cloudpickle
from ray.tune import Callback

from orchestrator.storage_fault import StorageFault

_FAULTS: dict[str, StorageFault] = {}
# Loggers that go on about the stop: Tune's (its interrupt warning, a state it cannot save to the full
# disk) and Ray's "Unhandled error" traceback of a trial that failed the same way while Tune stopped.
# The fault's one line has said what happened, and the CLI says how to resume.
SILENCED_LOGGERS = (
    "ray.tune.tune",
    "ray.tune.execution.tune_controller",
    "ray.tune.execution.experiment_state",
    "ray.train._internal.syncer",
    "ray._private.worker",
)


def fault_for(sweep_dir: object) -> StorageFault | None:
    """The storage fault that stopped this sweep's Tune run in this process, if one did."""
    return _FAULTS.get(str(sweep_dir))


def forget(sweep_dir: object) -> None:
    _FAULTS.pop(str(sweep_dir), None)


def stopping() -> bool:
    """A storage fault is stopping a sweep in this process: a trial error now is that fault again
    (orchestrator/run/progress.py then says nothing of retries that will not happen)."""
    return bool(_FAULTS)


class StopOnStorageFault(Callback):
    """Ends the Tune run at the first trial error that is a StorageFault (see the module docstring)."""

    def __init__(self, sweep_dir: object) -> None:
        self.sweep_dir = str(sweep_dir)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial)

    def _check(self, trial: Any) -> None:
        fault = trial_fault(trial)
        if fault is None or self.sweep_dir in _FAULTS:
            return
        _FAULTS[self.sweep_dir] = fault
        for name in SILENCED_LOGGERS:
            logging.getLogger(name).addFilter(_silenced)
        interrupt_tune()


def _silenced(record: logging.LogRecord) -> bool:
    return not _FAULTS


def trial_fault(trial: Any) -> StorageFault | None:
    """The trial's last error, if it is a StorageFault: Tune pickles it beside the trial on the driver
    (its staging directory, on the driver's disk) before it calls the callbacks."""
    path = getattr(trial, "pickled_error_file", None)
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            error = cloudpickle.load(f)
    except Exception:  # unreadable or unpicklable: not ours to judge
        return None
    cause = getattr(error, "cause", error)  # a RayTaskError carries the trial's own exception
    return cause if isinstance(cause, StorageFault) else None


def interrupt_tune() -> None:
    """What Ctrl-C does to a running Tune (its handler sets the event its loop checks; SIGUSR1 is
    Tune's second name for it, installed even when its SIGINT handler is turned off)."""
    handler = signal.getsignal(signal.SIGUSR1)
    if callable(handler):
        handler(signal.SIGUSR1, None)
