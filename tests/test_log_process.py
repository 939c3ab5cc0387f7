"""The MLflow logging process a sweep's Tune callback feeds: real sqlite store, real child process."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from rich.console import Console
from trialfactory import config

from orchestrator import layout
from orchestrator.run.trial import run_trial
from orchestrator.tracking.log_process import PIPE_BYTES, LogProcess, TrialLogger, running, sweep_logging
from orchestrator.tracking.runs import ensure_experiment
from orchestrator.tracking.store import prepare_store

ROOT = Path(__file__).resolve().parents[1]


def finished_sweep(tmp_path: Path, seeds: int) -> tuple[TrialLogger, MlflowClient, list[str]]:
    torch.set_num_threads(1)
    sweep_dir = tmp_path / "sweep"
    keys = []
    for seed in range(seeds):
        trial = config(epochs=1, seed=seed)
        run_trial(trial, layout.trial_dir(sweep_dir, trial.trial_key()), sweep="s")
        keys.append(trial.trial_key())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepare_store(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = ensure_experiment(client, "s", tmp_path / "artifacts")
    parent = client.create_run(experiment).info.run_id
    return TrialLogger(str(sweep_dir), uri, experiment, parent), client, keys


def child_runs(client: MlflowClient, logger: TrialLogger) -> dict[str, str]:
    runs = client.search_runs(
        [logger.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{logger.parent_run_id}'"
    )
    return {r.data.tags["trial_key"]: r.data.tags.get("logged", "") for r in runs}


@pytest.mark.slow
def test_every_submitted_trial_is_logged_once_by_the_time_close_returns(tmp_path: Path) -> None:
    logger, client, keys = finished_sweep(tmp_path, seeds=3)
    process = LogProcess(logger)
    pid = process._process.pid  # type: ignore[union-attr]
    for key in keys + keys[:1]:  # a key repeated (a callback after a restore) logs nothing twice
        process.submit(key)
    process.close()
    assert pid != os.getpid()
    assert child_runs(client, logger) == dict.fromkeys(keys, "complete")


@pytest.mark.slow
def test_the_driver_can_queue_tens_of_thousands_of_keys_without_waiting(tmp_path: Path) -> None:
    # Tune's event loop calls `submit`: a pipe that filled behind a slow store would stall it.
    logger, _, _ = finished_sweep(tmp_path, seeds=1)
    process = LogProcess(logger)
    assert process._process is not None and process._process.stdin is not None
    size = fcntl.fcntl(process._process.stdin.fileno(), fcntl.F_GETPIPE_SZ)
    process.close()
    assert size >= PIPE_BYTES and size // len("0123456789abcdef\n") > 50_000


def wait_for_deaths(process: LogProcess, deaths: int, timeout: float = 60) -> float:
    """Seconds until the driver's handle has noticed `deaths` deaths of its logging process."""
    start = time.monotonic()
    while len(process.deaths) < deaths and time.monotonic() - start < timeout:
        time.sleep(0.005)
    assert len(process.deaths) == deaths, process.deaths
    return time.monotonic() - start


@pytest.mark.slow
def test_a_killed_logging_process_is_noticed_at_once_and_restarted_with_what_it_had_not_logged(
    tmp_path: Path,
) -> None:
    logger, client, keys = finished_sweep(tmp_path, seeds=3)
    said = StringIO()
    process = LogProcess(logger, Console(file=said, width=80))
    first = process._process
    assert first is not None
    first.send_signal(signal.SIGSTOP)  # frozen: the keys below wait in its pipe, unlogged
    for key in keys[:2]:
        process.submit(key)
    first.send_signal(signal.SIGKILL)
    noticed = wait_for_deaths(process, 1)
    second = process._process
    assert second is not None and second.pid != first.pid and second.poll() is None
    process.submit(keys[2])  # the restarted process takes the sweep's next trials too
    process.close()
    assert child_runs(client, logger) == dict.fromkeys(keys, "complete")
    assert process.deaths == [-signal.SIGKILL] and not process.gave_up
    lines = said.getvalue().strip().splitlines()
    assert lines == [
        "tracking: the MLflow logging process died (signal SIGKILL); restarting it once (2 trial(s) to "
        "log again)"
    ]
    assert noticed < 10, noticed  # an end of pipe, not a poll: milliseconds on an idle machine


@pytest.mark.slow
def test_a_second_death_is_not_restarted_and_leaves_the_runs_to_sync(tmp_path: Path) -> None:
    logger, client, keys = finished_sweep(tmp_path, seeds=2)
    said = StringIO()
    process = LogProcess(logger, Console(file=said, width=80))
    for deaths in (1, 2):
        child = process._process
        assert child is not None
        child.send_signal(signal.SIGKILL)
        wait_for_deaths(process, deaths)
    assert process._process is None and process.gave_up
    for key in keys:
        process.submit(key)  # no process: no exception reaches Tune's event loop
    process.close()
    assert child_runs(client, logger) == {}  # left for `lottery sync`; the sweep exits 3
    lines = said.getvalue().strip().splitlines()
    assert len(lines) == 2 and "restarting it once" in lines[0], lines
    assert lines[1].startswith("tracking: the MLflow logging process died again (signal SIGKILL); not rest")


@pytest.mark.slow
def test_ctrl_c_at_the_terminal_reaches_the_driver_only(tmp_path: Path) -> None:
    # The terminal signals its foreground process group; the logger sits in a session of its own, so
    # the driver (which drains the queue before it stops) decides when logging ends.
    logger, client, keys = finished_sweep(tmp_path, seeds=1)
    process = LogProcess(logger)
    child = process._process
    assert child is not None
    assert os.getpgid(child.pid) != os.getpgrp() and os.getsid(child.pid) != os.getsid(0)
    process.submit(keys[0])
    process.close()
    assert child.returncode == 0
    assert child_runs(client, logger) == dict.fromkeys(keys, "complete")


@pytest.mark.slow
def test_the_logging_process_stops_when_the_driver_is_gone(tmp_path: Path) -> None:
    # A driver SIGKILLed: its logger must not outlive it (a new driver logs what is left).
    logger, _, _ = finished_sweep(tmp_path, seeds=1)
    script = (
        "import sys, time\n"
        "from orchestrator.tracking.log_process import LogProcess, TrialLogger\n"
        f"process = LogProcess(TrialLogger(**{logger.__dict__!r}))\n"
        "print(process._process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert driver.stdout is not None
    child = int(driver.stdout.readline())
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 60
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(child)  # its stdin closed with the driver: it exits


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.split()[2] != "Z"  # a zombie (exited, not yet reaped by init) is gone


def test_the_logging_process_loads_no_ray(tmp_path: Path) -> None:
    code = "import sys, orchestrator.tracking.log_process; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.slow
def test_a_sweeps_logging_process_is_found_by_its_directory_until_it_is_drained(tmp_path: Path) -> None:
    logger, client, keys = finished_sweep(tmp_path, seeds=2)
    assert running(logger.sweep_dir) is None
    with sweep_logging(logger) as process:
        assert running(logger.sweep_dir) is process  # what every Tune experiment's callback submits to
        assert running(str(tmp_path / "other")) is None
        for key in keys:
            process.submit(key)
    assert running(logger.sweep_dir) is None
    assert child_runs(client, logger) == dict.fromkeys(keys, "complete")  # drained on the way out
