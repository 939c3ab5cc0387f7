"""`lottery sweep` end to end on a real local Ray and a real MLflow sqlite store (no mocks).

In-process tests share one embedded Ray started per module (the driver's own: token auth on,
loopback only); the driver detects it and reuses it. The SIGKILL test runs the CLI as a subprocess
with its own Ray, whose processes it finds by a private RAY_TMPDIR in their environment and kills
by PID afterwards.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import specfactory
from barrier import Barrier, kill_driver, lingering_ray_pids
from mlflow.tracking import MlflowClient
from rich.console import Console
from specfactory import BASE, TWO_ARMS

from orchestrator.aggregate import aggregate
from orchestrator.run.ray_session import ray_session
from orchestrator.run.sweep import run_sweep
from orchestrator.run.trainable import FAULT_ENV, read_attempts
from orchestrator.spec import load_plan
from orchestrator.tracking.sweep import SweepRecord

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """The driver's own embedded Ray (token auth on, loopback only), shared by the module's sweeps."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with ray_session(None):
        yield


def write_spec(tmp_path: Path, name: str, **changes) -> Path:
    """Both arms, stored under `tmp_path/runs`, a trial retried once."""
    fields = {"schemes": TWO_ARMS, "storage_path": str(tmp_path / "runs"), "max_failures": 1} | changes
    return specfactory.write_spec(tmp_path, name, **fields)


def child_runs(sweep_dir: Path) -> tuple[MlflowClient, object, list]:
    """(client, parent run, its child runs) of a sweep, read back from its tracking store."""
    record = SweepRecord.load(sweep_dir)
    client = MlflowClient(record.tracking_uri)
    parent = client.get_run(record.parent_run_id)
    children = client.search_runs(
        [record.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        max_results=1000,
    )
    return client, parent, children


def test_small_sweep_logs_one_finished_child_per_trial_and_reruns_nothing(tmp_path, local_ray):
    spec = write_spec(tmp_path, "small")
    plan = load_plan(spec)
    uri_before = os.environ.get("MLFLOW_TRACKING_URI")
    outcome = run_sweep(plan, root=tmp_path)
    # The process-wide URI stays as it was, or the next sweep here (or a child process) logs into this store.
    assert os.environ.get("MLFLOW_TRACKING_URI") == uri_before
    sweep_dir = outcome.sweep_dir
    assert (outcome.counts["finished"], outcome.counts["errored"], outcome.counts["unfinished"]) == (4, 0, 0)
    assert json.loads((sweep_dir / "spec.json").read_text())["name"] == "small"
    assert [r["trial_key"] for r in json.loads((sweep_dir / "trials.json").read_text())] == [
        t.trial_key() for t in plan.trials
    ]

    client, parent, children = child_runs(sweep_dir)
    assert parent.info.status == "FINISHED" and parent.data.tags["n_trials"] == "4"
    assert json.loads(parent.data.tags["seeds"]) == [0, 1] and "version.ray" in parent.data.tags
    assert "git_revision" in parent.data.tags
    assert sorted(r.data.tags["trial_key"] for r in children) == sorted(t.trial_key() for t in plan.trials)
    assert {r.info.status for r in children} == {"FINISHED"}
    for run in children:
        trial = next(t for t in plan.trials if t.trial_key() == run.data.tags["trial_key"])
        assert run.data.tags["config_hash"] == trial.config_hash()
        assert (run.data.tags["scheme"], run.data.tags["seed"]) == (trial.scheme.name, str(trial.seed))
        assert run.data.metrics["epochs_done"] == 3
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"spec.json", "trials.json"}
    # Tune keeps one small epoch marker per epoch and deletes none: a deleted checkpoint that a
    # stale experiment state still names could never be restored after a driver kill. The last
    # epoch has none: its result is reported at once.
    units = list((sweep_dir / "tune").glob("0*"))
    assert len(units) == len(plan.units) == 2  # one pack of two seeds per scheme
    for unit_dir in units:
        markers = sorted(unit_dir.glob("checkpoint_*/*"))
        assert [m.name for m in markers] == ["epoch.json"] * 2, unit_dir
        assert [json.loads(m.read_text())["epoch"] for m in markers] == [1, 2]
    # Tune's own loggers are off: the trial directories are the record, written once.
    assert not [p for p in (sweep_dir / "tune").rglob("*") if p.name in ("progress.csv", "result.json")]
    assert not list((sweep_dir / "tune").rglob("events.out.tfevents*"))
    # Tune saves its experiment state on its own adaptive period, which it keeps in that state (a
    # restored experiment goes on with it): saving on every step cost the driver half a core.
    (state,) = (sweep_dir / "tune").glob("experiment_state-*.json")
    assert json.loads(state.read_text())["runner_data"]["_checkpoint_period"] == "auto"

    # The same command again restores the finished experiment: nothing trains, nothing is re-logged.
    again = run_sweep(load_plan(spec), root=tmp_path)
    _, parent_again, children_again = child_runs(sweep_dir)
    assert again.counts == outcome.counts and parent_again.info.run_id == parent.info.run_id
    assert sorted(r.info.run_id for r in children_again) == sorted(r.info.run_id for r in children)
    assert all(len(read_attempts(sweep_dir / "trials" / t.trial_key())) == 1 for t in plan.trials)


def test_a_cut_short_tune_state_is_set_aside_and_the_sweep_finishes_without_rerunning(tmp_path, local_ray):
    spec = write_spec(tmp_path, "cut", pack_size=1)
    plan = load_plan(spec)
    keys = [t.trial_key() for t in plan.trials]
    sweep_dir = run_sweep(plan, root=tmp_path).sweep_dir
    # What a driver killed while Tune writes its state leaves behind: the newest state file cut short
    # (seen after a SIGKILL), here with one trial that had not finished yet.
    state = max((sweep_dir / "tune").glob("experiment_state-*.json"))
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    (sweep_dir / "trials" / keys[0] / "result.json").unlink()

    console = Console(file=io.StringIO(), width=300)
    again = run_sweep(load_plan(spec), root=tmp_path, console=console)
    said = console.file.getvalue()
    assert "Tune's saved state is unreadable" in said and state.name in said, said
    assert (again.counts["finished"], again.counts["errored"], again.counts["unfinished"]) == (4, 0, 0)
    assert [p.name for p in sweep_dir.glob("tune.unreadable-*/experiment_state-*.json")] == [state.name]
    assert [len(read_attempts(sweep_dir / "trials" / k)) for k in keys] == [2, 1, 1, 1]  # only the unfinished
    assert sorted(r.data.tags["trial_key"] for r in child_runs(sweep_dir)[2]) == sorted(keys)


def test_raising_trial_resumes_from_its_checkpoint_and_diverging_or_broken_trials_do_not_stop_the_sweep(
    tmp_path, local_ray, monkeypatch
):
    spec = write_spec(
        tmp_path,
        "faults",
        schemes=[
            {"name": "baseline"},
            {"name": "baseline", "params": {"optim.name": "sgd"}, "grid": {"optim.lr": [1.0e6]}},  # diverges
            {
                "name": "batchnorm",
                "params": {"data.name": "craters", "data.data_dir": str(tmp_path / "none")},
            },
        ],
    )
    plan = load_plan(spec)
    flaky = plan.trials[1].trial_key()
    monkeypatch.setenv(FAULT_ENV, f"{flaky}:1")
    # Given as a cluster address, this process's Ray runs the sweep as a cluster would: the driver does
    # not load the data there (a local run refuses the missing crater dir up front), so the batchnorm
    # trials fail on their worker, as a trial with broken data does on a cluster.
    outcome = run_sweep(plan, root=tmp_path, address="ray://cluster-under-test:10001")
    sweep_dir = outcome.sweep_dir
    assert (outcome.counts["finished"], outcome.counts["errored"], outcome.counts["unfinished"]) == (4, 2, 0)

    attempts = read_attempts(sweep_dir / "trials" / flaky)
    resumed = [(a["resumed_from_epoch"], a["checkpoint"], a["tune_checkpoint_epoch"]) for a in attempts]
    assert resumed == [(0, None, None), (2, "trial_dir", 2)]  # Tune restored the epoch-2 checkpoint
    assert json.loads((sweep_dir / "trials" / flaky / "result.json").read_text())["epochs_done"] == 3

    diverged = [
        json.loads((sweep_dir / "trials" / t.trial_key() / "result.json").read_text())
        for t in plan.trials[2:4]
    ]
    assert all(r["failed"] and r["diverged"] for r in diverged)
    broken = [sweep_dir / "trials" / t.trial_key() for t in plan.trials[4:]]
    assert all((d / "error.txt").exists() and not (d / "result.json").exists() for d in broken)
    assert all(len(read_attempts(d)) == 2 for d in broken)  # max_failures 1: two tries, then errored

    _, parent, children = child_runs(sweep_dir)
    status = {r.data.tags["trial_key"]: r.info.status for r in children}
    assert len(children) == 6 and len(status) == 6
    assert [status[t.trial_key()] for t in plan.trials] == ["FINISHED"] * 4 + ["FAILED"] * 2
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_errored"] == 2

    summary = aggregate(sweep_dir).summary.set_index("config_hash")
    assert summary.loc[plan.trials[2].config_hash(), "failure_rate"] == 1.0
    assert summary.loc[plan.trials[0].config_hash(), "n"] == 2
    assert summary.loc[plan.trials[4].config_hash(), "n_errored"] == 2


# --- driver killed with SIGKILL, then the same command again ---------------------------------------


def finished_keys(sweep_dir: Path, keys: list[str]) -> list[str]:
    return [k for k in keys if (sweep_dir / "trials" / k / "result.json").exists()]


def complete_runs(sweep_dir: Path) -> dict[str, tuple[str, int]]:
    """trial_key -> (run id, start time) of the child runs logged in full so far."""
    if not (sweep_dir / "sweep.json").exists():
        return {}
    return {
        r.data.tags["trial_key"]: (r.info.run_id, r.info.start_time)
        for r in child_runs(sweep_dir)[2]
        if r.data.tags.get("logged") == "complete" and r.info.status == "FINISHED"
    }


@pytest.mark.kill
@pytest.mark.parametrize(
    ("pack_size", "fork"),
    [(1, None), (2, None), (1, {"at": [0.5], "children": 2})],
    ids=["alone", "packs", "forked"],
)
def test_sigkilled_driver_resumes_without_rerunning_or_duplicating(tmp_path, ray_tmpdir, pack_size, fork):
    # The first unit finishes and is logged; every other one holds after its first epoch, so the
    # kill lands with one unit finished and the rest unfinished, however loaded the machine. A
    # forked study (the fate clock) has children of every parent among the held units.
    concurrent = 2 if pack_size == 1 else 1
    seeds = list(range(4 * pack_size)) if fork is None else [0, 1]
    forking = {"fork": fork} if fork else {}
    spec = write_spec(
        tmp_path, "killed", seeds=seeds, max_concurrent_trials=concurrent, pack_size=pack_size, **forking
    )
    plan = load_plan(spec)
    keys = [t.trial_key() for t in plan.trials]
    first = {keys[i] for i in plan.units[0]}
    barrier = Barrier(tmp_path / "barrier", only=set(keys) - first)
    sweep_dir = tmp_path / "runs" / "killed"
    env = os.environ | {"RAY_TMPDIR": ray_tmpdir, "RAY_USAGE_STATS_ENABLED": "0"} | barrier.env()
    env.pop(FAULT_ENV, None)
    command = [sys.executable, "-m", "orchestrator", "sweep", str(spec)]
    log_path = tmp_path / "first.log"
    log = log_path.open("w")
    driver = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    barrier.wait_reached(pack_size, driver, log_path, also=lambda: first <= set(complete_runs(sweep_dir)))
    kill_driver(driver, ray_tmpdir)
    barrier.release()  # for the resumed run: the units not yet started train through

    before = finished_keys(sweep_dir, keys)
    assert before and len(before) < len(keys), log_path.read_text()
    mtimes = {k: (sweep_dir / "trials" / k / "result.json").stat().st_mtime_ns for k in before}
    tries = {k: len(read_attempts(sweep_dir / "trials" / k)) for k in before}
    logged = complete_runs(sweep_dir)  # a half-logged run would be replaced, by design
    assert logged

    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(resuming)" in done.stderr  # Tuner.restore, not a fresh experiment
    assert not lingering_ray_pids(ray_tmpdir), "a cleanly finished driver must leave no Ray process"

    assert finished_keys(sweep_dir, keys) == keys
    assert {k: (sweep_dir / "trials" / k / "result.json").stat().st_mtime_ns for k in before} == mtimes
    assert {k: len(read_attempts(sweep_dir / "trials" / k)) for k in before} == tries
    _, parent, children = child_runs(sweep_dir)
    assert sorted(r.data.tags["trial_key"] for r in children) == sorted(keys), done.stderr  # once each
    after = {r.data.tags["trial_key"]: (r.info.run_id, r.info.start_time) for r in children}
    assert {k: after[k] for k in logged} == logged  # runs logged before the kill were kept, not redone
    assert {r.info.status for r in children} == {"FINISHED"} and parent.info.status == "FINISHED"
    if fork is not None:  # every family came through: the fate clock has both arms' rows
        result = aggregate(sweep_dir)
        assert len(result.children) == 8 and set(result.children["status"]) == {"finished"}
        assert len(result.trials) == 4 and list(result.fate["n_children"]) == [4, 4]
        assert all(
            (sweep_dir / "trials" / k / "final_weights.pt").exists() for k in result.children["trial_key"]
        )


# --- SIGTERM to the driver's whole process group, as `timeout` and schedulers send it ---------------


@pytest.mark.kill
def test_sigterm_to_the_process_group_stops_like_ctrl_c_and_resumes(tmp_path, ray_tmpdir):
    """Every process in the group gets the signal: Ray's own must not, or the driver loses its cluster
    while it saves Tune's state (it hung for a minute and left the parent RUNNING, trials unlogged)."""
    spec = write_spec(tmp_path, "termed", max_concurrent_trials=2, pack_size=1)
    plan = load_plan(spec)
    keys = [t.trial_key() for t in plan.trials]
    first = {keys[i] for i in plan.units[0]}
    barrier = Barrier(tmp_path / "barrier", only=set(keys) - first)
    sweep_dir = tmp_path / "runs" / "termed"
    env = os.environ | {"RAY_TMPDIR": ray_tmpdir, "RAY_USAGE_STATS_ENABLED": "0"} | barrier.env()
    env.pop(FAULT_ENV, None)
    command = [sys.executable, "-m", "orchestrator", "sweep", str(spec)]
    log_path = tmp_path / "first.log"
    with log_path.open("w") as log:
        driver = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        # The first unit has finished (its run may still be on its way); one other holds mid-trial.
        barrier.wait_reached(1, driver, log_path, also=lambda: first <= set(finished_keys(sweep_dir, keys)))
        signalled = time.monotonic()
        os.killpg(driver.pid, signal.SIGTERM)
        barrier.release()  # held trials go on as any running trial would: Tune stops them
        returncode = driver.wait(timeout=120)
        stopped_s = time.monotonic() - signalled
    finally:
        if driver.poll() is None:
            kill_driver(driver, ray_tmpdir)
    output = log_path.read_text()
    print(f"SIGTERM to the process group -> driver exit: {stopped_s:.1f} s")

    assert returncode == 1, output
    assert f"interrupted: run `lottery sweep {spec}` again to resume" in output
    assert "Traceback" not in output and "SIGTERM received" not in output
    assert stopped_s < 45, output  # with Ray killed under it, the driver waited 60 s for its GCS
    assert not lingering_ray_pids(ray_tmpdir), "a stopped driver must leave no Ray process"
    before = finished_keys(sweep_dir, keys)
    assert first <= set(before) and len(before) < len(keys)  # the last unit never started
    _, parent, _ = child_runs(sweep_dir)
    assert parent.info.status == "KILLED"
    logged = complete_runs(sweep_dir)
    assert set(before) <= set(logged), output  # every finished trial has its complete run

    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(resuming)" in done.stderr
    assert finished_keys(sweep_dir, keys) == keys
    _, parent, children = child_runs(sweep_dir)
    assert sorted(r.data.tags["trial_key"] for r in children) == sorted(keys)  # once each
    assert {k: v for k, v in complete_runs(sweep_dir).items() if k in logged} == logged
    assert {r.info.status for r in children} == {"FINISHED"} and parent.info.status == "FINISHED"


# --- damaged trial files, and a sweep whose tracking is incomplete ---------------------------------


def test_damaged_trials_are_set_aside_and_trained_again_to_the_same_numbers(tmp_path, local_ray):
    spec = write_spec(tmp_path, "damaged", pack_size=1)
    keys = [t.trial_key() for t in load_plan(spec).trials]
    sweep_dir = run_sweep(load_plan(spec), root=tmp_path).sweep_dir
    before = {k: json.loads((sweep_dir / "trials" / k / "result.json").read_text()) for k in keys}
    (sweep_dir / "trials" / keys[0] / "result.json").write_text("{}")  # once counted as a finished trial
    (sweep_dir / "trials" / keys[1] / "metrics.parquet").write_bytes(b"not parquet")

    console = Console(file=io.StringIO(), width=400)
    again = run_sweep(load_plan(spec), root=tmp_path, console=console)
    said = console.file.getvalue()
    assert said.count("is damaged") == 2 and "result.json" in said and "metrics.parquet" in said, said
    assert (again.counts["finished"], again.counts["damaged"], again.counts["unfinished"]) == (4, 0, 0)
    assert again.tracked
    assert len(list((sweep_dir / "damaged").iterdir())) == 2  # kept, never deleted
    after = {k: json.loads((sweep_dir / "trials" / k / "result.json").read_text()) for k in keys}
    numbers = ("final_test_acc", "final_train_acc", "final_test_loss", "total_resets", "threads")
    assert [[after[k][n] for n in numbers] for k in keys] == [[before[k][n] for n in numbers] for k in keys]
    assert [len(read_attempts(sweep_dir / "trials" / k)) for k in keys[2:]] == [1, 1]  # not retrained
    runs = child_runs(sweep_dir)[2]
    assert sorted(r.data.tags["trial_key"] for r in runs) == sorted(keys)
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_a_seed_trained_again_leaves_its_pack_mate_alone_and_supersedes_its_own_run(tmp_path, local_ray):
    """Only the damaged seed of a pack trains again (its mate got an attempt record too), and its old
    run leaves the runs view (it stayed, FINISHED, with the old result)."""
    spec = write_spec(tmp_path, "mates", schemes=[{"name": "baseline"}], pack_size=2)
    plan = load_plan(spec)
    assert [len(unit) for unit in plan.units] == [2]
    damaged, mate = [t.trial_key() for t in plan.trials]
    sweep_dir = run_sweep(plan, root=tmp_path).sweep_dir
    before = {r.data.tags["trial_key"]: r.info.run_id for r in child_runs(sweep_dir)[2]}
    mate_files = {p.name: p.stat().st_mtime_ns for p in (sweep_dir / "trials" / mate).iterdir()}
    (sweep_dir / "trials" / damaged / "result.json").write_text('{"epochs_done": 2')  # cut short

    console = Console(file=io.StringIO(), width=400)
    again = run_sweep(load_plan(spec), root=tmp_path, console=console)
    said = console.file.getvalue()
    assert f"trial {damaged} is damaged" in said and "result.json: not JSON" in said, said
    assert (again.counts["finished"], again.counts["damaged"], again.counts["unfinished"]) == (2, 0, 0)
    assert again.tracked
    assert len(read_attempts(sweep_dir / "trials" / damaged)) == 1  # its new directory's one attempt
    assert len(read_attempts(sweep_dir / "trials" / mate)) == 1  # not trained, not recorded again
    assert {p.name: p.stat().st_mtime_ns for p in (sweep_dir / "trials" / mate).iterdir()} == mate_files

    client, _, runs = child_runs(sweep_dir)  # active runs: one per trial
    after = {r.data.tags["trial_key"]: r.info.run_id for r in runs}
    assert sorted(after) == sorted(before) and after[mate] == before[mate]
    assert after[damaged] != before[damaged]
    old = client.get_run(before[damaged])
    assert old.info.lifecycle_stage == "deleted" and old.info.status == "KILLED"
    assert old.data.tags["superseded_by"] == after[damaged]


def test_a_sweep_that_ends_with_tracking_incomplete_exits_3_and_names_lottery_sync(tmp_path, ray_tmpdir):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = write_spec(
        tmp_path,
        "untracked",
        base=BASE | {"epochs": 1},
        seeds=[0],
        schemes=[{"name": "baseline"}],
        tracking_uri=f"http://127.0.0.1:{port}",
    )
    env = os.environ | {"RAY_TMPDIR": ray_tmpdir, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop(FAULT_ENV, None)
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "sweep", str(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 3, done.stderr
    sweep_dir = tmp_path / "runs" / "untracked"
    assert "1/1 finished" in done.stderr
    assert (
        done.stderr.strip().splitlines()[-1]
        == f"tracking incomplete (exit 3): run `lottery sync {sweep_dir}`"
    )
