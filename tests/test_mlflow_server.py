"""The compose-defined MLflow server, started by hand on a real PostgreSQL, seen by a client, the REST
API, the database and a browser: what a researcher gets when a sweep logs to the team server."""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest
from browser import HEADLESS_FLAGS
from fixtures_mlflow import PostgresDatabase, compose_mlflow_server
from mlflow.entities import Metric, Param
from server import stop_process_group

pytestmark = pytest.mark.integration

ARTIFACTS_DIR = Path(__file__).parent / "artifacts"
CHROMIUM_TIMEOUT_S = 60.0
VAL_LOSS = [0.9, 0.7, 0.55, 0.5, 0.48]
PARAMS = {"seed": "7", "scheme": "reinit", "lr": "0.01"}


@dataclass(frozen=True)
class LoggedRun:
    experiment_id: str
    run_id: str
    run_name: str


@pytest.fixture(scope="module")
def logged_run(mlflow_server: str) -> Iterator[LoggedRun]:
    """One finished run with params and a val_loss curve, logged the way the sweep logger does (log_batch)."""
    token = secrets.token_hex(4)
    with pytest.MonkeyPatch.context() as patch:
        # A dead server should fail this test in seconds, not after the client's 4-minute retry budget.
        patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        client = mlflow.MlflowClient(tracking_uri=mlflow_server)
        experiment_id = client.create_experiment(
            f"lottery-test-{token}", tags={"mlflow.experimentKind": "custom_model_development"}
        )
        run = client.create_run(experiment_id, run_name=f"seed-7-reinit-{token}")
        now_ms = int(time.time() * 1000)
        client.log_batch(
            run.info.run_id,
            metrics=[Metric("val_loss", value, now_ms + step, step) for step, value in enumerate(VAL_LOSS)],
            params=[Param(key, value) for key, value in PARAMS.items()],
        )
        client.set_terminated(run.info.run_id, "FINISHED")
    yield LoggedRun(experiment_id, run.info.run_id, run.info.run_name)


def _post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def test_runs_search_returns_params_and_latest_metric(mlflow_server: str, logged_run: LoggedRun) -> None:
    found = _post_json(
        f"{mlflow_server}/api/2.0/mlflow/runs/search", {"experiment_ids": [logged_run.experiment_id]}
    )["runs"]

    assert [run["info"]["run_id"] for run in found] == [logged_run.run_id]
    (run,) = found
    assert run["info"]["run_name"] == logged_run.run_name
    assert run["info"]["status"] == "FINISHED"
    assert {param["key"]: param["value"] for param in run["data"]["params"]} == PARAMS
    assert {metric["key"]: metric["value"] for metric in run["data"]["metrics"]} == {"val_loss": VAL_LOSS[-1]}


def test_metric_history_has_every_step(mlflow_server: str, logged_run: LoggedRun) -> None:
    history = _get_json(
        f"{mlflow_server}/api/2.0/mlflow/metrics/get-history?run_id={logged_run.run_id}&metric_key=val_loss"
    )["metrics"]

    assert sorted((point["step"], point["value"]) for point in history) == list(enumerate(VAL_LOSS))


def test_run_is_stored_in_postgres(postgres_db: PostgresDatabase, logged_run: LoggedRun) -> None:
    connection = postgres_db.connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT name, status FROM runs WHERE run_uuid = %s", (logged_run.run_id,))
            stored_run = cursor.fetchall()
            cursor.execute(
                "SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'val_loss' ORDER BY step",
                (logged_run.run_id,),
            )
            stored_metrics = cursor.fetchall()
    finally:
        connection.close()

    assert stored_run == [(logged_run.run_name, "FINISHED")]
    assert stored_metrics == list(enumerate(VAL_LOSS))


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is not installed: apt-get install -y chromium")
    return path


def _run_chromium(args: list[str], profile_dir: Path) -> subprocess.CompletedProcess[bytes]:
    """Run headless Chromium in its own process group and kill whatever of it is left afterwards."""
    command = [_chromium(), *HEADLESS_FLAGS, f"--user-data-dir={profile_dir}", *args]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=CHROMIUM_TIMEOUT_S)
    finally:
        stop_process_group(process, grace_s=5.0)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_ui_runs_page_shows_the_run(mlflow_server: str, logged_run: LoggedRun, tmp_path: Path) -> None:
    """The UI is a JS app: a long virtual-time budget lets it fetch and render the runs table."""
    page = f"{mlflow_server}/#/experiments/{logged_run.experiment_id}/runs"
    render = ["--virtual-time-budget=15000", "--window-size=1400,900"]

    dom = _run_chromium([*render, "--dump-dom", page], tmp_path / "profile-dom")
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    screenshot = ARTIFACTS_DIR / "mlflow_runs_page.png"
    shot = _run_chromium([*render, f"--screenshot={screenshot}", page], tmp_path / "profile-shot")

    html = dom.stdout.decode(errors="replace")
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-2000:]
    assert logged_run.run_name in html, f"run name not rendered; DOM tail:\n{html[-2000:]}"
    assert "Experiment load error" not in html
    assert shot.returncode == 0, shot.stderr.decode(errors="replace")[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _status(url: str, credentials: tuple[str, str] | None = None) -> int:
    headers = {}
    if credentials is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_compose_auth_config_boots_and_guards_the_api(postgres_db: PostgresDatabase, tmp_path: Path) -> None:
    """Compose's command as is (basic auth on): the admin password from the environment bootstraps the
    user store, health stays public for the container healthcheck, and the API demands credentials."""
    with compose_mlflow_server(postgres_db, tmp_path / "auth_server", auth=True) as server:
        search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"

        assert _status(f"{server.url}/health") == 200
        assert _status(search) == 401
        assert _status(search, ("admin", "wrong-password")) == 401
        assert _status(search, ("admin", server.admin_password)) == 200
