"""Stored trials before training: damaged ones and results trained on other data are set aside (kept,
never deleted), so their trials train again.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from orchestrator import layout


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
