"""A real sequential study on a local Ray: its driver SIGKILLed mid-batch, then the same command again.

Tiny digits trials (2 seeds per batch, one at a time) of 20 epochs, ~2 s each: the kill needs batch
2 still running (its second seed) after its first seed is logged, and at 2 epochs that window was
0.2 s, which a CI run's 0.2-s poll missed. The resumed study must finish without retraining
or re-logging anything, stop where a replay of its finished trials says it stops, and list in
trials.json exactly the batches it opened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from specfactory import BASE, spec_doc
from test_sweep import (  # noqa: F401  (ray_tmpdir is a fixture)
    child_runs,
    complete_runs,
    finished_keys,
    kill_pids,
    lingering_ray_pids,
    ray_pids,
    ray_tmpdir,
)

from orchestrator.aggregate import aggregate, sequential_statement
from orchestrator.run.trainable import FAULT_ENV, read_attempts
from orchestrator.sequential import replay
from orchestrator.spec import load_plan

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def write_study(tmp_path: Path) -> Path:
    doc = spec_doc(
        "study",
        base=BASE | {"epochs": 20},
        # width 0.7 needs at least 4 seeds (2 give at best 0.86): the study looks at least twice
        seeds={"start": 0, "max": 6, "batch": 2, "until": "failure_rate_ci_width <= 0.7"},
        pack_size=1,
        max_concurrent_trials=1,
        max_failures=1,
        storage_path=str(tmp_path / "runs"),
    )
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def opened(sweep_dir: Path) -> int:
    path = sweep_dir / "sequential.json"
    return json.loads(path.read_text())["opened"] if path.exists() else 0


def test_a_sigkilled_sequential_study_resumes_mid_batch_and_stops_where_its_rule_says(
    tmp_path,
    ray_tmpdir,  # noqa: F811  (the fixture imported above)
):
    spec = write_study(tmp_path)
    plan = load_plan(spec)
    keys = [t.trial_key() for t in plan.trials]
    sweep_dir = tmp_path / "runs" / "study"
    env = os.environ | {"RAY_TMPDIR": ray_tmpdir, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop(FAULT_ENV, None)
    command = [sys.executable, "-m", "orchestrator", "sweep", str(spec)]
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    second = keys[2:4]  # batch 2: seeds 2 and 3
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and driver.poll() is None:
        if opened(sweep_dir) == 2 and set(complete_runs(sweep_dir)) & set(second):
            break  # the study is in its second batch, one trial of it finished and logged
        time.sleep(0.2)
    if driver.poll() is not None or opened(sweep_dir) != 2:
        pytest.fail("not killed in batch 2:\n" + (tmp_path / "first.log").read_text())
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(1)
    kill_pids(ray_pids(f"RAY_TMPDIR={ray_tmpdir}"))

    before = finished_keys(sweep_dir, keys)
    # Usually one of batch 2's two concurrent trials has finished; on a loaded machine the other can
    # finish too before the first is logged. Either way nothing finished may be trained again.
    assert set(keys[:2]) <= set(before) and len(set(before) & set(second)) >= 1, before
    assert set(before) <= set(keys[:4])  # nothing of a batch that was never opened
    tries = {k: len(read_attempts(sweep_dir / "trials" / k)) for k in before}
    mtimes = {k: (sweep_dir / "trials" / k / "result.json").stat().st_mtime_ns for k in before}
    logged = complete_runs(sweep_dir)

    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(resuming)" in done.stderr and "sequential: stopped" in done.stderr, done.stderr
    assert not lingering_ray_pids(ray_tmpdir)

    state = json.loads((sweep_dir / "sequential.json").read_text())
    ran = keys[: 2 * state["opened"]]
    assert finished_keys(sweep_dir, keys) == ran  # every opened trial finished, nothing beyond
    assert [r["trial_key"] for r in json.loads((sweep_dir / "trials.json").read_text())] == ran
    assert {k: len(read_attempts(sweep_dir / "trials" / k)) for k in before} == tries
    assert {k: (sweep_dir / "trials" / k / "result.json").stat().st_mtime_ns for k in before} == mtimes
    assert sorted((sweep_dir / "tune").iterdir()) == [
        sweep_dir / "tune" / f"batch-{i:03d}" for i in range(state["opened"])
    ]
    children = child_runs(sweep_dir)[2]
    assert sorted(r.data.tags["trial_key"] for r in children) == sorted(ran)  # once each
    after = {r.data.tags["trial_key"]: (r.info.run_id, r.info.start_time) for r in children}
    assert {k: after[k] for k in logged} == logged

    # The decision is the replay of the finished trials: stop at the first look meeting the rule.
    result = aggregate(sweep_dir)
    again = replay(plan.spec.sequential, plan.spec.seeds, result.trials)
    assert state["opened"] == (again.stop_look or plan.n_batches) >= 2
    assert len(state["looks"]) == len(result.looks) == state["opened"]
    widths = (result.looks["cs_high"] - result.looks["cs_low"]).tolist()
    assert all(w > 0.7 for w in widths[:-1])
    assert (widths[-1] <= 0.7) == (again.stop_look is not None)
    statement = sequential_statement(result.looks)
    assert statement and f"{2 * state['opened']} seeds per configuration" in statement
    assert "anytime-valid" in statement
