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
from barrier import Barrier, lingering_ray_pids
from specfactory import BASE
from test_sweep import child_runs, complete_runs, finished_keys

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
        base=BASE | {"epochs": 3},
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


def kill_logging_processes(
    driver: subprocess.Popen, sweep_dir: Path, keys: list[str], kills: int, barrier: Barrier, log: Path
) -> None:
    """SIGKILL each of the sweep's first `kills` logging processes while the first trial is held at the
    barrier (no trial has ended, so no run can be logged yet)."""
    barrier.wait_reached(1, driver, log)
    killed: set[int] = set()
    deadline = time.monotonic() + 240
    while len(killed) < kills and driver.poll() is None and time.monotonic() < deadline:
        for pid in logging_pids(sweep_dir) - killed:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
            break
        time.sleep(0.02)
    assert len(killed) == kills, f"killed {len(killed)} logging process(es), wanted {kills}"
    assert not finished_keys(sweep_dir, keys)  # held: nothing ended before the kills


def first_run_while_others_are_held(
    driver: subprocess.Popen, sweep_dir: Path, keys: list[str], barrier: Barrier, log: Path
) -> int:
    """Release the first trial alone; once the second is held, wait for the first trial's run to reach
    MLflow; then release every trial. Returns how many trials had ended when that run arrived."""
    barrier.release(keys[:1])
    barrier.wait_reached(2, driver, log, also=lambda: bool(complete_runs(sweep_dir)))
    ended = len(finished_keys(sweep_dir, keys))
    barrier.release()
    return ended


def start_sweep(spec: Path, tmp_path: Path, ray_root: str, barrier: Barrier) -> subprocess.Popen:
    env = os.environ | {"RAY_TMPDIR": ray_root, "RAY_USAGE_STATS_ENABLED": "0"} | barrier.env()
    env.pop(FAULT_ENV, None)
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "sweep", str(spec)],
        cwd=ROOT,
        env=env,
        stdout=(tmp_path / "sweep.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.mark.kill
def test_a_killed_logging_process_is_restarted_and_logs_the_sweeps_runs_while_it_runs(
    tmp_path,
    ray_tmpdir,
):
    spec = write_spec(tmp_path)
    keys = [t.trial_key() for t in load_plan(spec).trials]
    sweep_dir = tmp_path / "runs" / "logged"
    barrier = Barrier(tmp_path / "barrier", epoch=0)
    driver = start_sweep(spec, tmp_path, ray_tmpdir, barrier)
    try:
        kill_logging_processes(driver, sweep_dir, keys, 1, barrier, tmp_path / "sweep.log")
        ended_at_first_run = first_run_while_others_are_held(
            driver, sweep_dir, keys, barrier, tmp_path / "sweep.log"
        )
        driver.wait(timeout=300)
    finally:
        driver.kill()
        driver.wait()
    said = (tmp_path / "sweep.log").read_text()
    assert driver.returncode == 0, said
    # Logged as the trials end, by the restarted process: not all at the end by the driver.
    assert ended_at_first_run == 1, (ended_at_first_run, said)
    deaths = [line for line in said.splitlines() if "logging process died" in line]
    assert len(deaths) == 1, said
    assert deaths[0].startswith("tracking: the MLflow logging process died (signal SIGKILL); restarting it")
    assert sorted(complete_runs(sweep_dir)) == sorted(keys)
    assert len(child_runs(sweep_dir)[2]) == len(keys)  # one run each
    assert not lingering_ray_pids(ray_tmpdir)


@pytest.mark.kill
def test_a_logging_process_that_dies_twice_ends_the_sweep_with_exit_3_and_sync_completes_it(
    tmp_path,
    ray_tmpdir,
):
    spec = write_spec(tmp_path)
    keys = [t.trial_key() for t in load_plan(spec).trials]
    sweep_dir = tmp_path / "runs" / "logged"
    barrier = Barrier(tmp_path / "barrier", epoch=0)
    driver = start_sweep(spec, tmp_path, ray_tmpdir, barrier)
    try:
        kill_logging_processes(driver, sweep_dir, keys, 2, barrier, tmp_path / "sweep.log")
        barrier.release()
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
