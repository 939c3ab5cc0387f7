"""What happens to a trial's stored directory before it trains: the one policy, for `lottery train`, the
sweep driver and the trainable.

  finished on the data loaded now  -> reused: reported, never trained again
  finished on other data           -> refused in one line naming `where` (exit 2), or with
                                      --retrain-changed set aside (kept, never deleted) and trained again
  damaged (layout.trial_status)    -> set aside to damaged/ (kept) and trained again
  anything else                    -> trained (an unfinished one resumes from its checkpoint)

A sweep applies it in two steps: its preflight refuses changed data before anything starts (nothing set
aside), and the driver, holding the sweep's lock, sets aside what the preflight found and the trials
that are damaged now. A worker applies it without setting anything aside (the driver did; a damaged
directory is trained afresh in place), and passes the statuses it read on, so a worker call reads each
trial's status once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from orchestrator import layout
from orchestrator.errors import UserError


@dataclass
class Before:
    """What the policy found and did, per trial directory in the order given."""

    statuses: list[layout.TrialStatus]  # after it: a directory set aside is unfinished
    changed: list[tuple[layout.Location, str]]  # finished on other data: (trial dir, its data fingerprint)
    changed_aside: list[layout.Location] = field(default_factory=list)  # where those were moved
    # damaged directories moved: (trial dir, what was wrong, where it was moved)
    damaged: list[tuple[layout.Location, str, layout.Location]] = field(default_factory=list)


def before_training(
    trial_dirs: list[layout.Location],
    fingerprint: str | None,
    *,
    statuses: list[layout.TrialStatus] | None = None,
    retrain_changed: bool = False,
    where: str = "data",
    error: Callable[[str], Exception] = UserError,
    set_aside: bool = True,
    damaged_to: layout.Location | None = None,
) -> Before:
    """Apply the policy (module docstring) to `trial_dirs`, whose statuses are read here unless given.

    `fingerprint`: the data loaded now ("" for generated data); None when it is not known here, so no
    result is compared with it. A result from before fingerprints were recorded ("") differs from any
    file-backed data. Changed data without `retrain_changed` raises `error` naming `where`. With
    `set_aside`, changed results move aside, and damaged directories move to `damaged_to`'s damaged/
    (the sweep directory; None leaves them where they are).
    """
    if statuses is None:
        statuses = [layout.trial_status(d) for d in trial_dirs]
    pairs = list(zip(trial_dirs, statuses, strict=True))
    on_other_data = [
        i
        for i, (_, s) in enumerate(pairs)
        if fingerprint is not None and s.finished and _stored_fingerprint(s) != fingerprint
    ]
    changed = [(pairs[i][0], _stored_fingerprint(pairs[i][1])) for i in on_other_data]
    if changed and not retrain_changed:
        raise error(changed_data_message(changed, fingerprint or "", where))
    before = Before(list(statuses), changed)
    if not set_aside:
        return before
    before.changed_aside = set_aside_changed(changed)
    for i, (directory, status) in enumerate(pairs):
        if i in on_other_data:
            before.statuses[i] = layout.TrialStatus("unfinished")
        elif status.damaged and damaged_to is not None:
            aside = layout.damaged_aside(damaged_to, directory.name)
            aside.parent.mkdir(parents=True, exist_ok=True)
            directory.rename(aside)
            before.damaged.append((directory, status.problem or "", aside))
            before.statuses[i] = layout.TrialStatus("unfinished")
    return before


def _stored_fingerprint(status: layout.TrialStatus) -> str:
    return (status.result or {}).get("data_fingerprint", "")


def changed_data_message(changed: list[tuple[layout.Location, str]], fingerprint: str, where: str) -> str:
    directory, old = changed[0]
    others = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
    return (
        f"{where}: the stored result of trial {directory.name}{others} was trained on other data "
        f"(data fingerprint {old or 'not recorded'}, the data now loaded: {fingerprint or 'generated'}); "
        "pass --retrain-changed to set those results aside and train again, or restore that data"
    )


def set_aside_changed(changed: list[tuple[layout.Location, str]]) -> list[layout.Location]:
    """Move each changed trial directory aside (kept, never deleted), so its trial trains afresh."""
    moved = []
    for directory, _ in changed:
        aside = layout.set_aside(directory, layout.CHANGED_DATA)
        directory.rename(aside)
        moved.append(aside)
    return moved


def set_aside_damaged(sweep_dir: Path, keys: list[str], console: Console) -> list[str]:
    """Move each damaged trial directory to damaged/ (kept, never deleted) so the trial trains again.

    Tune's saved state counts those trials as done, so it is set aside too and Tune starts
    afresh: finished trials only report their stored results, unfinished ones resume from their
    own checkpoints. Returns the keys moved.
    """
    trial_dirs = [layout.trial_dir(sweep_dir, key) for key in keys]
    moved = []
    for directory, problem, aside in before_training(trial_dirs, None, damaged_to=sweep_dir).damaged:
        moved.append(directory.name)
        console.print(
            f"[yellow]trial {directory.name} is damaged ({problem}); moved to {aside}, training it again[/]",
            highlight=False,
            soft_wrap=True,
        )
    tune_dir = layout.tune_dir(sweep_dir)
    if moved and tune_dir.exists():
        tune_dir.rename(layout.set_aside(tune_dir, layout.DAMAGED))
    return moved


def _set_aside_changed(changed: list[tuple[Path, str]], sweep_dir: Path, console: Console) -> None:
    """--retrain-changed: the results trained on other data move aside (kept), and so does Tune's state,
    which counts those trials as done; Tune starts afresh and the other finished trials report from
    their directories."""
    set_aside_changed(changed)
    tune_dir = layout.tune_dir(sweep_dir)
    if tune_dir.exists():
        tune_dir.rename(layout.set_aside(tune_dir, layout.CHANGED_DATA))
    console.print(
        f"{len(changed)} result(s) trained on other data set aside in {layout.trials_root(sweep_dir)}"
    )
