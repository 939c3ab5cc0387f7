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

Nothing it does goes unnoticed: after each key it writes the key back on a pipe of its own
(`confirm_fd`), and a watcher thread in the driver reads those confirmations, so the end of that
pipe is the moment the process ended. One that ends unasked (killed, crashed) is reported in one
line and started again once, with every key it had not confirmed. A second death is not restarted
(something keeps killing it: the OOM killer, a crash in the store's client); the trials that end
from then on are left for `lottery sync`, and the sweep says so with exit code 3.

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
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from rich.console import Console

from orchestrator import layout
from orchestrator.errors import one_line
from orchestrator.tracking.record import SweepRecord
from orchestrator.tracking.runs import client_for, log_trial

OUTAGE_PAUSE_S = 30.0  # after a failed log, skip trials for this long
PIPE_BYTES = 1024 * 1024  # the queue of trial keys the driver may run ahead of the logger
RESTARTS = 1  # a logging process that died is started again this many times in one sweep


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
    """The driver's handle: `submit` queues a trial key, `close` waits until every queued key is done.

    A watcher thread follows the process (see the module docstring): it drops each confirmed key
    from `pending`, and when the process ends without being asked it says so and restarts it once,
    re-sending what is still pending. `submit` runs on Tune's event loop, the watcher beside it:
    one lock keeps the two off the process's stdin at once, another guards `pending` alone, so the
    watcher never waits on a `submit` blocked by a full pipe while the process waits on the watcher.
    """

    def __init__(self, logger: TrialLogger, console: Console | None = None) -> None:
        self._document = json.dumps({k: v for k, v in asdict(logger).items() if k != "paused_until"})
        self._console = console or Console(stderr=True)
        self._lock = threading.Lock()  # the process and its stdin
        self._pending_lock = threading.Lock()
        self._pending: dict[str, None] = {}  # submitted, not yet confirmed: in order, each once
        self._closing = False
        self.deaths: list[int] = []  # the return code of each death (negative: the signal)
        self._process: subprocess.Popen[str] | None
        self._process, confirmations = self._start()
        self._watcher = threading.Thread(
            target=self._watch, args=(self._process, confirmations), name="tracking-watch", daemon=True
        )
        self._watcher.start()

    @property
    def gave_up(self) -> bool:
        """It died more often than it is restarted: trials that ended since then have no run."""
        return len(self.deaths) > RESTARTS

    def _start(self) -> tuple[subprocess.Popen[str], TextIO]:
        package_root = str(Path(__file__).resolve().parents[2])  # importable whatever the driver's sys.path
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        read_end, write_end = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, self._document, str(write_end)],
                stdin=subprocess.PIPE,
                text=True,
                env=os.environ | {"PYTHONPATH": path},
                pass_fds=(write_end,),
                start_new_session=True,  # see the module docstring
            )
        finally:
            os.close(write_end)  # the process holds the only write end: its end is the pipe's end
        if process.stdin is not None and hasattr(fcntl, "F_SETPIPE_SZ"):
            # A full pipe would block Tune's event loop in `submit`: at Linux's default 64 KiB that is
            # ~3,800 keys behind a slow server; at 1 MiB (the unprivileged limit), ~60,000.
            with contextlib.suppress(OSError):
                fcntl.fcntl(process.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        return process, os.fdopen(read_end, encoding="utf-8")

    def submit(self, key: str) -> None:
        """Queue `key`; a process that is gone leaves it pending, for its restart or the final reconcile."""
        with self._pending_lock:
            self._pending[key] = None
        with self._lock:
            self._send([key])

    def _send(self, keys: list[str]) -> None:
        """Write `keys` to the running process (under the lock); a broken pipe is the watcher's to handle."""
        if self._process is None or self._process.stdin is None:
            return
        try:
            self._process.stdin.write("".join(key + "\n" for key in keys))
            self._process.stdin.flush()
        except (OSError, ValueError):  # it died: the watcher sees its end and re-sends what is pending
            pass

    def _watch(self, process: subprocess.Popen[str], confirmations: TextIO) -> None:
        """Confirmations until the process ends; then, unless it was asked to end, one restart."""
        while True:
            for line in confirmations:
                with self._pending_lock:
                    self._pending.pop(line.rstrip("\n"), None)
            confirmations.close()
            code = process.wait()
            with self._lock:
                if process.stdin is not None:
                    with contextlib.suppress(OSError):  # keys it never read: still pending
                        process.stdin.close()
                with self._pending_lock:
                    pending = list(self._pending)
                if self._closing and code == 0:
                    self._process = None
                    return
                self._console.print(
                    _death_line(code, len(self.deaths) + 1, len(pending)), highlight=False, soft_wrap=True
                )
                if len(self.deaths) >= RESTARTS:
                    self._process = None
                    self.deaths.append(code)  # last: whoever reads `deaths` sees the state that follows
                    return
                self._process, confirmations = self._start()
                process = self._process
                self._send(pending)
                if self._closing:
                    self._close_stdin()
                self.deaths.append(code)

    def _close_stdin(self) -> None:
        if self._process is not None and self._process.stdin is not None:
            with contextlib.suppress(OSError):  # it died with keys unread: the watcher restarts it
                self._process.stdin.close()

    def close(self) -> None:
        """End of input: wait until the process has logged every key (restarted once if it dies)."""
        with self._lock:
            self._closing = True
            self._close_stdin()
        self._watcher.join()


def _death_line(code: int, deaths: int, pending: int) -> str:
    """The one line a death of the logging process gets."""
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    if deaths <= RESTARTS:
        return (
            f"[yellow]tracking: the MLflow logging process died ({how}); restarting it once "
            f"({pending} trial(s) to log again)[/]"
        )
    return (
        f"[yellow]tracking: the MLflow logging process died again ({how}); not restarting it: trials "
        "that end from now on are left for `lottery sync`[/]"
    )


_RUNNING: dict[str, LogProcess] = {}  # sweep_dir -> the driver's logging process for it


@contextlib.contextmanager
def sweep_logging(logger: TrialLogger, console: Console | None = None) -> Iterator[LogProcess]:
    """The driver's logging process for one sweep, from before Tune's first experiment to after its last.

    Registered by sweep directory because Tune's callbacks cannot carry it: Tune pickles them into
    the experiment and runs the unpickled copy after `Tuner.restore` (see TrackingCallback).
    Leaving waits until every queued key is logged.
    """
    name = _name(logger.sweep_dir)
    process = LogProcess(logger, console)
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


def serve(document: str, confirm_fd: int) -> None:
    """The logging process: one trial key per line of stdin until it ends, or the driver is gone;
    each key is written back to `confirm_fd` once it is done (logged, or left for reconcile)."""
    logger = TrialLogger(**json.loads(document))
    driver = os.getppid()
    confirmations = os.fdopen(confirm_fd, "w", buffering=1, encoding="utf-8")  # a line is a write
    try:
        for line in sys.stdin:
            if os.getppid() != driver:
                return
            key = line.strip()
            logger.log(key)
            confirmations.write(key + "\n")
    except BrokenPipeError:  # the driver is gone
        return
    finally:
        with contextlib.suppress(OSError):
            confirmations.close()


if __name__ == "__main__":
    from orchestrator.process_exit import run_then_exit

    run_then_exit(lambda: serve(sys.argv[1], int(sys.argv[2])))
