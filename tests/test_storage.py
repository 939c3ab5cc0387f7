"""Sweep directories on an object store: the StorePath naming (pure), layout's reads and writes against
the real S3 server (SeaweedFS, tests/s3server.py), and a sweep whose driver is SIGKILLed and resumed
with every file in the bucket, then aggregated and reported from there."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import specfactory
from barrier import Barrier, kill_driver, lingering_ray_pids
from fixtures_s3 import BUCKET
from specfactory import BASE, TWO_ARMS
from test_sweep import child_runs, complete_runs

from orchestrator import layout
from orchestrator.errors import UserError
from orchestrator.run.trainable import FAULT_ENV, read_attempts
from orchestrator.spec import load_plan
from orchestrator.storage import StorePath, location

ROOT = Path(__file__).resolve().parents[1]


# --- naming: no server --------------------------------------------------------------------------


def test_local_paths_stay_pathlib_and_uris_become_store_paths(tmp_path: Path) -> None:
    assert location("runs") == Path("runs") and type(location("runs")) is type(Path("runs"))
    assert location(f"file://{tmp_path}") == tmp_path
    assert layout.results_root({}) == Path("runs")
    assert layout.results_root({"LOTTERY_HOME": str(tmp_path)}) == tmp_path
    assert layout.tune_storage(tmp_path) == (str(tmp_path), None)
    assert layout.local_dir(tmp_path) == tmp_path  # a local sweep keeps sqlite and its report inside it

    trial = layout.trial_dir(location("s3://bucket/some/prefix/demo"), "abc")
    assert isinstance(trial, StorePath)
    assert str(trial) == "s3://bucket/some/prefix/demo/trials/abc"
    assert trial.path == "bucket/some/prefix/demo/trials/abc" and trial.bucket == "bucket"
    result = trial / layout.RESULT
    assert (result.name, result.stem, result.parent, result.with_name("x.json").name) == (
        layout.RESULT,
        "result",
        trial,
        "x.json",
    )
    assert layout.sweep_location("s3://bucket/p/", "demo", Path("unused")) == location("s3://bucket/p/demo")


def test_a_store_path_pickles_as_its_uri_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    path = location("s3://bucket/prefix/demo")
    blob = pickle.dumps(path)
    assert b"s3cr3t-value" not in blob and pickle.loads(blob) == path


@pytest.mark.parametrize(
    "uri", ["s3://key:secret@bucket/p", "s3://bucket/p?endpoint_override=http://x", "s3:///nobucket"]
)
def test_uris_with_credentials_or_without_a_bucket_are_refused(uri: str) -> None:
    with pytest.raises(ValueError):
        location(uri)


def test_a_uri_sweep_keeps_its_local_files_in_a_mirror(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LOTTERY_HOME", "s3://bucket/runs")
    monkeypatch.chdir(tmp_path)
    sweep = layout.sweep_location(None, "demo", layout.results_root())
    assert sweep == location("s3://bucket/runs/demo")
    mirror = tmp_path / layout.RESULTS_ROOT / layout.STORES / "s3" / "bucket" / "runs" / "demo"
    assert layout.local_dir(sweep) == mirror
    assert layout.tracking_db(sweep) == mirror / layout.TRACKING_DB
    assert layout.report_build_dir(sweep) == mirror / layout.REPORT


# --- layout on the real S3 server ---------------------------------------------------------------


def store(name: str) -> StorePath:
    path = location(f"s3://{BUCKET}/{name}-{time.time_ns()}")
    assert isinstance(path, StorePath)
    return path


@pytest.mark.integration
def test_layout_writes_and_reads_a_trial_directory_on_s3(s3_env) -> None:
    sweep = store("layout")
    trial = layout.trial_dir(sweep, "k1")
    assert layout.trial_status(trial).kind == "unfinished" and layout.trial_dirs_present(sweep) == set()

    layout.atomic_write_json(trial / layout.CONFIG, {"trial_key": "k1"})
    table = pa.table({"epoch": [0, 1, 2], "test_acc": [0.1, 0.5, 0.9]})
    layout.atomic_write_table(trial / layout.METRICS, table)
    for epoch in (1, 0, 2):
        layout.atomic_write_table(layout.trace_part(trial, epoch), pa.table({"epoch": [epoch]}))
    layout.append_line(trial / layout.ATTEMPTS, '{"pid": 1}')
    layout.append_line(trial / layout.ATTEMPTS, '{"pid": 2}')

    assert layout.read_json(trial / layout.CONFIG) == {"trial_key": "k1"}
    assert layout.read_table(trial / layout.METRICS).equals(table)
    assert layout.parquet_rows(trial / layout.METRICS) == 3
    assert [e for e, _ in layout.trace_parts(trial)] == [0, 1, 2]
    assert [a["pid"] for a in read_attempts(trial)] == [1, 2]
    assert layout.trial_dirs_present(sweep) == {"k1"}
    assert layout.trial_status(trial).kind == "unfinished"  # no result.json: not finished, wherever it is

    (trial / layout.ERROR).write_text("boom")
    assert layout.trial_status(trial).errored
    layout.atomic_write_json(trial / layout.RESULT, {"failed": False})  # a torn or partial result
    assert layout.trial_status(trial).kind == "damaged"  # is read as damage on a store too
    result = {"epochs_done": 3, "final_test_acc": 0.9, "final_train_acc": 0.9, "best_test_acc": 0.9}
    result |= {"failed": False, "diverged": False, "total_resets": 0, "reinit_fallbacks": 0}
    result |= {"chance": 0.1, "failure_margin": 0.05, "failure_rule": "rule", "wall_s": 1.0}
    layout.atomic_write_json(trial / layout.RESULT, result)  # the commit
    assert layout.trial_status(trial).finished
    (trial / layout.CHECKPOINT).unlink(missing_ok=True)  # never written: no error
    with pytest.raises(FileNotFoundError):
        (trial / layout.CHECKPOINT).unlink()
    with layout.local_copy(trial / layout.CONFIG) as local:
        assert local.name == layout.CONFIG and local.read_bytes() == (trial / layout.CONFIG).read_bytes()


@pytest.mark.integration
def test_a_folder_set_aside_on_s3_keeps_every_file(s3_env) -> None:
    tune = layout.tune_dir(store("aside"))
    for name in ("a.json", "sub/b.pkl"):
        (tune / name).write_bytes(name.encode())
    aside = tune.rename(layout.unreadable_aside(tune))
    assert not tune.exists()
    assert sorted(p.path[len(aside.path) + 1 :] for p in aside.files()) == ["a.json", "sub/b.pkl"]
    assert (aside / "sub/b.pkl").read_bytes() == b"sub/b.pkl"


@pytest.mark.integration
def test_a_missing_bucket_or_wrong_keys_are_one_line_errors(s3_env, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator import storage

    with pytest.raises(UserError, match=r"^storage_path: bucket s3://no-such-bucket does not exist"):
        layout.check_storage(location("s3://no-such-bucket/runs/x"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    storage._filesystem.cache_clear()
    with pytest.raises(
        UserError, match=r"^storage_path: cannot reach s3://lottery .*AWS_ACCESS_KEY_ID"
    ) as err:
        layout.check_storage(location(f"s3://{BUCKET}/runs/x"))
    assert "\n" not in str(err.value) and "wrong" not in str(err.value)


@pytest.mark.integration
def test_the_write_probe_puts_and_removes_an_object_and_checks_the_local_mirror(
    s3_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOTTERY_HOME", str(tmp_path / "home"))
    sweep = store("probe")
    layout.check_writable(sweep)  # the bucket takes an object, the mirror's nearest folder a file
    assert sweep.files() == [] and list(tmp_path.iterdir()) == []  # nothing left behind
    (tmp_path / "home").write_text("a file where the local mirror's folders would go")
    with pytest.raises(UserError, match=rf"^storage_path: cannot write to {tmp_path / 'home'} "):
        layout.check_writable(sweep)


@pytest.mark.integration
def test_a_sweep_into_a_missing_bucket_exits_2_before_starting(s3_store, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "nobucket", "s3://no-such-bucket/runs", seeds=[0])
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "sweep", str(spec)],
        cwd=ROOT,
        env=os.environ | s3_store.env | {"LOTTERY_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: storage_path: bucket s3://no-such-bucket does not exist; create it first"
    ]
    assert not (tmp_path / "home").exists()  # nothing started, nothing written


# --- a sweep on S3: killed, resumed, aggregated and reported from the bucket ----------------------


def write_spec(tmp_path: Path, name: str, storage: str, **changes) -> Path:
    """Both arms, stored under `storage`, a trial retried once."""
    fields = {"schemes": TWO_ARMS, "storage_path": storage, "max_failures": 1} | changes
    return specfactory.write_spec(tmp_path, name, **fields)


def s3_mtimes(sweep: StorePath, keys: list[str]) -> dict[str, int]:
    """Last-modified of each result.json in the bucket (a rewrite would change it)."""
    infos = sweep.fs.get_file_info([(layout.trial_dir(sweep, k) / layout.RESULT).path for k in keys])
    return {k: i.mtime_ns for k, i in zip(keys, infos, strict=True) if i.type == pafs.FileType.File}


def local_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.kill
@pytest.mark.integration
def test_a_sweep_on_s3_survives_a_killed_driver_and_is_reported_from_the_bucket(
    s3_store, s3_env, tmp_path: Path, ray_tmpdir: str
) -> None:
    prefix = f"s3://{BUCKET}/killed-{time.time_ns()}"
    # One unit at a time: the first finishes and is logged, the second holds after its first epoch.
    spec = write_spec(tmp_path, "s3killed", prefix, max_concurrent_trials=1, pack_size=1)
    plan = load_plan(spec)
    keys = [t.trial_key() for t in plan.trials]
    first = {keys[i] for i in plan.units[0]}
    barrier = Barrier(tmp_path / "barrier", only=set(keys) - first)
    sweep = location(f"{prefix}/s3killed")
    home = tmp_path / "home"
    env = os.environ | s3_store.env | {"RAY_TMPDIR": ray_tmpdir, "LOTTERY_HOME": str(home)}
    env |= {"RAY_USAGE_STATS_ENABLED": "0"} | barrier.env()
    env.pop(FAULT_ENV, None)
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "orchestrator", "sweep", str(spec)]
    log_path = tmp_path / "first.log"
    with log_path.open("w") as log:
        driver = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    barrier.wait_reached(1, driver, log_path, also=lambda: first <= set(complete_runs(sweep)))
    kill_driver(driver, ray_tmpdir)
    barrier.release()  # for the resumed run

    before = s3_mtimes(sweep, keys)
    assert before and len(before) < len(keys), log_path.read_text()
    tries = {k: len(read_attempts(layout.trial_dir(sweep, k))) for k in before}
    logged = complete_runs(sweep)
    assert logged

    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    resumed_s = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(resuming)" in done.stderr  # Tuner.restore from the bucket, not a fresh experiment
    assert "sqlite cannot live on s3://" in done.stderr  # the local tracking store is announced
    assert not lingering_ray_pids(ray_tmpdir), "a cleanly finished driver must leave no Ray process"

    after = s3_mtimes(sweep, keys)
    assert set(after) == set(keys)
    assert {k: after[k] for k in before} == before  # finished trials were not rewritten
    assert {k: len(read_attempts(layout.trial_dir(sweep, k))) for k in before} == tries
    assert list(layout.tune_dir(sweep).glob("experiment_state-*.json"))  # Tune's state is in the bucket
    _, parent, children = child_runs(sweep)
    assert sorted(r.data.tags["trial_key"] for r in children) == sorted(keys), done.stderr  # once each
    assert {k: v for k, v in complete_runs(sweep).items() if k in logged} == logged
    assert {r.info.status for r in children} == {"FINISHED"} and parent.info.status == "FINISHED"
    # Nothing of the sweep directory on local disk: the mirror holds the sqlite store (and its artifacts)
    # and the driver lock, which keeps a second driver on this host out.
    mirror = home / layout.STORES / "s3" / sweep.path
    on_disk = local_files(home)
    assert on_disk and all((home / f).is_relative_to(mirror) for f in on_disk), on_disk
    assert {Path(f).relative_to(mirror.relative_to(home)).parts[0] for f in on_disk} <= {
        layout.TRACKING_DB,
        layout.ARTIFACTS,
        layout.DRIVER_LOCK,
    }

    for step in ("aggregate", "report"):
        run = subprocess.run(
            [sys.executable, "-m", "orchestrator", step, str(sweep)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout + run.stderr
    from orchestrator.aggregate import read_aggregate

    tables = read_aggregate(sweep)  # from the bucket
    assert sorted(tables.trials["trial_key"]) == sorted(keys)
    assert set(tables.trials["status"]) == {"finished"}
    assert tables.summary["n"].sum() == len(keys)
    assert len(tables.epochs) == len(keys) * BASE["epochs"]
    local_html = Path(run.stdout.strip().splitlines()[-1])
    assert local_html.is_relative_to(mirror / layout.REPORT)
    html = (layout.report_dir(sweep) / local_html.name).read_text()  # the copy in the bucket
    assert html == local_html.read_text()
    assert "<b>Failure rule:</b>" in html and "s3killed" in html
    print(f"resume of {len(keys) - len(before)} unfinished trial(s) on S3: {resumed_s:.1f} s")
