"""A unit that fails twice with the same error, with no epoch completed in between, is not retried again.

Tune retries a failed trial up to `max_failures` times whatever the error. A deterministic error
(broken data, a bad setting, a bug reached at the same epoch) fails every retry the same way, and
each retry costs a fresh worker, the data loaded again and the epochs up to the error: a sweep
whose trials all raised the same error once spent minutes retrying them.

The worker judges, because only it knows both sides: every failed attempt leaves `failure.json`
in the unit's directory (the error's digest and the epoch the unit had reached, `layout.FAILURE`),
and an attempt that fails with the error its predecessor left, at the same epoch, is a repeat.
The driver decides, because Tune decides a retry on its own state: before raising, the worker
reports `{REPEATED_KEY: 1}` (a report is handled by the driver before the worker goes on, so it
arrives before the error), and `StopRepeatedErrors` lowers that trial's `max_failures` so the error
that follows ends the trial as errored. An errored trial stays errored in Tune's state, so running
the sweep again gives it one more attempt, as before (a fixed cause then trains it).

Why not a check when an attempt starts: Tune would still start the worker, and the trial would use
up its retries on refusals; and nothing in Tune 2.60 lets a trainable's error say "do not retry".
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from typing import Any

from ray.tune import Callback

from orchestrator import layout
from orchestrator.run.errored import last_line

REPEATED_KEY = "repeated_error"  # in a unit's last report: the error that follows repeats the one before
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")  # object addresses differ from one process to the next


def error_digest(text: str) -> str:
    """The identity of an error's traceback: the same code path and message give the same digest."""
    return hashlib.sha256(_ADDRESS.sub("0x?", text).strip().encode()).hexdigest()[:16]


def last_failure(unit_dir: layout.Location) -> dict[str, Any] | None:
    """The unit's last failed attempt as recorded (None if none, or unreadable: then it is retried)."""
    try:
        doc = layout.read_json(unit_dir / layout.FAILURE)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def record_failure(
    unit_dir: layout.Location, previous: dict[str, Any] | None, error: str, epoch: int
) -> bool:
    """Record this attempt's failure; True if it repeats `previous` (same error, same epoch reached).

    A record that cannot be written (a full disk) raises nothing: the error itself is what gets raised.
    """
    current = {"error": error_digest(error), "epoch": epoch, "line": last_line(error)}
    with contextlib.suppress(OSError):
        unit_dir.mkdir(parents=True, exist_ok=True)
        layout.atomic_write_json(unit_dir / layout.FAILURE, current)
    return previous is not None and (previous.get("error"), previous.get("epoch")) == (
        current["error"],
        epoch,
    )


class StopRepeatedErrors(Callback):
    """Ends a trial whose worker reported a repeated error: no retry after the error that follows.

    Tune retries while `num_failures <= max_failures` (Trial.should_recover, counted after the
    failure), so setting `max_failures` to the failures so far makes the coming one the last. It is
    set back once the trial has errored: Tune saves it in the experiment state. Plain data only, as
    Tune pickles its callbacks into the experiment.
    """

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(REPEATED_KEY):
            trial.max_failures = trial.run_metadata.num_failures

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        trial.max_failures = self.max_failures
