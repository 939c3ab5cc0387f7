"""The process that logs a sweep's trials to MLflow while Tune runs them (TrackingCallback's worker).

Logging a trial is ~80 ms of Python on a sqlite store (SQLAlchemy building and committing rows).
In a thread of the driver it held the GIL beside Tune's controller, which then handled a finished
trial and started the next at half speed: the gap between two trials on a worker was 0.05 s with
that thread and 0.02 s with logging off (bench/scale.py, 200 one-second trials). In a process of
its own it shares no interpreter with the controller.

One process, so the store still sees one writer at a time (the driver itself writes only before
Tune starts and after it ends). A fresh `python -m orchestrator.tracking.log_process`, not a fork
(the driver runs Ray's and gRPC's threads, which a fork would copy mid-flight) and not
multiprocessing's spawn (which re-imports the caller's main module: a user's unguarded script
would run again). One per driver for the whole sweep (`sweep_logging`), every batch of a
sequential study included: a process per Tune experiment re-imported MLflow (~2 s of a core) at
each batch and could log nothing of a batch until it had. The driver writes one trial key per line
to its stdin and closes it before its final reconcile; the process logs each key in turn and exits
at end of input. It imports no Ray.
It runs in a session of its own, so Ctrl-C at the terminal or a scheduler's signal to the driver's
process group reaches the driver only, which decides when logging stops (it drains the queue);
it stops early if the driver is gone (a new driver logs what is left).

After a failed attempt the logger pauses for `OUTAGE_PAUSE_S`: trials whose turn comes meanwhile
are skipped, not queued behind the client's retries, so a dead server costs one failed attempt per
pause instead of one per trial. Their directories are complete; the end-of-sweep reconcile or
`lottery sync` logs them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console

from orchestrator import layout
from orchestrator.errors import one_line
from orchestrator.tracking.record import SweepRecord
from orchestrator.tracking.runs import client_for, log_trial

OUTAGE_PAUSE_S = 30.0  # after a failed log, skip trials for this long
PIPE_BYTES = 1024 * 1024  # the queue of trial keys the driver may run ahead of the logger


@dataclass
class TrialLogger:
    """Where a sweep's trials are logged; `log` runs in the logging process, one key at a time."""

    sweep_dir: str  # a local path or a storage URI (layout.location)
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    paused_until: float = field(default=0.0, compare=False)

    @classmethod
    def for_sweep(cls, record: SweepRecord, sweep_dir: layout.Location) -> TrialLogger:
        """Logging into the runs of `record` (from `open_sweep`) from the trial directories of `sweep_dir`."""
        return cls(_name(sweep_dir), record.tracking_uri, record.experiment_id, record.parent_run_id)

    def log(self, key: str) -> None:
        if time.monotonic() < self.paused_until:
            return
        try:
            log_trial(
                client_for(self.tracking_uri),
                self.experiment_id,
                layout.trial_dir(layout.location(self.sweep_dir), key),
                parent_run_id=self.parent_run_id,
            )
        except Exception as exc:  # an outage must not stop the sweep; reconcile or `lottery sync` catch up
            self.paused_until = time.monotonic() + OUTAGE_PAUSE_S
            Console(stderr=True).print(
                f"[yellow]tracking: trial {key} not logged ({one_line(exc)}); "
                f"trials ending in the next {OUTAGE_PAUSE_S:.0f} s are left for `lottery sync`[/]",
                highlight=False,
            )


class LogProcess:
    """The driver's handle: `submit` queues a trial key, `close` waits until every queued key is done."""

    def __init__(self, logger: TrialLogger) -> None:
        package_root = str(Path(__file__).resolve().parents[2])  # importable whatever the driver's sys.path
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        document = {k: v for k, v in asdict(logger).items() if k != "paused_until"}
        self._process: subprocess.Popen[str] | None = subprocess.Popen(
            [sys.executable, "-m", __name__, json.dumps(document)],
            stdin=subprocess.PIPE,
            text=True,
            env=os.environ | {"PYTHONPATH": path},
            start_new_session=True,  # see the module docstring
        )
        if self._process.stdin is not None and hasattr(fcntl, "F_SETPIPE_SZ"):
            # A full pipe would block Tune's event loop in `submit`: at Linux's default 64 KiB that is
            # ~3,800 keys behind a slow server; at 1 MiB (the unprivileged limit), ~60,000.
            with contextlib.suppress(OSError):
                fcntl.fcntl(self._process.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)

    def submit(self, key: str) -> None:
        """Queue `key`; a process that is gone (killed) leaves the key to the end-of-sweep reconcile."""
        if self._process is None or self._process.stdin is None:
            return
        try:
            self._process.stdin.write(key + "\n")
            self._process.stdin.flush()
        except (OSError, ValueError):  # a broken pipe: the trial directories keep the record
            self._process = None

    def close(self) -> None:
        if self._process is None:
            return
        if self._process.stdin is not None:
            with contextlib.suppress(OSError):  # it died with keys unread: reconcile logs them
                self._process.stdin.close()
        self._process.wait()
        self._process = None


_RUNNING: dict[str, LogProcess] = {}  # sweep_dir -> the driver's logging process for it


@contextlib.contextmanager
def sweep_logging(logger: TrialLogger) -> Iterator[LogProcess]:
    """The driver's logging process for one sweep, from before Tune's first experiment to after its last.

    Registered by sweep directory because Tune's callbacks cannot carry it: Tune pickles them into
    the experiment and runs the unpickled copy after `Tuner.restore` (see TrackingCallback).
    Leaving waits until every queued key is logged.
    """
    name = _name(logger.sweep_dir)
    process = LogProcess(logger)
    _RUNNING[name] = process
    try:
        yield process
    finally:
        del _RUNNING[name]
        process.close()


def running(sweep_dir: layout.Location | str) -> LogProcess | None:
    """The logging process `sweep_logging` holds open for `sweep_dir` in this driver, if any."""
    return _RUNNING.get(_name(sweep_dir))


def _name(sweep_dir: layout.Location | str) -> str:
    """A sweep directory as the text the logging process is told and registered by."""
    return str(layout.location(sweep_dir))


def serve(document: str) -> None:
    """The logging process: one trial key per line of stdin until it ends, or the driver is gone."""
    logger = TrialLogger(**json.loads(document))
    driver = os.getppid()
    for line in sys.stdin:
        if os.getppid() != driver:
            return
        logger.log(line.strip())


if __name__ == "__main__":
    from orchestrator.process_exit import run_then_exit

    run_then_exit(lambda: serve(sys.argv[1]))
