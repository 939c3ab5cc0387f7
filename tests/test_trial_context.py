"""The plan every trial receives: each configuration once, then (configuration, seed) per trial."""

from __future__ import annotations

import pickle
from pathlib import Path

import yaml

from orchestrator.run.trainable import TrialContext
from orchestrator.spec import load_plan


def plan_of(tmp_path: Path, seeds: int):
    doc = {
        "name": "ctx",
        "base": {"data": {"name": "synthetic"}, "model": {"name": "crater_cnn", "filters": 2}, "epochs": 2},
        "seeds": list(range(seeds)),
        "schemes": [{"name": "baseline"}, {"name": "randomout", "grid": {"tau": [1e-8, 1e-4]}}],
        "grid": {"model.filters": [1, 3]},
        "pack_size": 2,
    }
    path = tmp_path / f"ctx{seeds}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_plan(path)


def test_every_unit_gets_exactly_its_planned_trials(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, 5)
    context = TrialContext.for_plan("ctx", "/x", plan.trials, plan.units, 1)
    assert len(context.configs) == 6  # (baseline + 2 taus) x 2 widths
    for unit, indices in enumerate(plan.units):
        members = context.members(unit)
        assert members == [plan.trials[i] for i in indices]
        assert [m.trial_key() for m in members] == [plan.trials[i].trial_key() for i in indices]


def test_more_seeds_add_two_numbers_per_trial_not_a_document(tmp_path: Path) -> None:
    small = plan_of(tmp_path, 5)
    large = plan_of(tmp_path, 50)
    size = {
        len(p.trials): len(pickle.dumps(TrialContext.for_plan("ctx", "/x", p.trials, p.units, 1)))
        for p in (small, large)
    }
    per_trial = (size[len(large.trials)] - size[len(small.trials)]) / (len(large.trials) - len(small.trials))
    assert per_trial < 40  # bytes: an index, a seed and a unit entry; a whole document is ~1,000
