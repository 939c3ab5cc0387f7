"""The production path, end to end: sweeps logging to the compose-defined MLflow server on PostgreSQL,
a tracking outage and `lottery sync`, a trial process killed mid-trial, the MLflow UI in Chromium,
credentials kept out of everything a sweep writes, and `lottery submit` to a real Ray head with
token auth.

Every sweep runs `lottery` as a subprocess with a private RAY_TMPDIR; whatever Ray process still
carries that directory in its environment afterwards is killed by PID (never `ray stop`, which
would stop every Ray on the machine). Servers and drivers are stopped by process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import specfactory
from barrier import Barrier
from browser import HEADLESS_FLAGS
from fixtures_mlflow import compose_mlflow_server, free_port, fresh_database
from fixtures_s3 import BUCKET
from mlflow.tracking import MlflowClient
from raynodes import is_loopback, listening, new_token, start_node, stop_node
from s3server import S3Server
from server import stop_process_group
from specfactory import BASE, TWO_ARMS

from orchestrator import layout
from orchestrator.run.trainable import read_attempts
from orchestrator.spec import load_plan
from orchestrator.tracking.sweep import SweepRecord

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS_DIR = Path(__file__).parent / "artifacts"
SMOKE_SPEC = "tests/specs/cluster_smoke.yaml"
# The Ray token is a real one: the embedded sweeps and the submit test's head run with it.
CANARIES = {"MLFLOW_TRACKING_PASSWORD": "sekrit-canary", "RAY_AUTH_TOKEN": "canary" + "0" * 58}
CREDENTIALS = CANARIES | {"MLFLOW_TRACKING_USERNAME": "lottery-test"}


# --- helpers: specs, processes, REST ---------------------------------------------------------------


def write_spec(directory: Path, name: str, **changes: Any) -> Path:
    """Both arms, a trial retried once."""
    return specfactory.write_spec(directory, name, **({"schemes": TWO_ARMS, "max_failures": 1} | changes))


def processes_with(marker: str) -> list[int]:
    """PIDs whose environment holds `marker` (a private RAY_TMPDIR): exactly what one test started."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
    return found


@contextlib.contextmanager
def private_ray_tmpdir() -> Iterator[str]:
    """A short RAY_TMPDIR (socket paths must stay under ~107 characters); its processes die with it."""
    path = tempfile.mkdtemp(prefix="lp", dir="/tmp")
    try:
        yield path
    finally:
        for pid in processes_with(f"RAY_TMPDIR={path}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(path, ignore_errors=True)


def clean_env(ray_tmpdir: str, home: Path, tracking_uri: str | None = None) -> dict[str, str]:
    """This environment minus any Ray, MLflow or lottery setting of the developer's, plus the test's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "LOTTERY_"))}
    env |= {"RAY_TMPDIR": ray_tmpdir, "RAY_USAGE_STATS_ENABLED": "0"}
    env |= {"LOTTERY_HOME": str(home), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    return env | ({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {})


def lottery(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "orchestrator", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def driver(spec: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`lottery sweep SPEC` in the background, in its own process group, killed if still running."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "sweep", str(spec)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true within {timeout_s:.0f} s")
        time.sleep(interval_s)


def rest(url: str, endpoint: str, body: dict[str, Any] | None = None, **query: str) -> dict[str, Any]:
    """One MLflow REST call: POST with a JSON body, or GET with query parameters."""
    address = f"{url}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(address, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def experiment_id(url: str, name: str) -> str | None:
    try:
        return rest(url, "experiments/get-by-name", experiment_name=name)["experiment"]["experiment_id"]
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise


def search_runs(url: str, experiment: str, filter_string: str = "") -> list[dict[str, Any]]:
    body = {"experiment_ids": [experiment], "filter": filter_string, "max_results": 1000}
    return rest(url, "runs/search", body).get("runs", [])


def tags(run: dict[str, Any]) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}


def params(run: dict[str, Any]) -> dict[str, str]:
    return {param["key"]: param["value"] for param in run["data"].get("params", [])}


def history(url: str, run_id: str, key: str) -> list[tuple[int, float]]:
    points = rest(url, "metrics/get-history", run_id=run_id, metric_key=key, max_results="1000")["metrics"]
    return sorted((int(p["step"]), float(p["value"])) for p in points)


def complete_children(url: str, sweep: str) -> list[dict[str, Any]]:
    """Child runs of a sweep that were logged in full (their last tag is `logged=complete`)."""
    experiment = experiment_id(url, sweep)
    if experiment is None:
        return []
    runs = search_runs(url, experiment, "tags.logged = 'complete'")
    return [run for run in runs if "mlflow.parentRunId" in tags(run)]


def result_files(sweep_dir: Path, keys: list[str]) -> list[Path]:
    return [sweep_dir / "trials" / key / "result.json" for key in keys]


# --- a sweep against the session's compose-defined server ---------------------------------------------


@dataclass(frozen=True)
class TrackedSweep:
    url: str
    sweep_dir: Path
    record: SweepRecord
    keys: list[str]
    output: str
    ray_tmpdir: Path
    tail_s: float  # from the last result.json to the driver's exit


@pytest.fixture(scope="module")
def tracked_sweep(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackedSweep]:
    """4 trials logged to the server, with credential canaries in the driver's environment."""
    tmp = tmp_path_factory.mktemp("tracked")
    spec = write_spec(tmp, "prod-rest")
    keys = [trial.trial_key() for trial in load_plan(spec).trials]
    with private_ray_tmpdir() as ray_tmpdir:
        env = clean_env(ray_tmpdir, tmp / "home", mlflow_server) | CREDENTIALS
        done = lottery("sweep", str(spec), env=env)
        exited = time.time()
        assert done.returncode == 0, done.stdout + done.stderr
        sweep_dir = tmp / "home" / "prod-rest"
        record = SweepRecord.load(sweep_dir)
        assert record is not None and record.tracking_uri == mlflow_server
        last_result = max(path.stat().st_mtime for path in result_files(sweep_dir, keys))
        yield TrackedSweep(
            mlflow_server,
            sweep_dir,
            record,
            keys,
            done.stdout + done.stderr,
            Path(ray_tmpdir),
            exited - last_result,
        )


def test_sweep_runs_params_and_histories_are_served_over_rest(tracked_sweep: TrackedSweep) -> None:
    sweep, url = tracked_sweep, tracked_sweep.url
    runs = {run["info"]["run_id"]: run for run in search_runs(url, sweep.record.experiment_id)}
    parent = runs.pop(sweep.record.parent_run_id)
    assert parent["info"]["status"] == "FINISHED" and tags(parent)["role"] == "sweep"
    assert {m["key"]: m["value"] for m in parent["data"]["metrics"]}["n_finished"] == len(sweep.keys)

    children = list(runs.values())
    assert sorted(tags(run)["trial_key"] for run in children) == sorted(sweep.keys)
    for run in children:
        assert run["info"]["status"] == "FINISHED"
        assert tags(run)["mlflow.parentRunId"] == sweep.record.parent_run_id
        trial_dir = sweep.sweep_dir / "trials" / tags(run)["trial_key"]
        meta = json.loads((trial_dir / "config.json").read_text())
        values = params(run)
        assert (values["scheme.name"], values["seed"], values["epochs"]) == (
            meta["scheme"],
            str(meta["seed"]),
            "3",
        )
        assert values.get("scheme.tau") == ("1e-06" if meta["scheme"] == "randomout" else None)
        expected = pd.read_parquet(trial_dir / "metrics.parquet")
        points = history(url, run["info"]["run_id"], "test_acc")
        assert [step for step, _ in points] == expected["epoch"].tolist() == [0, 1, 2]
        assert [value for _, value in points] == pytest.approx(expected["test_acc"].tolist())


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[bytes]:
    """Headless Chromium in its own process group; whatever of it outlives the page is stopped."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "Chromium is not installed: apt-get install -y chromium"
    command = [binary, *HEADLESS_FLAGS, f"--user-data-dir={profile}", *args]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=90)
    finally:
        stop_process_group(process, grace_s=5.0)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_mlflow_ui_lists_the_sweeps_child_runs(tracked_sweep: TrackedSweep, tmp_path: Path) -> None:
    """The sweep's trials as a researcher opens them: the runs page, child runs only, sorted by name.

    Sorted by creation time (the default) the page folds the children under the parent run, one row
    "sweep NAME"; any other order lists them flat. The UI is a JS app: a long virtual-time budget
    lets it fetch and render the table.
    """
    view = {
        "searchFilter": "tags.trial_key LIKE '%'",
        "orderByKey": "attributes.run_name",
        "orderByAsc": "true",
    }
    query = urllib.parse.urlencode(view, quote_via=urllib.parse.quote)
    page = f"{tracked_sweep.url}/#/experiments/{tracked_sweep.record.experiment_id}/runs?{query}"
    render = ["--virtual-time-budget=15000", "--window-size=1600,1000"]
    names = [
        run["info"]["run_name"]
        for run in search_runs(tracked_sweep.url, tracked_sweep.record.experiment_id)
        if "mlflow.parentRunId" in tags(run)
    ]

    dom = chromium([*render, "--dump-dom", page], tmp_path / "dom")
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    screenshot = ARTIFACTS_DIR / "sweep_runs_page.png"
    shot = chromium([*render, f"--screenshot={screenshot}", page], tmp_path / "shot")

    html = dom.stdout.decode(errors="replace")
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-2000:]
    assert len(names) == len(tracked_sweep.keys)
    assert [name for name in names if name not in html] == [], f"DOM tail:\n{html[-2000:]}"
    assert shot.returncode == 0 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_credentials_reach_no_file_run_artifact_or_log(tracked_sweep: TrackedSweep, tmp_path: Path) -> None:
    """The driver had MLFLOW_TRACKING_PASSWORD and RAY_AUTH_TOKEN set; neither may be written anywhere."""
    sweep = tracked_sweep
    client = MlflowClient(sweep.url)
    places: dict[str, bytes] = {"driver output": sweep.output.encode()}
    searched = [sweep.sweep_dir, sweep.ray_tmpdir]  # the trial directories, Tune's state, Ray's logs
    for path in (p for root in searched for p in root.rglob("*") if p.is_file() and not p.is_socket()):
        places[str(path)] = path.read_bytes()
    for run in search_runs(sweep.url, sweep.record.experiment_id):
        run_id = run["info"]["run_id"]
        places[f"run {run_id} params and tags"] = json.dumps(run).encode()
        local = Path(client.download_artifacts(run_id, "", str(tmp_path / run_id)))
        for path in (p for p in local.rglob("*") if p.is_file()):
            places[f"run {run_id} artifact {path.relative_to(local)}"] = path.read_bytes()

    assert len(places) > 20 and any("artifact" in place for place in places)
    leaks = [
        place for place, data in places.items() for secret in CANARIES.values() if secret.encode() in data
    ]
    assert leaks == []


# --- a tracking outage in the middle of a sweep ------------------------------------------------------


def sync_counts(done: subprocess.CompletedProcess[str]) -> tuple[int, int, int]:
    match = re.search(r"(\d+) created, (\d+) already present, (\d+) not finished", done.stderr)
    assert done.returncode == 0 and match, done.stdout + done.stderr
    return int(match[1]), int(match[2]), int(match[3])


def runs_by_key(url: str, sweep: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for run in search_runs(url, experiment_id(url, sweep) or "", ""):
        if "trial_key" in tags(run):
            found.setdefault(tags(run)["trial_key"], []).append(run)
    return found


def test_server_killed_mid_sweep_loses_nothing_and_sync_restores_every_run(
    tmp_path: Path, tracked_sweep: TrackedSweep
) -> None:
    epochs = 10
    spec = write_spec(
        tmp_path,
        "outage",
        base=BASE | {"epochs": epochs},
        seeds=list(range(8)),
        schemes=[{"name": "baseline"}],
        pack_size=1,  # one seed per process, one process at a time: trials end one by one,
        max_concurrent_trials=1,  # so several of them end while the server is down
    )
    keys = [trial.trial_key() for trial in load_plan(spec).trials]
    sweep_dir, port, server_dir = tmp_path / "home" / "outage", free_port(), tmp_path / "server"
    with fresh_database() as database, private_ray_tmpdir() as ray_tmpdir, contextlib.ExitStack() as stack:
        env = clean_env(ray_tmpdir, tmp_path / "home", f"http://127.0.0.1:{port}")
        first_server = contextlib.ExitStack()
        stack.callback(first_server.close)
        url = first_server.enter_context(
            compose_mlflow_server(database, server_dir, auth=False, port=port)
        ).url
        process = stack.enter_context(driver(spec, env, tmp_path / "driver.log"))
        started = time.time()
        wait_until(lambda: bool(complete_children(url, "outage")) or process.poll() is not None, 180)
        assert process.poll() is None, (tmp_path / "driver.log").read_text()
        first_server.close()  # the server's process group goes down mid-sweep (SIGTERM, SIGKILL after 10 s)
        down = time.time()
        returncode = process.wait(timeout=300)
        exited = time.time()

        output = (tmp_path / "driver.log").read_text()
        assert returncode == 3, output  # every trial ended, some runs missing: TRACKING_EXIT
        assert all(path.exists() for path in result_files(sweep_dir, keys)), output
        ended_during_outage = [p for p in result_files(sweep_dir, keys) if p.stat().st_mtime > down]
        assert ended_during_outage, "the outage hit no trial: make the trials longer"
        assert f"lottery sync {sweep_dir}" in " ".join(output.split()), output
        tail_s = exited - max(path.stat().st_mtime for path in result_files(sweep_dir, keys))

        with compose_mlflow_server(database, server_dir, auth=False, port=port) as server:
            created, present, unfinished = sync_counts(lottery("sync", str(sweep_dir), env=env))
            runs = runs_by_key(server.url, "outage")
            again = sync_counts(lottery("sync", str(sweep_dir), env=env))
            runs_again = runs_by_key(server.url, "outage")
            parent = rest(server.url, "runs/get", run_id=SweepRecord.load(sweep_dir).parent_run_id)["run"]
            histories = {
                key: history(server.url, found[0]["info"]["run_id"], "test_acc")
                for key, found in runs.items()
            }

    assert created >= len(ended_during_outage) and created + present == len(keys) and unfinished == 0
    assert sorted(runs) == sorted(keys) and all(len(found) == 1 for found in runs.values())
    assert {found[0]["info"]["status"] for found in runs.values()} == {"FINISHED"}
    assert all([step for step, _ in points] == list(range(epochs)) for points in histories.values())
    assert again == (0, len(keys), 0)
    assert {k: v[0]["info"]["run_id"] for k, v in runs_again.items()} == {
        k: v[0]["info"]["run_id"] for k, v in runs.items()
    }
    assert parent["info"]["status"] == "FINISHED"

    timing = {
        "trials": len(keys),
        "trials_ended_while_server_down": len(ended_during_outage),
        "server_up_s": round(down - started, 1),
        "driver_wall_s": round(exited - started, 1),
        "tail_after_last_result_s_outage": round(tail_s, 1),
        "tail_after_last_result_s_normal": round(tracked_sweep.tail_s, 1),
        "sync_created": created,
        "sync_present": present,
    }
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    (ARTIFACTS_DIR / "outage_timing.json").write_text(json.dumps(timing, indent=2))
    print(f"\noutage timing: {timing}")


def test_sweep_started_while_the_server_was_down_is_synced_to_another_uri(
    mlflow_server: str, tmp_path: Path
) -> None:
    """No sweep.json at all: sync opens the experiment and parent run from spec.json, then logs."""
    spec = write_spec(tmp_path, "never-tracked", base=BASE | {"epochs": 1}, schemes=[{"name": "baseline"}])
    keys = [trial.trial_key() for trial in load_plan(spec).trials]
    sweep_dir = tmp_path / "home" / "never-tracked"
    with private_ray_tmpdir() as ray_tmpdir:
        env = clean_env(ray_tmpdir, tmp_path / "home", f"http://127.0.0.1:{free_port()}")  # nothing listens
        swept = lottery("sweep", str(spec), env=env)
        first = lottery("sync", str(sweep_dir), "--tracking-uri", mlflow_server, env=env)
        record = SweepRecord.load(sweep_dir)
        again = lottery("sync", str(sweep_dir), env=env)  # sweep.json now names the server

    assert swept.returncode == 3 and "tracking unavailable" in swept.stderr, swept.stderr
    assert f"run: lottery sync {sweep_dir}" in swept.stderr
    assert sync_counts(first) == (len(keys), 0, 0) and sync_counts(again) == (0, len(keys), 0)
    # One progress bar and one summary line, not MLflow's two "View run" lines per run.
    assert len((first.stdout + first.stderr).strip().splitlines()) == 2, first.stdout + first.stderr
    assert record is not None and record.tracking_uri == mlflow_server
    parent = rest(mlflow_server, "runs/get", run_id=record.parent_run_id)["run"]
    assert parent["info"]["status"] == "FINISHED" and tags(parent)["role"] == "sweep"
    children = complete_children(mlflow_server, "never-tracked")
    assert sorted(tags(run)["trial_key"] for run in children) == sorted(keys)
    assert {tags(run)["mlflow.parentRunId"] for run in children} == {record.parent_run_id}


# --- a trial process killed with SIGKILL mid-trial -----------------------------------------------


def epochs_written(trial_dir: Path) -> int:
    try:
        return len(pd.read_parquet(trial_dir / "metrics.parquet"))
    except (FileNotFoundError, OSError):
        return 0


@pytest.mark.kill
def test_sigkilled_trial_process_is_retried_from_its_last_epoch_checkpoint(tmp_path: Path) -> None:
    """The trial is held right after epoch 1's checkpoint (tests/barrier.py) and its process killed there."""
    epochs = 4
    spec = write_spec(
        tmp_path,
        "sigkill",
        base=BASE | {"epochs": epochs},
        seeds=[0],
        schemes=[{"name": "baseline"}],
        pack_size=1,
    )
    trial_dir = tmp_path / "home" / "sigkill" / "trials" / load_plan(spec).trials[0].trial_key()
    barrier = Barrier(tmp_path / "barrier", epoch=1)
    with private_ray_tmpdir() as ray_tmpdir:
        env = clean_env(ray_tmpdir, tmp_path / "home") | barrier.env()  # the sweep's own sqlite store
        with driver(spec, env, tmp_path / "driver.log") as process:
            barrier.wait_reached(1, process, tmp_path / "driver.log")
            assert not (trial_dir / "result.json").exists(), "the trial ended before it could be killed"
            victim = read_attempts(trial_dir)[0]["pid"]
            os.kill(victim, signal.SIGKILL)
            barrier.release()
            returncode = process.wait(timeout=300)
    output = (tmp_path / "driver.log").read_text()

    assert returncode == 0, output
    first, second = read_attempts(trial_dir)
    assert first["pid"] == victim and second["pid"] != victim
    assert second["resumed_from_epoch"] >= 2 and second["checkpoint"] == "trial_dir", second
    # Tune restored its newest marker: the same epoch, or one behind if the kill fell between the two.
    assert second["tune_checkpoint_epoch"] in (second["resumed_from_epoch"], second["resumed_from_epoch"] - 1)
    assert pd.read_parquet(trial_dir / "metrics.parquet")["epoch"].tolist() == list(range(epochs))
    assert json.loads((trial_dir / "result.json").read_text())["epochs_done"] == epochs


# --- `lottery submit` to a Ray head ----------------------------------------------------------------


def jobs_api_status(url: str, token: str | None) -> int:
    """HTTP status of the Jobs API's job list, asked with `token` (or none)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/api/jobs/", headers=headers), timeout=10):
            return 200
    except urllib.error.HTTPError as error:
        return error.code


def test_submitted_sweep_runs_on_a_ray_head_and_logs_to_mlflow(
    mlflow_server: str, s3_env: S3Server, tmp_path: Path
) -> None:
    """A token-auth head on 127.0.0.1 (its token is the canary): submit, follow, status; and refusals.

    Results go to the S3 server and runs to the PostgreSQL-backed MLflow server. The head holds the
    object store's keys in its own environment (as a cluster's nodes do); the job is sent only where.
    """
    from ray.job_submission import JobSubmissionClient

    home, token = f"s3://{BUCKET}/submit-{tmp_path.name}", CANARIES["RAY_AUTH_TOKEN"]
    head = start_node(token, ip="127.0.0.1", num_cpus=1, dashboard=True, base_env=clean_env("", home))
    try:
        address = head.dashboard_url
        caller = clean_env(head.temp_dir, home, mlflow_server) | CREDENTIALS
        refused = {
            "none": jobs_api_status(address, None),
            "wrong": jobs_api_status(address, new_token()),
            "right": jobs_api_status(address, token),
        }
        no_token = caller | {"RAY_AUTH_TOKEN": "", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "no-token")}
        missing = lottery("submit", SMOKE_SPEC, "--address", address, env=no_token, timeout=120)
        wrong_token = caller | {"RAY_AUTH_TOKEN": "x" * 64}
        wrong = lottery("status", "raysubmit_x", "--address", address, env=wrong_token)
        submitted = lottery("submit", SMOKE_SPEC, "--address", address, env=caller, timeout=120)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        job_id = submitted.stdout.split()[-1]
        followed = lottery("logs", job_id, "--address", address, "--follow", env=caller, timeout=300)
        status = lottery("status", job_id, "--address", address, env=caller, timeout=60)
        client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
        runtime_env = client.get_job_info(job_id).runtime_env
        ports = listening(head.pids())
    finally:
        stop_node(head)

    assert refused == {"none": 401, "wrong": 403, "right": 200}
    for result, words in ((missing, "requires a token and none was found"), (wrong, "refused the token")):
        assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
        assert result.stderr.startswith("error: RAY_AUTH_TOKEN: ") and words in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert ports and [row for row in ports if not is_loopback(row[2])] == []
    assert followed.returncode == 0, followed.stdout + followed.stderr
    assert (
        "2/2 finished" in followed.stdout
        and status.stdout.strip() == f"{job_id}: SUCCEEDED (Job finished successfully.)"
    )
    assert runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": mlflow_server, "LOTTERY_HOME": home}
    said = submitted.stdout + submitted.stderr + followed.stdout + followed.stderr + json.dumps(runtime_env)
    secrets = [*CANARIES.values(), s3_env.env["AWS_SECRET_ACCESS_KEY"]]
    assert not [secret for secret in secrets if secret in said]
    children = complete_children(mlflow_server, "cluster-smoke")
    assert sorted(tags(run)["seed"] for run in children) == ["0", "1"]
    assert {run["info"]["status"] for run in children} == {"FINISHED"}
    sweep_dir = layout.location(f"{home}/cluster-smoke")
    for run in children:  # each run's trial directory is in the bucket, finished, with its numbers
        result = layout.read_result(layout.trial_dir(sweep_dir, tags(run)["trial_key"]))
        logged = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert result is not None and result["final_test_acc"] == logged["final_test_acc"]
