"""A sequential seed study: seed batches added to a running sweep until its stopping rule holds.

`seeds: {start: 0, max: 400, batch: 20, until: RULE}` plans up to `max` seeds per configuration
(orchestrator/spec.py orders them batch first) and opens them one batch at a time. After every
batch the driver (orchestrator/run/study.py) looks once: it replays the rule over the trial table
(the same `replay` that `lottery aggregate` runs, so the decision can be recomputed from the results
alone) and either stops or opens the next batch. The intervals the rule reads are confidence sequences
(dashboards/sequential.py), valid at whatever look the study stops, which a fixed-n interval
checked after every batch is not.

State lives in `sequential.json` (how many batches are open, every look, why it stopped) and
`trials.json` lists the open batches' trials only, so aggregation's denominator is what the
study actually ran. Each batch is its own Tune experiment (`tune/batch-<i>/`), restored like
any sweep's after a driver kill. The design (seeds, batch, rule) is fixed once the study has
started: changing the rule after seeing results would void the intervals, so it is refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from dashboards.sequential import LOOK_COLUMNS, failure_rate_look, looks_frame, paired_look
from dashboards.sources import variance_share_look
from orchestrator import layout
from orchestrator.errors import UserError
from orchestrator.spec import SweepPlan
from orchestrator.spec_seeds import FailureRateRule, Sequential, VarianceShareRule


@dataclass(frozen=True)
class Replay:
    """Every look a study's trial table supports, and the first at which the rule held."""

    looks: pd.DataFrame  # LOOK_COLUMNS, one row per (look, arm)
    stop_look: int | None  # 1-based look at which the rule held, None if it has not
    complete_looks: int  # batches whose every trial has ended (finished or errored)


def look_rows(rule: Sequential, trials: pd.DataFrame) -> list[dict[str, Any]]:
    """The rule's statistic per arm on these trials (one look)."""
    until = rule.until
    if isinstance(until, FailureRateRule):
        return failure_rate_look(trials, until.width, until.confidence)
    if isinstance(until, VarianceShareRule):
        return variance_share_look(trials, until.source, until.width)
    return paired_look(trials, until.scheme, until.vs, until.decided, until.smallest_effect)


def replay(rule: Sequential, seeds: list[int], trials: pd.DataFrame) -> Replay:
    """Look after each complete seed batch, in order; stop at the first look where every arm meets
    the rule. Pure: the driver and the aggregation both decide with it."""
    rows: list[dict[str, Any]] = []
    stop, complete = None, 0
    for look in range(1, math.ceil(len(seeds) / rule.batch) + 1):
        opened = set(seeds[: look * rule.batch])
        batch_seeds = set(seeds[(look - 1) * rule.batch : look * rule.batch])
        mine = trials[trials["seed"].isin(opened)]
        batch = trials[trials["seed"].isin(batch_seeds)]
        if batch.empty or batch["status"].isin(["pending", "incomplete"]).any():
            break  # this batch has not been run to its end: no look yet
        complete = look
        arms = look_rows(rule, mine)
        rows += [{"look": look, "seeds": len(opened)} | arm | {"rule": rule.describe()} for arm in arms]
        if arms and all(arm["met"] for arm in arms):
            stop = look
            break
    return Replay(looks_frame(rows), stop, complete)


@dataclass
class StudyState:
    """sequential.json: batches opened so far, the looks taken, and why the study stopped."""

    opened: int = 1
    looks: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None

    @classmethod
    def load(cls, sweep_dir: Path) -> StudyState:
        path = layout.sequential_file(sweep_dir)
        return cls(**layout.read_json(path)) if path.exists() else cls()

    def save(self, sweep_dir: Path) -> None:
        layout.atomic_write_json(layout.sequential_file(sweep_dir), asdict(self))


def opened_plan(plan: SweepPlan, sweep_dir: Path) -> SweepPlan:
    """The trials a sweep has planned so far: all of them, or a sequential study's open batches."""
    if not plan.batch_ends:
        return plan
    return plan.opened(min(StudyState.load(sweep_dir).opened, plan.n_batches))


def check_design(recorded: dict[str, Any], plan: SweepPlan) -> None:
    """Refuse to continue a sweep under another sequential design (or none) than it started with."""
    spec = plan.spec
    new = spec.sequential.model_dump(mode="json") if spec.sequential else None
    old = recorded.get("sequential")
    if old == new and (new is None or recorded.get("seeds") == spec.seeds):
        return
    was = "a fixed design" if old is None else "a sequential study"
    raise UserError(
        f"seeds: sweep '{spec.name}' started as {was} with other seeds, batch or stopping rule; a study's "
        "design is fixed once it has results (choosing it after seeing them voids its intervals): "
        "restore the recorded seeds or start a new sweep name"
    )


def describe_stop(plan: SweepPlan, result: Replay) -> str:
    rule = plan.spec.sequential
    assert rule is not None
    seeds = min(result.complete_looks * rule.batch, len(plan.spec.seeds))
    if result.stop_look is not None:
        return f"stopped after batch {result.stop_look} ({seeds} seeds per configuration): {rule.describe()}"
    return (
        f"stopped at max after batch {result.complete_looks} ({seeds} seeds per configuration) "
        f"without meeting the rule: {rule.describe()}"
    )


__all__ = ["LOOK_COLUMNS", "Replay", "StudyState", "check_design", "describe_stop", "opened_plan", "replay"]
