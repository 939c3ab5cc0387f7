"""What reaches the console: Ray's syncer tracebacks condensed to one line each."""

from __future__ import annotations

import io
import logging
import traceback

import pytest

from orchestrator.run.progress import CONDENSED_LOGGERS, quiet_ray_logs


def a_traceback() -> str:
    try:
        open("/nonexistent/experiment_state.json")  # noqa: SIM115
    except FileNotFoundError:
        return traceback.format_exc()
    raise AssertionError("unreachable")


@pytest.fixture
def captured() -> io.StringIO:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    for name in CONDENSED_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    yield out
    for name in CONDENSED_LOGGERS:
        logging.getLogger(name).removeHandler(handler)


def test_the_storage_syncers_pasted_traceback_is_one_line(captured: io.StringIO) -> None:
    quiet_ray_logs()
    quiet_ray_logs()  # idempotent: one filter, not two
    logger = logging.getLogger("ray.train._internal.syncer")
    assert sum(type(f).__name__ == "OneLineErrors" for f in logger.filters) == 1
    # What Ray logs after a killed worker (ray/train/_internal/syncer.py, _launch_sync_process).
    logger.warning(f"Last sync command failed with the following error:\n{a_traceback()}")
    [line] = captured.getvalue().splitlines()
    assert line.startswith("Last sync command failed") and "FileNotFoundError" in line


def test_the_experiment_state_traceback_is_one_line(captured: io.StringIO) -> None:
    quiet_ray_logs()
    try:
        open("/nonexistent/experiment_state.json")  # noqa: SIM115
    except FileNotFoundError:
        logging.getLogger("ray.tune.execution.experiment_state").error("Saving failed: ", exc_info=True)
    [line] = captured.getvalue().splitlines()
    assert line.startswith("Saving failed") and "FileNotFoundError" in line
