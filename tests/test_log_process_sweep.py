"""A real sweep's MLflow logging process SIGKILLed, on a local Ray with a real sqlite store.

The test finds the logging process by its command line (`python -m orchestrator.tracking.log_process`
with this sweep's directory) and kills it with a real SIGKILL the moment it appears. It appears
before Tune's first experiment starts, and the trials (one at a time, 20 epochs, ~2 s each) end
seconds later, so every run is left to the process that replaces it; the test checks that order
and fails, saying so, if a trial ended before the kill. Once the kill barrier (`LOTTERY_HOLD`,
tests/barrier.py) is available, holding the first trial at an epoch until the kill has landed
makes that order certain instead of checked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import specfactory
from specfactory import BASE
from test_sweep import (  # noqa: F401  (ray_tmpdir is a fixture)
    child_runs,
    complete_runs,
    finished_keys,
    lingering_ray_pids,
    ray_tmpdir,
)

from orchestrator import layout
from orchestrator.run.trainable import FAULT_ENV
from orchestrator.spec import load_plan

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
LOGGER_MODULE = "orchestrator.tracking.log_process"


def write_spec(tmp_path: Path) -> Path:
    return specfactory.write_spec(
        tmp_path,
        "logged",
        base=BASE | {"epochs": 20},
        seeds=[0, 1, 2, 3],
        pack_size=1,
        max_concurrent_trials=1,  # one at a time: trials still run after the first one's run is logged
        max_failures=1,
        storage_path=str(tmp_path / "runs"),
    )


def logging_pids(sweep_dir: Path) -> set[int]:
    """Live logging processes of this sweep, found by their command line."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if LOGGER_MODULE.encode() in argv and any(str(sweep_dir).encode() in a for a in argv):
            found.add(int(proc.name))
    return found


def kill_logging_processes(driver: subprocess.Popen, sweep_dir: Path, keys: list[str], kills: int) -> None:
    """SIGKILL each of the sweep's first `kills` logging processes as soon as it appears."""
    killed: set[int] = set()
    deadline = time.monotonic() + 240
    while len(killed) < kills and driver.poll() is None and time.monotonic() < deadline:
        for pid in logging_pids(sweep_dir) - killed:
            if finished_keys(sweep_dir, keys):
                pytest.fail("a trial ended before the logging process was killed: the kill came late")
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
            break
        time.sleep(0.02)
    assert len(killed) == kills, f"killed {len(killed)} logging process(es), wanted {kills}"


def watch_until_done(driver: subprocess.Popen, sweep_dir: Path, keys: list[str]) -> int | None:
    """How many trials had ended when the first run reached MLflow (None: none before the driver ended)."""
    while driver.poll() is None:
        if complete_runs(sweep_dir):
            ended = len(finished_keys(sweep_dir, keys))
            driver.wait(timeout=300)
            return ended
        time.sleep(0.2)
    return None


def start_sweep(spec: Path, tmp_path: Path, ray_root: str) -> subprocess.Popen:
    env = os.environ | {"RAY_TMPDIR": ray_root, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop(FAULT_ENV, None)
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "sweep", str(spec)],
        cwd=ROOT,
        env=env,
        stdout=(tmp_path / "sweep.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_a_killed_logging_process_is_restarted_and_logs_the_sweeps_runs_while_it_runs(
    tmp_path,
    ray_tmpdir,  # noqa: F811  (the fixture imported above)
):
    spec = write_spec(tmp_path)
    keys = [t.trial_key() for t in load_plan(spec).trials]
    sweep_dir = tmp_path / "runs" / "logged"
    driver = start_sweep(spec, tmp_path, ray_tmpdir)
    try:
        kill_logging_processes(driver, sweep_dir, keys, kills=1)
        ended_at_first_run = watch_until_done(driver, sweep_dir, keys)
    finally:
        driver.kill()
        driver.wait()
    said = (tmp_path / "sweep.log").read_text()
    assert driver.returncode == 0, said
    # Logged as the trials end, by the restarted process: not all at the end by the driver.
    assert ended_at_first_run is not None and ended_at_first_run < len(keys), (ended_at_first_run, said)
    deaths = [line for line in said.splitlines() if "logging process died" in line]
    assert len(deaths) == 1, said
    assert deaths[0].startswith("tracking: the MLflow logging process died (signal SIGKILL); restarting it")
    assert sorted(complete_runs(sweep_dir)) == sorted(keys)
    assert len(child_runs(sweep_dir)[2]) == len(keys)  # one run each
    assert not lingering_ray_pids(ray_tmpdir)


def test_a_logging_process_that_dies_twice_ends_the_sweep_with_exit_3_and_sync_completes_it(
    tmp_path,
    ray_tmpdir,  # noqa: F811  (the fixture imported above)
):
    spec = write_spec(tmp_path)
    keys = [t.trial_key() for t in load_plan(spec).trials]
    sweep_dir = tmp_path / "runs" / "logged"
    driver = start_sweep(spec, tmp_path, ray_tmpdir)
    try:
        kill_logging_processes(driver, sweep_dir, keys, kills=2)
        driver.wait(timeout=300)
    finally:
        driver.kill()
        driver.wait()
    said = (tmp_path / "sweep.log").read_text()
    assert driver.returncode == 3, said
    assert finished_keys(sweep_dir, keys) == keys  # the sweep went on: every trial ended
    assert "died again (signal SIGKILL); not restarting it" in said, said
    assert said.strip().splitlines()[-1] == f"tracking incomplete (exit 3): run `lottery sync {sweep_dir}`"
    assert complete_runs(sweep_dir) == {}
    assert logging_pids(sweep_dir) == set()  # no third process

    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "sync", str(sweep_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"{len(keys)} created, 0 already present, 0 not finished" in done.stderr, done.stderr
    assert sorted(complete_runs(sweep_dir)) == sorted(keys)
    assert child_runs(sweep_dir)[1].info.status == "FINISHED"
    assert layout.count_trials(sweep_dir, keys)["finished"] == len(keys)
