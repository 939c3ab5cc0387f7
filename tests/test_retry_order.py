"""A killed worker's trial is retried in the slot the worker freed, before any trial that was waiting.

Without max_concurrent_trials Tune used to ask Ray for resources for every trial at once; the slot
a SIGKILLed worker freed then went to the next waiting trial, and the retry waited for a whole trial
to end (bench/retry_delay.py times it). The order is what is asserted, read from the attempt
records, so the test holds however slow the machine is: one slot (a trial asks for every CPU), two
units; the first unit's worker is killed while it trains and the second has never started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from specfactory import BASE, write_spec
from test_sweep import ray_tmpdir

from orchestrator import layout
from orchestrator.run.trainable import FAULT_ALWAYS_ENV, FAULT_ENV, read_attempts
from orchestrator.spec import load_plan

__all__ = ["ray_tmpdir"]  # the fixture, shared with test_sweep
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def epochs_written(trial_dir: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(trial_dir / layout.METRICS).num_rows
    except (OSError, ValueError):
        return 0


def test_a_killed_workers_trial_is_retried_before_a_waiting_trial_starts(tmp_path, ray_tmpdir):
    cpus = os.cpu_count() or 1
    spec = write_spec(
        tmp_path,
        "order",
        base=BASE | {"epochs": 20},  # the kill lands while the first unit trains: a window of 19 epochs
        pack_size=1,
        resources={"cpu": cpus},  # one trial at a time on any machine
        storage_path=str(tmp_path / "runs"),
    )
    first, waiting = [tmp_path / "runs" / "order" / "trials" / t.trial_key() for t in load_plan(spec).trials]
    env = os.environ | {"RAY_TMPDIR": ray_tmpdir, "RAY_USAGE_STATS_ENABLED": "0"}
    for name in (FAULT_ENV, FAULT_ALWAYS_ENV):
        env.pop(name, None)
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "sweep", str(spec)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while epochs_written(first) < 1 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert epochs_written(first) >= 1 and not read_attempts(waiting), (
            tmp_path / "driver.log"
        ).read_text()
        os.kill(read_attempts(first)[0]["pid"], signal.SIGKILL)
        assert driver.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    retried, started = read_attempts(first), read_attempts(waiting)
    assert len(retried) == 2 and len(started) == 1
    assert retried[1]["started"] < started[0]["started"], "the waiting trial took the freed slot first"
