"""A sweep that ends with errored trials says so: exit 4, a last line naming the first error, and a
deterministic error is tried twice per unit, not max_failures + 1 times.

Each test runs `lottery sweep` as a subprocess with its own Ray (the exit code is the process's),
and reads the attempts back from the trial directories. The errors are injected by the trainable's
test-only hooks (orchestrator/run/trainable.py): LOTTERY_FAULT_ALWAYS raises the same error in
every attempt at the end of one epoch, LOTTERY_FAULT_ONCE raises once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from specfactory import spec_doc

from orchestrator import layout
from orchestrator.errors import ERRORED_EXIT
from orchestrator.run.trainable import FAULT_ALWAYS_ENV, FAULT_ENV, read_attempts
from orchestrator.spec import load_plan

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def sweep(tmp_path: Path, ray_tmpdir: str, doc: dict, faults: dict[str, str]) -> subprocess.CompletedProcess:
    spec = tmp_path / f"{doc['name']}.yaml"
    spec.write_text(yaml.safe_dump({"storage_path": str(tmp_path / "runs")} | doc))
    env = os.environ | {"RAY_TMPDIR": ray_tmpdir, "RAY_USAGE_STATS_ENABLED": "0"} | faults
    for name in {FAULT_ENV, FAULT_ALWAYS_ENV} - set(faults):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "sweep", str(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_sweep_whose_trials_all_error_exits_4_names_the_first_error_and_tries_each_unit_twice(
    tmp_path, ray_tmpdir
):
    # A pack of two seeds and a lone seed; max_failures 2 would try each of them three times.
    doc = spec_doc("broken", seeds=[0, 1, 2], pack_size=2)
    done = sweep(tmp_path, ray_tmpdir, doc | {"max_failures": 2}, {FAULT_ALWAYS_ENV: "*:1"})
    assert done.returncode == ERRORED_EXIT == 4, done.stderr
    sweep_dir = tmp_path / "runs" / "broken"
    keys = layout.planned_keys(sweep_dir)
    assert sorted(keys) == sorted(t.trial_key() for t in load_plan(tmp_path / "broken.yaml").trials)
    assert "0/3 finished (0 failed), 3 errored" in done.stderr
    error = f"orchestrator.run.trainable.InjectedFault: {FAULT_ALWAYS_ENV}: injected failure in epoch 1"
    assert done.stderr.strip().splitlines()[-1] == (
        f"ended with 3 errored trial(s) (exit 4); first error: {keys[0]}: {error}; "
        f"see {sweep_dir / 'trials' / keys[0] / 'error.txt'}"
    )
    for key in keys:
        attempts = read_attempts(sweep_dir / "trials" / key)
        # The first try trains epoch 0 and fails in epoch 1; the retry resumes at epoch 1 and fails
        # there again: the same error with no epoch in between, so no third try.
        assert [a["resumed_from_epoch"] for a in attempts] == [0, 1], key
        assert layout.trial_status(sweep_dir / "trials" / key).errored
    assert "not retried" in done.stderr  # the progress line says why it stopped early


def test_a_trial_that_fails_once_then_finishes_exits_0(tmp_path, ray_tmpdir):
    doc = spec_doc("flaky", pack_size=1)
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(doc | {"storage_path": str(tmp_path / "runs")}))
    flaky = load_plan(tmp_path / "plan.yaml").trials[0].trial_key()
    done = sweep(tmp_path, ray_tmpdir, doc, {FAULT_ENV: f"{flaky}:1"})
    assert done.returncode == 0, done.stderr
    sweep_dir = tmp_path / "runs" / "flaky"
    assert "2/2 finished" in done.stderr and "0 errored" in done.stderr
    assert [a["resumed_from_epoch"] for a in read_attempts(sweep_dir / "trials" / flaky)] == [0, 2]
    result = json.loads((sweep_dir / "trials" / flaky / "result.json").read_text())
    assert result["epochs_done"] == 3
