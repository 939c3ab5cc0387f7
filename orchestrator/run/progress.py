"""A compact live view of a sweep, instead of Tune's per-trial table.

One line: done / running / pending, lottery failures (trials that finished but failed),
errored trials (retries exhausted), and an ETA from this session's completion rate; plus one
line per trial error (Tune's own multi-line tracebacks are turned off by the driver). On a
terminal it is a live line; otherwise (logs, `ray job logs`) it prints a line at most every
`interval_s`, and once at the end. Every count is of trials (seeds), not of Tune trials: a seed
pack is one Tune trial holding several seeds, so each unit weighs as many seeds as it trains.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial
from rich.console import Console
from rich.live import Live
from rich.text import Text

from orchestrator.run import storage_stop

FINAL_KEY = "epochs_done"  # only a trial's last report (trainable._result_metrics) carries it


@dataclass(frozen=True)
class Counts:
    total: int
    done: int = 0
    running: int = 0
    failed: int = 0  # finished, with result failed=True (counts in the failure rate)
    errored: int = 0  # gave up after max_failures retries

    @property
    def pending(self) -> int:
        return self.total - self.done - self.running - self.errored

    @classmethod
    def of(cls, trials: list[Trial], unit_sizes: list[int]) -> Counts:
        """Seeds, from Tune's units: done = terminated with a final result (an interrupted one is not).

        A unit's final result says how many of its seeds finished and failed (trainable._result_metrics).
        """
        seeds = Counter[str]()
        done = failed = 0
        for t in trials:
            size = unit_sizes[t.config["unit"]]
            result = t.last_result or {}
            if t.status == Trial.TERMINATED and FINAL_KEY in result:
                done += int(result.get("seeds_finished", size))
                failed += int(result.get("seeds_failed", round(float(result.get("failed", 0)) * size)))
            else:
                seeds[t.status] += size
        return cls(sum(unit_sizes), done, seeds[Trial.RUNNING], failed, seeds[Trial.ERROR])


def eta_text(remaining: int, done_here: int, elapsed_s: float) -> str:
    if remaining == 0:
        return "0s"
    if done_here == 0:
        return "?"
    seconds = int(remaining * elapsed_s / done_here)
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressCallback(Callback):
    """Renders `Counts` from Tune's trial list, throttled; state is rebuilt in `setup` after a restore."""

    def __init__(self, name: str, unit_sizes: list[int], interval_s: float = 30.0) -> None:
        self.name = name
        self.unit_sizes = list(unit_sizes)  # seeds per Tune trial, by unit index
        self.total = sum(self.unit_sizes)
        self.interval_s = interval_s
        self._reset()

    def _reset(self) -> None:
        self._console: Console | None = None
        self._live: Live | None = None
        self._started = time.monotonic()
        self._done_at_start: int | None = None
        self._last_render = 0.0
        self._last_print = 0.0
        self.counts = Counts(self.total)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit_sizes": self.unit_sizes,
            "total": self.total,
            "interval_s": self.interval_s,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def setup(self, **info: Any) -> None:
        self._reset()
        self._console = Console(stderr=True)
        if self._console.is_terminal:
            self._live = Live(self.line(), console=self._console, refresh_per_second=2, transient=False)
            self._live.start()

    def line(self) -> Text:
        c = self.counts
        done_here = c.done + c.errored - (self._done_at_start or 0)
        eta = eta_text(c.pending + c.running, done_here, time.monotonic() - self._started)
        text = Text(f"sweep {self.name}: ")
        text.append(f"{c.done}/{c.total} done", style="bold green")
        text.append(f" · {c.running} running · {c.pending} pending · ")
        text.append(f"{c.failed} failed", style="yellow" if c.failed else "")
        text.append(" · ")
        text.append(f"{c.errored} errored", style="bold red" if c.errored else "")
        text.append(f" · ETA {eta}")
        return text

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        now = time.monotonic()
        if now - self._last_render < 0.5:
            return
        self._last_render = now
        self._update(trials)
        if self._live is not None:
            self._live.update(self.line())
        elif self._console is not None and now - self._last_print >= self.interval_s:
            self._last_print = now
            self._console.print(self.line())

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        if storage_stop.stopping():  # no retry: the sweep stops instead (its one line follows)
            return
        self._say(f"[yellow]trial {trial} raised {_last_line(trial)}; retrying from its last checkpoint[/]")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        from orchestrator.run.repeats import REPEATED_KEY

        if not storage_stop.stopping():
            repeated = (trial.last_result or {}).get(REPEATED_KEY)
            why = (
                "the same error again, with no epoch in between (not retried)" if repeated else "its retries"
            )
            self._say(f"[red]trial {trial} errored after {why}: {_last_line(trial)}[/]")

    def _say(self, message: str) -> None:
        if self._console is not None:
            self._console.print(message, soft_wrap=True, highlight=False)  # one line, even in a log

    def _update(self, trials: list[Trial]) -> None:
        self.counts = Counts.of(trials, self.unit_sizes)
        if self._done_at_start is None:
            self._done_at_start = self.counts.done + self.counts.errored

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self._update(trials)
        if self._live is not None:
            self._live.update(self.line())
            self._live.stop()
            self._live = None
        elif self._console is not None:
            self._console.print(self.line())


class OneLineErrors(logging.Filter):
    """Condense a logger's tracebacks to one line: the message and the exception line.

    Used for Tune's experiment-state syncer: when a save follows the last one closely, its background
    copy can race the next save and log a FileNotFoundError traceback; the next sync repairs it.
    Ray's storage syncer pastes the traceback into the message text itself ("Last sync command
    failed with the following error:\n<traceback>", ~25 lines after a killed worker), so a
    multi-line message is condensed the same way: its first line and its last.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg = f"{record.getMessage()} {type(error).__name__}: {str(error).splitlines()[0]}"
            record.args = None
            record.exc_info = None
        lines = [line.strip() for line in record.getMessage().splitlines() if line.strip()]
        if len(lines) > 1:
            record.msg = f"{lines[0]} {lines[-1]}" if lines[-1] != lines[0] else lines[0]
            record.args = None
        return True


# Ray loggers that print tracebacks about its own state copies, which it repairs on the next copy.
CONDENSED_LOGGERS = ("ray.tune.execution.experiment_state", "ray.train._internal.syncer")


def quiet_ray_logs() -> None:
    """Every traceback those loggers print becomes one line (added once, however often called)."""
    for name in CONDENSED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineErrors) for f in logger.filters):
            logger.addFilter(OneLineErrors())


def _last_line(trial: Trial) -> str:
    """The exception line of a trial's error (Tune's full traceback stays in its error.txt)."""
    text = None
    # Tune writes error.txt in the driver's staging directory first and syncs it to storage later
    # (on a cluster, after this callback), so the local copy is read first.
    with contextlib.suppress(OSError, TypeError):
        text = Path(trial.error_file).read_text()
    lines = [line.strip() for line in str(text or trial.get_error() or "").splitlines() if line.strip()]
    return lines[-1] if lines else "an error"
