"""Multi-node Ray on one machine: real `ray start` nodes on loopback addresses, with token auth.

A head (no CPUs: it only schedules) on 127.0.0.2 and workers on 127.0.0.3, 127.0.0.4, each with
its own --temp-dir and a distinct logical resource; the sweep's driver attaches with --address.
Trials record the Ray node of every attempt in attempts.jsonl, so placement is read from disk.

  - a sweep with its storage on the S3 server (tests/s3server.py; every node gets the AWS_*
    settings, so trials write their directories straight to the bucket and no node reads another's
    disk) lands on both workers; one worker node is SIGKILLed while its trial is held mid-trial
    (tests/barrier.py) and its trials are retried on the other and finish, with one MLflow run per
    trial key on the PostgreSQL-backed server;
  - a worker with --num-gpus 2 (logical, no CUDA here) runs `resources.gpu: 0.25` trials 8 at a
    time, and a `device: cuda` trial fails there with one line naming the device and the node.

The GPU tests keep their results in a local directory (the `storage` fixture): they measure
scheduling, not storage. Numbers (placement, the kill's cost) are written to
tests/artifacts/cluster_*.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import specfactory
from barrier import Barrier
from fixtures_s3 import BUCKET
from mlflow.tracking import MlflowClient
from raynodes import Node, cluster, kill_pids, new_token, processes_with, ray_env
from s3server import S3Server
from specfactory import BASE

from orchestrator import layout
from orchestrator.errors import ERRORED_EXIT
from orchestrator.run.trainable import read_attempts
from orchestrator.spec import load_plan
from orchestrator.storage import StorePath, location
from orchestrator.tracking.sweep import SweepRecord

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS_DIR = Path(__file__).parent / "artifacts"


@pytest.fixture
def storage(tmp_path: Path) -> str:
    """The sweeps' storage_path (a local directory; the parameter an object store URI replaces)."""
    return str(tmp_path / "storage")


def write_spec(directory: Path, name: str, storage: str, **changes: Any) -> Path:
    """Four lone seeds of 4 epochs, stored under `storage`, a trial retried twice."""
    fields = {"base": BASE | {"epochs": 4}, "seeds": [0, 1, 2, 3], "pack_size": 1} | changes
    return specfactory.write_spec(directory, name, **({"storage_path": storage, "max_failures": 2} | fields))


@contextlib.contextmanager
def driver(
    spec: Path, head: Node, token: str, log: Path, extra_env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`lottery sweep SPEC --address HEAD` in its own process group, with its own RAY_TMPDIR
    (set as `process.temp_dir` while it runs)."""
    temp_dir = tempfile.mkdtemp(prefix="ld", dir="/tmp")
    env = ray_env(temp_dir, token)
    env = {k: v for k, v in env.items() if not k.startswith(("MLFLOW_", "LOTTERY_"))} | (extra_env or {})
    command = [sys.executable, "-m", "orchestrator", "sweep", str(spec), "--address", head.gcs_address]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    process.temp_dir = temp_dir  # type: ignore[attr-defined]
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        kill_pids(processes_with(f"RAY_TMPDIR={temp_dir}"))
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def trial_dirs(spec: Path, storage: str) -> dict[str, Any]:
    """trial key -> its trial directory (a Path, or a StorePath for a URI storage)."""
    plan = load_plan(spec)
    sweep = location(storage) / plan.spec.name
    return {t.trial_key(): layout.trial_dir(sweep, t.trial_key()) for t in plan.trials}


def trial_files_on_disk(roots: Iterable[str | Path], keys: Iterable[str]) -> list[str]:
    """Everything under `roots` that belongs to a trial or pack directory: a folder named by a trial key
    (trials/<key>/), or a file only those directories hold. Tune's own per-trial logs are staged in the
    session the driver joins (the head's temp dir), in folders Tune names, with files of Tune's
    (result.json and error.txt among them): not ours, so those two names count only inside a folder
    named by a key."""
    names = set(keys) | {layout.TRACE_PARTS, layout.ATTEMPTS, layout.FAULT_MARKER}
    names |= {layout.CONFIG, layout.METRICS, layout.LAYERS, layout.TRACE, layout.CHECKPOINT}
    return [str(path) for root in roots for path in Path(root).rglob("*") if path.name in names]


def attempts(dirs: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    return {key: read_attempts(path) for key, path in dirs.items()}


def wait_until(condition: Any, timeout_s: float, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            pytest.fail("the driver ended early:\n" + log.read_text())
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {timeout_s:.0f} s:\n" + log.read_text())
        time.sleep(0.1)


@pytest.mark.kill
def test_trials_land_on_both_workers_and_a_killed_worker_s_trials_finish_on_the_other(
    tmp_path: Path, s3_env: S3Server, mlflow_server: str
) -> None:
    token = new_token()
    storage = f"s3://{BUCKET}/multinode-{time.time_ns()}"
    spec = write_spec(tmp_path, "multinode", storage, seeds=list(range(6)))
    dirs = trial_dirs(spec, storage)
    sweep = location(storage) / "multinode"
    assert isinstance(sweep, StorePath)
    home = tmp_path / "home"  # the driver's local root: its lock, nothing else (MLflow is the server)
    log = tmp_path / "driver.log"
    node_env = os.environ | s3_env.env  # every node reaches the bucket from its own environment
    workers = [
        {"num_cpus": 1, "resources": '{"worker_a": 1}', "base_env": node_env},
        {"num_cpus": 1, "resources": '{"worker_b": 1}', "base_env": node_env},
    ]
    with cluster(token, workers) as (head, a, b):
        ids = {a.node_id(): "a", b.node_id(): "b"}
        started = time.time()
        tracking = {"LOTTERY_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_server}  # PostgreSQL-backed
        barrier = Barrier(tmp_path / "barrier")  # every trial holds after its first epoch until released
        with driver(spec, head, token, log, tracking | barrier.env()) as process:

            def held_on_both() -> bool:
                seen = attempts(dirs)
                return {ids.get(seen[k][-1]["node_id"]) for k in barrier.reached() if seen[k]} == {"a", "b"}

            wait_until(held_on_both, 240, process, log)
            before = attempts(dirs)
            victims = [
                k
                for k, lines in before.items()
                if lines and ids[lines[-1]["node_id"]] == "b" and not (dirs[k] / layout.RESULT).exists()
            ]
            b.kill()
            killed = time.time()
            barrier.release()  # b's trials retry on a from their checkpoint; the rest train through
            returncode = process.wait(timeout=400)
            ended = time.time()
            # No trial directory on any node's disk (nor the driver's): the bucket holds them all.
            on_disk = trial_files_on_disk([head.temp_dir, a.temp_dir, b.temp_dir, process.temp_dir], dirs)
        output = log.read_text()
        node_ips = {a.node_id(): a.ip}

    after = attempts(dirs)
    assert returncode == 0, output
    assert not on_disk, on_disk
    local = sorted(p.relative_to(home) for p in home.rglob("*") if p.is_file())
    assert local and {p.parts[0] for p in local} == {layout.STORES}, local
    kept = {p.relative_to(Path(layout.STORES, *sweep.as_local_parts())).parts[0] for p in local}
    assert kept == {layout.DRIVER_LOCK}, local  # no MLflow store or artifact on the driver's disk either

    results = sweep.fs.get_file_info([(d / layout.RESULT).path for d in dirs.values()])
    assert {i.type for i in results} == {pafs.FileType.File}, output  # every result.json is in the bucket
    assert {json.loads((d / layout.RESULT).read_text())["trial_key"] for d in dirs.values()} == set(dirs)
    first_nodes = {ids[lines[0]["node_id"]] for lines in after.values()}
    assert first_nodes == {"a", "b"}  # placement: both workers ran trials
    assert victims
    for key in victims:
        last = after[key][-1]
        assert len(after[key]) >= 2 and ids[last["node_id"]] == "a", after[key]  # retried on the survivor
        assert node_ips[last["node_id"]] == last["node_ip"] == "127.0.0.3"
    record = SweepRecord.load(sweep)
    assert record is not None and record.tracking_uri == mlflow_server
    runs = MlflowClient(mlflow_server).search_runs(
        [record.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{record.parent_run_id}'",
        max_results=1000,
    )
    assert sorted(r.data.tags["trial_key"] for r in runs) == sorted(dirs)  # one run per trial key
    assert {r.info.status for r in runs} == {"FINISHED"}

    retry_starts = [after[key][len(before[key])]["started"] for key in victims]
    timing = {
        "storage": "s3",
        "trials": len(dirs),
        "first_attempt_on": {
            node: sum(ids[lines[0]["node_id"]] == node for lines in after.values()) for node in "ab"
        },
        "trials_on_killed_worker": len(victims),
        "kill_to_first_retry_start_s": round(min(retry_starts) - killed, 1),
        "kill_to_sweep_end_s": round(ended - killed, 1),
        "sweep_wall_s": round(ended - started, 1),
    }
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    (ARTIFACTS_DIR / "cluster_kill.json").write_text(json.dumps(timing, indent=2))
    print(f"\ncluster kill: {timing}")


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


@pytest.fixture(scope="module")
def gpu_cluster() -> Iterator[tuple[str, list[Node]]]:
    """A head and one worker with 2 logical GPUs and 8 logical CPUs (this machine has no CUDA)."""
    token = new_token()
    with cluster(token, [{"num_cpus": 8, "num_gpus": 2, "resources": '{"gpu_node": 1}'}]) as nodes:
        yield token, nodes


def test_quarter_gpu_trials_run_eight_at_a_time_on_two_logical_gpus(
    tmp_path: Path, storage: str, gpu_cluster: tuple[str, list[Node]]
) -> None:
    token, (head, worker) = gpu_cluster
    spec = write_spec(
        tmp_path,
        "quarter-gpu",
        storage,
        base=BASE | {"epochs": 3},
        seeds=list(range(12)),
        resources={"cpu": 0.25, "gpu": 0.25},
    )
    dirs = trial_dirs(spec, storage)
    log = tmp_path / "driver.log"
    with driver(spec, head, token, log) as process:
        returncode = process.wait(timeout=400)
    output = log.read_text()

    assert returncode == 0, output
    intervals = [(read_attempts(d)[0]["started"], (d / layout.RESULT).stat().st_mtime) for d in dirs.values()]
    assert max_overlap(intervals) == 8, sorted(intervals)  # 2 GPUs / 0.25: never more, and reached
    assert {json.loads((d / layout.RESULT).read_text())["device"] for d in dirs.values()} == {"cpu"}
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    (ARTIFACTS_DIR / "cluster_gpu_packing.json").write_text(
        json.dumps({"trials": len(dirs), "max_concurrent": max_overlap(intervals)}, indent=2)
    )


def test_a_cuda_trial_on_a_node_without_cuda_fails_with_one_line_naming_device_and_node(
    tmp_path: Path, storage: str, gpu_cluster: tuple[str, list[Node]]
) -> None:
    token, (head, worker) = gpu_cluster
    spec = write_spec(
        tmp_path,
        "no-cuda",
        storage,
        base=BASE | {"epochs": 1, "device": "cuda"},
        seeds=[0],
        resources={"cpu": 0.25, "gpu": 0.25},
        max_failures=0,
    )
    log = tmp_path / "driver.log"
    with driver(spec, head, token, log) as process:
        returncode = process.wait(timeout=300)
    output = log.read_text()

    node_id = worker.node_id()[:12]
    lines = [line for line in output.splitlines() if "has no CUDA device" in line]
    # recorded, not lost; an errored trial makes the sweep exit 4 and its last line names the error
    assert returncode == ERRORED_EXIT and "0/1 finished (0 failed), 1 errored" in output, output
    assert len(lines) == 2 and lines[1] == output.strip().splitlines()[-1], output
    assert lines[1].startswith("ended with 1 errored trial(s) (exit 4); first error: "), output
    for line in lines:
        assert f"device: 'cuda' requested but Ray node {worker.ip} (node id {node_id})" in line
    assert "Traceback" not in output, output
