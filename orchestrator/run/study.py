"""The driver loop of a sequential seed study: one Tune experiment per seed batch, a look after each.

The rule, its replay over the trial table and the study's state are orchestrator/sequential.py's
(pure, shared with `lottery aggregate`); this loop is the part that runs trials, so it lives with
the driver. After every batch it reads the trial table (orchestrator/aggregate.py), replays the rule
and either stops or opens the next batch, writing the state before the plan it implies.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from orchestrator import layout
from orchestrator.aggregate import load_trials
from orchestrator.sequential import StudyState, describe_stop, replay
from orchestrator.spec import SweepPlan


def run_study(
    plan: SweepPlan, sweep_dir: Path, fit: Callable[[SweepPlan, Path], None], console: Console
) -> SweepPlan:
    """Run open batches one Tune experiment at a time, looking after each; returns the open plan."""
    rule = plan.spec.sequential
    assert rule is not None
    state = StudyState.load(sweep_dir)
    while state.stopped is None:
        index = state.opened - 1
        batch = plan.batch(index)
        fit(batch, layout.tune_dir(sweep_dir, index))
        counts = layout.count_trials(sweep_dir, [t.trial_key() for t in batch.trials])
        if counts["unfinished"]:
            break  # interrupted: the same command resumes this batch
        result = replay(rule, plan.spec.seeds, load_trials(sweep_dir))
        state.looks = result.looks.astype(object).where(result.looks.notna(), None).to_dict("records")
        if result.stop_look is not None or state.opened >= plan.n_batches:
            state.stopped = describe_stop(plan, result)
            state.save(sweep_dir)
            break
        last = result.looks[result.looks["look"] == result.complete_looks]
        unmet = ", ".join(f"{r.scheme} {r.hparam_label}".strip() + f" {r.verdict}" for r in last.itertuples())
        console.print(
            f"sequential: look {result.complete_looks} not met ({unmet}); opening batch {state.opened + 1}"
        )
        state.opened += 1
        state.save(sweep_dir)  # first the state, then the plan it implies (re-derived on resume)
        layout.atomic_write_json(layout.plan_file(sweep_dir), plan.opened(state.opened).rows())
    if state.stopped:
        console.print(f"sequential: {state.stopped}")
    return plan.opened(state.opened)
