"""A killed worker's trial is retried in the slot the worker freed, before any trial that was waiting.

Without max_concurrent_trials Tune used to ask Ray for resources for every trial at once; the slot
a SIGKILLed worker freed then went to the next waiting trial, and the retry waited for a whole trial
to end (bench/retry_delay.py times it). The order is what is asserted, read from the attempt
records, and the kill lands at a barrier (tests/barrier.py), so the test holds however slow the machine
is: one slot (a trial asks for every CPU), two units; the first unit's worker is killed while it is
held after its first epoch, and the second has never started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from barrier import Barrier, kill_driver
from specfactory import BASE, write_spec

from orchestrator.run.trainable import FAULT_ALWAYS_ENV, FAULT_ENV, read_attempts
from orchestrator.spec import load_plan

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.kill
def test_a_killed_workers_trial_is_retried_before_a_waiting_trial_starts(tmp_path, ray_tmpdir):
    cpus = os.cpu_count() or 1
    spec = write_spec(
        tmp_path,
        "order",
        base=BASE | {"epochs": 3},
        pack_size=1,
        resources={"cpu": cpus},  # one trial at a time on any machine
        storage_path=str(tmp_path / "runs"),
    )
    keys = [t.trial_key() for t in load_plan(spec).trials]
    first, waiting = [tmp_path / "runs" / "order" / "trials" / key for key in keys]
    barrier = Barrier(tmp_path / "barrier", epoch=0, only=keys[:1])  # the first unit's first try holds
    env = os.environ | {"RAY_TMPDIR": ray_tmpdir, "RAY_USAGE_STATS_ENABLED": "0"} | barrier.env()
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
        barrier.wait_reached(1, driver, tmp_path / "driver.log")
        assert not read_attempts(waiting), (tmp_path / "driver.log").read_text()
        os.kill(read_attempts(first)[0]["pid"], signal.SIGKILL)
        barrier.release()  # the retry resumes after epoch 0, so it never holds again
        assert driver.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()
    finally:
        if driver.poll() is None:
            kill_driver(driver, ray_tmpdir)
    retried, started = read_attempts(first), read_attempts(waiting)
    assert len(retried) == 2 and len(started) == 1
    assert retried[1]["started"] < started[0]["started"], "the waiting trial took the freed slot first"
