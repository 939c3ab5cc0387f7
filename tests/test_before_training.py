"""One pre-training policy (orchestrator/run/policy.py), and a worker call that reads each trial's status
once: on an object store every reading of a trial's status is several requests."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator import layout
from orchestrator.run import trainable
from orchestrator.run import trial as trial_module
from tests.trialfactory import config

ROOT = Path(__file__).resolve().parents[1]


class _Session:
    """Ray Tune's session API as a worker outside Tune sees it: no restored checkpoint; reports kept."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    def report(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        self.reports.append(metrics)

    def get_checkpoint(self) -> None:
        return None


_NODE = SimpleNamespace(  # the Ray node an attempt records: no Ray started for a unit test
    get_runtime_context=lambda: SimpleNamespace(get_node_id=lambda: "node"),
    util=SimpleNamespace(get_node_ip_address=lambda: "127.0.0.1"),
)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every reading of a trial's status, by trial key (read_result is one, too)."""
    counts: Counter[str] = Counter()
    real = layout.trial_status

    def counting(trial_dir: layout.Location) -> layout.TrialStatus:
        counts[trial_dir.name] += 1
        return real(trial_dir)

    monkeypatch.setattr(layout, "trial_status", counting)
    monkeypatch.setattr(trial_module, "trial_status", counting)
    return counts


def test_a_worker_call_reads_each_trials_status_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: Counter[str]
) -> None:
    session = _Session()
    monkeypatch.setattr(trainable, "tune", session)
    monkeypatch.setattr(trainable, "ray", _NODE)
    members = (config(seed=0, epochs=1), config(seed=1, epochs=1))  # a pack of two seeds
    sweep_dir = tmp_path / "sweep"
    context = trainable.TrialContext.for_plan("s", str(sweep_dir), members, ((0, 1),), 1, run_figures=False)
    keys = [m.trial_key() for m in members]

    trainable._run_unit({"unit": 0}, context)  # trains both seeds
    assert reads == {key: 1 for key in keys}
    assert session.reports[-1]["seeds_finished"] == 2

    reads.clear()
    trainable._run_unit({"unit": 0}, context)  # both finished: reported, not trained
    assert reads == {key: 1 for key in keys}
    assert session.reports[-1]["seeds_finished"] == 2
    assert all(layout.trial_status(layout.trial_dir(sweep_dir, key)).finished for key in keys)


def test_only_the_policy_sets_a_trial_aside_before_training() -> None:
    """Damaged and changed-data trial directories are moved in orchestrator/run/policy.py alone."""
    movers = re.compile(r"damaged_aside\(|CHANGED_DATA\b")
    found = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "orchestrator").rglob("*.py")
        if movers.search(path.read_text())
    )
    assert found == ["orchestrator/layout.py", "orchestrator/run/policy.py"]
