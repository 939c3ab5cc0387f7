"""A real sequential study on a local Ray: its driver SIGKILLed mid-batch, then the same command again.

Tiny digits trials (2 seeds per batch, one at a time): the kill lands with batch 2's first seed
finished and logged and its second held after its first epoch (tests/barrier.py), at any load.
The resumed study must finish without retraining or re-logging anything, stop where a replay of
its finished trials says it stops, and list in trials.json exactly the batches it opened.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from barrier import Barrier, kill_driver, lingering_ray_pids
from specfactory import BASE, spec_doc
from test_sweep import child_runs, complete_runs, finished_keys

from orchestrator.aggregate import aggregate
from orchestrator.run.trainable import FAULT_ENV, read_attempts
from orchestrator.sequential import replay
from orchestrator.spec import load_plan
from orchestrator.tables import sequential_statement

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def write_study(tmp_path: Path) -> Path:
    doc = spec_doc(
        "study",
        base=BASE | {"epochs": 3},
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


@pytest.mark.kill
def test_a_sigkilled_sequential_study_resumes_mid_batch_and_stops_where_its_rule_says(tmp_path, ray_tmpdir):
    spec = write_study(tmp_path)
    plan = load_plan(spec)
    keys = [t.trial_key() for t in plan.trials]
    sweep_dir = tmp_path / "runs" / "study"
    second = keys[2:4]  # batch 2: seeds 2 and 3
    barrier = Barrier(tmp_path / "barrier", only=second[1:])
    env = os.environ | {"RAY_TMPDIR": ray_tmpdir, "RAY_USAGE_STATS_ENABLED": "0"} | barrier.env()
    env.pop(FAULT_ENV, None)
    command = [sys.executable, "-m", "orchestrator", "sweep", str(spec)]
    log_path = tmp_path / "first.log"
    with log_path.open("w") as log:
        driver = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    # The study is in its second batch, one trial of it finished and logged, the other held.
    barrier.wait_reached(1, driver, log_path, also=lambda: second[0] in complete_runs(sweep_dir))
    assert opened(sweep_dir) == 2, log_path.read_text()
    kill_driver(driver, ray_tmpdir)
    barrier.release()  # for the resumed run

    before = finished_keys(sweep_dir, keys)
    assert set(before) == set(keys[:3]), before  # batch 1, and batch 2's first seed
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
