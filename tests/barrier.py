"""Kill tests that land their fault where they say, at any load: a barrier and one way to kill a driver.

`Barrier` drives the trainable's test-only hold (`LOTTERY_HOLD`, orchestrator/run/trainable.py):
every trial it covers waits right after a chosen epoch, checkpointed and reported, until the test
releases it. A test waits until the trials it needs are held (and the ones it lets through have
finished and are logged), then kills: nothing can finish in between, however slow or busy the
machine, which a poll for "a trial has finished" followed by a kill could not promise.

`kill_driver` SIGKILLs a driver's process group and then every Ray process it started, found by
the private RAY_TMPDIR in their environment (Ray's own processes run in sessions of their own
and its workers outlive a SIGKILLed driver).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from raynodes import kill_pids, processes_with

from orchestrator.run.trainable import HOLD_ENV, HOLD_ONLY, HOLD_REACHED, HOLD_RELEASE


class Barrier:
    """Trials wait after epoch `epoch` (counted from 0) until `release`; with `only`, just those keys."""

    def __init__(self, directory: Path, epoch: int = 0, only: Iterable[str] | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.epoch = directory, epoch
        if only is not None:
            (directory / HOLD_ONLY).write_text("".join(f"{key}\n" for key in only))

    def env(self) -> dict[str, str]:
        """The driver's environment entry that turns the barrier on."""
        return {HOLD_ENV: f"{self.epoch}:{self.directory}"}

    def reached(self) -> set[str]:
        """The trial keys held at the barrier so far (released ones included)."""
        return {p.name.removeprefix(HOLD_REACHED) for p in self.directory.glob(f"{HOLD_REACHED}*")}

    def wait_reached(
        self,
        count: int,
        driver: subprocess.Popen,
        log: Path,
        *,
        also: Callable[[], bool] = lambda: True,
        timeout_s: float = 300,
    ) -> set[str]:
        """Until `count` trials are held and `also()` is true; fails at once if the driver has ended."""
        wait_until(lambda: len(self.reached()) >= count and also(), driver, log, timeout_s)
        return self.reached()

    def release(self, keys: Iterable[str] | None = None) -> None:
        """Every trial, now and later; or only the trials `keys` (each seed of a pack must be named)."""
        if keys is None:
            (self.directory / HOLD_RELEASE).touch()
        for key in keys or ():
            (self.directory / f"{HOLD_RELEASE}-{key}").touch()


def wait_until(condition: Callable[[], bool], driver: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll `condition`; the test fails with the driver's output if it ends first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if driver.poll() is not None:
            pytest.fail(f"the driver ended (exit {driver.returncode}) before the barrier:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"not at the barrier within {timeout_s:.0f} s:\n{log.read_text()}")
        time.sleep(0.1)


def ray_processes(ray_tmpdir: str) -> list[int]:
    """The processes of the Ray a driver started with RAY_TMPDIR=`ray_tmpdir`."""
    return processes_with(f"RAY_TMPDIR={ray_tmpdir}")


def lingering_ray_pids(ray_tmpdir: str, grace_s: float = 15.0) -> list[int]:
    """That Ray's processes still alive after `grace_s`: they exit on their own shortly after shutdown."""
    deadline = time.monotonic() + grace_s
    while (pids := ray_processes(ray_tmpdir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return pids


def kill_ray(ray_tmpdir: str, timeout_s: float = 30) -> None:
    """SIGKILL every process of that Ray, again until none is left (a raylet may be starting a worker)."""
    deadline = time.monotonic() + timeout_s
    while (pids := ray_processes(ray_tmpdir)) and time.monotonic() < deadline:
        kill_pids(pids)
        time.sleep(0.2)


def kill_driver(driver: subprocess.Popen, ray_tmpdir: str) -> None:
    """SIGKILL the driver's process group (it was started with start_new_session), then its Ray."""
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    kill_ray(ray_tmpdir)


@pytest.fixture
def ray_tmpdir() -> Iterator[str]:
    """A short private Ray temp root (socket paths must stay under ~107 characters); cleaned by PID."""
    path = tempfile.mkdtemp(prefix="lr", dir="/tmp")
    yield path
    kill_ray(path)
    subprocess.run(["rm", "-rf", path], check=False)
