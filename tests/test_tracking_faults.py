"""Faults in the tracking layer, injected for real: a process creating the sqlite store killed with
SIGKILL at chosen statements of MLflow's migration, a driver killed between creating the parent
run and writing sweep.json, a half-migrated store left by an older version, a copied sweep, a
locked store. After each, the trial directories (the source of truth) must come back as one
parent run and one FINISHED run per trial key.

No Ray and no server: the trials are trained in this process once, the store is real sqlite,
and each fault is injected into a `python` subprocess that runs the same `open_sweep` the driver
runs, paused at the chosen point (a SQLAlchemy statement hook, or SweepRecord.save) and then
killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from specfactory import BASE, spec_doc

from orchestrator import layout
from orchestrator.provenance import report_provenance
from orchestrator.run.sweep import record_plan
from orchestrator.run.trial import run_trial
from orchestrator.spec import load_plan
from orchestrator.tracking.store import embedded_uri, head_revision, store_revision
from orchestrator.tracking.sweep import SweepRecord, attach_to_parent
from orchestrator.tracking.sync import sync_sweep

pytestmark = pytest.mark.slow  # each fault is a store migrated, a process killed and a sync: seconds each

ROOT = Path(__file__).resolve().parents[1]
SIDE_FILES = layout.SQLITE_SIDE_FILES
NAME = "faults"
SPEC = spec_doc(NAME, base=BASE | {"epochs": 1}, pack_size=1)

# Runs in a subprocess: pause at the chosen point (print "paused", then wait to be killed).
OPEN_SWEEP = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    spec, sweep_dir, uri, where = sys.argv[1:5]
    count = 0

    def pause(what):
        print(f"paused {what}", flush=True)
        time.sleep(600)

    @event.listens_for(Engine, "before_cursor_execute")
    def _count(conn, cursor, statement, *args):
        global count
        count += 1
        if where == f"statement:{count}":
            pause(f"at statement {count}: {' '.join(statement.split())[:60]}")

    from orchestrator.spec import load_plan
    from orchestrator.tracking import sweep
    if where == "before-sweep.json":
        sweep.SweepRecord.save = lambda self, d: pause("after the parent run, before sweep.json")
    if where.startswith("mlflow-only:"):  # what an older driver did: MLflow creates the file in place
        where = where.removeprefix("mlflow-only:")
        from mlflow.tracking import MlflowClient
        MlflowClient(tracking_uri=uri).search_experiments()
    else:
        sweep.open_sweep(load_plan(Path(spec)), Path(sweep_dir), uri)
    print(f"done after {count} statements", flush=True)
    """
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sweep directory whose two trials finished, with no tracking store yet (trained here, no Ray)."""
    root = tmp_path_factory.mktemp("trained")
    spec = root / f"{NAME}.yaml"
    spec.write_text(yaml.safe_dump(SPEC | {"storage_path": str(root / "runs")}))
    plan = load_plan(spec)
    sweep_dir = root / "runs" / NAME
    record_plan(plan, sweep_dir)
    for trial in plan.trials:
        run_trial(trial, layout.trial_dir(sweep_dir, trial.trial_key()), sweep=NAME)
    return sweep_dir


@pytest.fixture
def sweep(trained: Path, tmp_path: Path) -> Iterator[Path]:
    """A fresh copy of the trained sweep, as if it had been trained in `tmp_path` (its own spec file)."""
    sweep_dir = tmp_path / "runs" / NAME
    shutil.copytree(trained, sweep_dir)
    (tmp_path / f"{NAME}.yaml").write_text(yaml.safe_dump(SPEC | {"storage_path": str(tmp_path / "runs")}))
    yield sweep_dir


def planned_keys(sweep_dir: Path) -> list[str]:
    return sorted(layout.planned_keys(sweep_dir))


def kill_while_paused(sweep_dir: Path, where: str, uri: str | None = None) -> str:
    """Run open_sweep in a subprocess paused at `where`, SIGKILL it there; returns what it printed."""
    spec = sweep_dir.parent.parent / f"{NAME}.yaml"
    uri = uri or embedded_uri(sweep_dir)
    process = subprocess.Popen(
        [sys.executable, "-c", OPEN_SWEEP, str(spec), str(sweep_dir), uri, where],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("paused"), f"never reached {where}: {line!r}"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    return line


def parents(sweep_dir: Path) -> list:
    record = SweepRecord.load(sweep_dir)
    client = MlflowClient(tracking_uri=record.tracking_uri)
    return client.search_runs([record.experiment_id], filter_string="tags.role = 'sweep'")


def finished_children(sweep_dir: Path) -> dict[str, list[str]]:
    """trial_key -> statuses of the parent's complete child runs."""
    record = SweepRecord.load(sweep_dir)
    client = MlflowClient(tracking_uri=record.tracking_uri)
    runs = client.search_runs(
        [record.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{record.parent_run_id}' and tags.logged = 'complete'",
    )
    found: dict[str, list[str]] = {}
    for run in runs:
        found.setdefault(run.data.tags["trial_key"], []).append(run.info.status)
    return found


def assert_one_parent_and_one_finished_run_per_trial(sweep_dir: Path) -> None:
    db = layout.tracking_db(sweep_dir)
    assert store_revision(db) == head_revision()
    assert layout.stores_under_construction(db) == []
    found = parents(sweep_dir)
    assert [run.info.run_id for run in found] == [SweepRecord.load(sweep_dir).parent_run_id]
    assert found[0].info.status == "FINISHED"
    assert finished_children(sweep_dir) == {key: ["FINISHED"] for key in planned_keys(sweep_dir)}


# MLflow's creation of a sqlite store runs ~1,700 statements: early table creation, the middle of
# the alembic migrations, and near their end.
@pytest.mark.parametrize("statement", [3, 700, 1600])
def test_a_kill_inside_the_store_migration_leaves_a_store_that_sync_completes(sweep: Path, statement: int):
    said = kill_while_paused(sweep, f"statement:{statement}")
    db = layout.tracking_db(sweep)
    # Killed mid-creation: no complete store is in place (an older version left a half-migrated one).
    assert not db.exists() or store_revision(db) != head_revision(), said

    sync_sweep(sweep)
    assert_one_parent_and_one_finished_run_per_trial(sweep)


def test_a_half_migrated_store_from_before_is_moved_aside_and_rebuilt_from_the_trial_dirs(sweep: Path):
    kill_while_paused(sweep, "mlflow-only:statement:900")  # MLflow itself, killed mid-migration in place
    db = layout.tracking_db(sweep)
    assert db.exists() and store_revision(db) != head_revision()
    broken = db.read_bytes()

    sync_sweep(sweep)
    assert_one_parent_and_one_finished_run_per_trial(sweep)
    [aside] = [p for p in sweep.glob(f"{db.name}.{layout.BROKEN}-*") if not p.name.endswith(SIDE_FILES)]
    assert aside.read_bytes() == broken  # kept as it was, never deleted


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_a_store_file_that_is_not_a_database_is_rebuilt(sweep: Path, damage: str):
    sync_sweep(sweep)
    db = layout.tracking_db(sweep)
    whole = db.read_bytes()
    db.write_bytes({"empty": b"", "garbage": b"not a database" * 500, "truncated": whole[:8192]}[damage])
    sync_sweep(sweep)
    assert_one_parent_and_one_finished_run_per_trial(sweep)


def test_a_kill_between_the_parent_run_and_sweep_json_leaves_one_parent(sweep: Path):
    said = kill_while_paused(sweep, "before-sweep.json")
    assert "before sweep.json" in said and not layout.record_file(sweep).exists()

    sync_sweep(sweep)
    assert_one_parent_and_one_finished_run_per_trial(sweep)


def test_a_stale_running_parent_of_the_same_sweep_is_closed(sweep: Path):
    sync_sweep(sweep)
    kept = SweepRecord.load(sweep)
    client = MlflowClient(tracking_uri=kept.tracking_uri)
    original = client.get_run(kept.parent_run_id)
    # What an older version left after a kill in the gap: an earlier parent, RUNNING, no children.
    stale = client.create_run(
        kept.experiment_id,
        start_time=original.info.start_time - 60_000,
        run_name="sweep faults",
        tags=original.data.tags,
    )
    layout.record_file(sweep).unlink()

    sync_sweep(sweep)
    statuses = {run.info.run_id: run.info.status for run in parents(sweep)}
    assert SweepRecord.load(sweep).parent_run_id == original.info.run_id  # the newest is reused
    assert statuses == {original.info.run_id: "FINISHED", stale.info.run_id: "KILLED"}


def test_a_copied_sweep_never_writes_into_the_originals_store(sweep: Path, tmp_path: Path):
    sync_sweep(sweep)
    original = SweepRecord.load(sweep)
    client = MlflowClient(tracking_uri=original.tracking_uri)
    before = {run.info.run_id for run in client.search_runs([original.experiment_id])}
    artifacts_before = sorted(p for p in layout.artifacts_dir(sweep).rglob("*") if p.is_file())
    copy = tmp_path / "elsewhere" / NAME
    shutil.copytree(sweep, copy)
    extra = layout.aggregate_dir(copy) / "summary.parquet"
    extra.parent.mkdir()
    extra.write_bytes(b"PAR1")

    from io import StringIO

    from rich.console import Console

    console = Console(file=StringIO(), width=400)
    attach_to_parent(copy, [extra], layout.AGGREGATE, console)
    said = console.file.getvalue().strip()
    assert said.count("\n") == 0 and "is a copy of" in said and f"lottery sync {copy}" in said, said
    assert not client.list_artifacts(original.parent_run_id, layout.AGGREGATE)

    sync_sweep(copy)  # the copy becomes its own store, rebuilt from its own trial directories
    record = SweepRecord.load(copy)
    assert record.sweep_dir == str(copy.resolve()) and record.tracking_uri == embedded_uri(copy)
    assert_one_parent_and_one_finished_run_per_trial(copy)
    assert list(copy.glob(f"{layout.TRACKING_DB}.{layout.COPIED}-*"))
    assert {run.info.run_id for run in client.search_runs([original.experiment_id])} == before
    assert sorted(p for p in layout.artifacts_dir(sweep).rglob("*") if p.is_file()) == artifacts_before
    attach_to_parent(copy, [extra], layout.AGGREGATE, console)
    attached = MlflowClient(record.tracking_uri).list_artifacts(record.parent_run_id, layout.AGGREGATE)
    assert [a.path for a in attached] == [f"{layout.AGGREGATE}/summary.parquet"]


def lottery(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def parent_metric_rows(sweep_dir: Path) -> list[tuple[str, float, int]]:
    """Every metric row (key, value, timestamp) of the sweep's parent run, read from its sqlite store."""
    record = SweepRecord.load(sweep_dir)
    with contextlib.closing(sqlite3.connect(layout.tracking_db(sweep_dir))) as db:
        rows = db.execute(
            "SELECT key, value, timestamp FROM metrics WHERE run_uuid = ?", (record.parent_run_id,)
        ).fetchall()
    return sorted(rows)


def test_aggregate_of_a_copy_never_writes_the_originals_parent_and_sync_gives_the_copy_its_own(
    sweep: Path, tmp_path: Path
):
    sync_sweep(sweep)
    done = lottery("aggregate", str(sweep))
    assert done.returncode == 0 and "per-arm summary metrics" in done.stderr, done.stderr
    (layout.report_dir(sweep) / "report.html").parent.mkdir()
    (layout.report_dir(sweep) / "report.html").write_text("<html>built for the original's run</html>")
    original = SweepRecord.load(sweep)
    client = MlflowClient(tracking_uri=original.tracking_uri)
    metrics_before = parent_metric_rows(sweep)
    summary_keys = {key for key, _, _ in metrics_before if "/" in key}
    assert summary_keys and any(key.endswith("/failure_rate") for key in summary_keys)
    copy = tmp_path / "elsewhere" / NAME
    shutil.copytree(sweep, copy)

    done = lottery("aggregate", str(copy))
    assert done.returncode == 0, done.stderr
    said = done.stderr.strip().splitlines()
    assert len(said) == 1 and "is a copy of" in said[0] and f"lottery sync {copy}" in said[0], said
    assert parent_metric_rows(sweep) == metrics_before  # not one row more on the original's parent
    provenance = report_provenance(copy)  # a report of the copy names no run of the original's
    assert (
        original.parent_run_id not in provenance["MLflow parent run"]
        and "a copy of" in provenance["MLflow parent run"]
    )
    assert provenance["tracking store"] == "none"
    assert [a.path for a in client.list_artifacts(original.parent_run_id, layout.AGGREGATE)] == [
        f"{layout.AGGREGATE}/{p.name}" for p in sorted(layout.aggregate_dir(sweep).glob("*.parquet"))
    ]

    done = lottery("sync", str(copy))
    assert done.returncode == 0, done.stderr
    record = SweepRecord.load(copy)
    assert record.parent_run_id != original.parent_run_id and record.sweep_dir == str(copy.resolve())
    assert {key for key, _, _ in parent_metric_rows(copy) if "/" in key} == summary_keys
    attached = MlflowClient(record.tracking_uri).list_artifacts(record.parent_run_id, layout.AGGREGATE)
    assert sorted(a.path.split("/")[-1] for a in attached) == sorted(
        p.name for p in layout.aggregate_dir(copy).glob("*.parquet")
    )
    assert f"run `lottery report {copy}` to build it for run {record.parent_run_id}" in done.stderr
    assert report_provenance(copy)["MLflow parent run"].startswith(record.parent_run_id)
    assert parent_metric_rows(sweep) == metrics_before


def test_sync_reports_a_locked_store_in_one_line(sweep: Path):
    sync_sweep(sweep)
    lock = sqlite3.connect(layout.tracking_db(sweep), isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator", "sync", str(sweep)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tracking store"), done.stderr
    assert "locked" in lines[0] and "lottery sync" in lines[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_lottery_sync_prints_one_progress_bar_and_one_summary_line(sweep: Path):
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "sync", str(sweep)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
    )
    assert done.returncode == 0, done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 2, done.stdout + done.stderr
    assert lines[0].startswith(f"sync {NAME}") and "2/2" in lines[0]
    assert "2 created, 0 already present, 0 not finished" in lines[1]
    assert_one_parent_and_one_finished_run_per_trial(sweep)


def test_each_run_gets_the_trials_own_cgn_figure_and_an_older_directory_gets_one_drawn(sweep: Path):
    """Trials draw their run's CGN figure; a directory written before they did is drawn at logging."""
    older, newer = planned_keys(sweep)
    drawn = layout.trial_dir(sweep, newer) / layout.CGN_FIGURE
    assert drawn.read_bytes().startswith(b"\x89PNG"), "the trial drew no figure"
    (layout.trial_dir(sweep, older) / layout.CGN_FIGURE).unlink()
    sync_sweep(sweep)
    record = SweepRecord.load(sweep)
    client = MlflowClient(tracking_uri=record.tracking_uri)
    for key in (older, newer):
        (run,) = client.search_runs([record.experiment_id], filter_string=f"tags.trial_key = '{key}'")
        local = Path(client.download_artifacts(run.info.run_id, layout.CGN_FIGURE, str(sweep.parent)))
        assert local.read_bytes().startswith(b"\x89PNG"), key
        if key == newer:
            assert local.read_bytes() == drawn.read_bytes()  # uploaded as the trial drew it
    assert not (layout.trial_dir(sweep, older) / layout.CGN_FIGURE).exists()  # the record is not rewritten


# --- damaged trials and trials trained again --------------------------------------------------------


def test_sync_names_and_skips_a_trial_whose_config_json_was_deleted(sweep: Path, tmp_path: Path):
    """A deleted config.json is damage: sync into a new store logs the sound trial, names the damaged
    one and skips it (it stopped at that trial, blaming the store, exit 1)."""
    sound, damaged = planned_keys(sweep)
    (layout.trial_dir(sweep, damaged) / layout.CONFIG).unlink()
    uri = f"sqlite:///{tmp_path / 'new-store.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "sync", str(sweep), "--tracking-uri", uri],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr + done.stdout and "tracking store" not in done.stderr
    [skipped] = [line for line in done.stderr.splitlines() if line.startswith("skipped damaged trial")]
    assert damaged in skipped and f"{layout.CONFIG}: missing" in skipped
    assert "1 created, 0 already present, 0 not finished, 1 damaged" in done.stderr
    record = SweepRecord.load(sweep)
    runs = MlflowClient(tracking_uri=uri).search_runs([record.experiment_id], "tags.logged = 'complete'")
    assert [run.data.tags["trial_key"] for run in runs] == [sound]


def test_the_run_of_a_trial_trained_again_is_superseded_by_the_new_one(sweep: Path):
    """Damaged, set aside and trained again: the old run (the old result) leaves the runs view, tagged
    with the run that replaces it; sync used to find it 'already present' and keep it."""
    from rich.console import Console

    from orchestrator.run.policy import set_aside_damaged

    sync_sweep(sweep)
    record = SweepRecord.load(sweep)
    client = MlflowClient(tracking_uri=record.tracking_uri)
    key = planned_keys(sweep)[0]
    [old] = client.search_runs([record.experiment_id], f"tags.trial_key = '{key}'")
    (layout.trial_dir(sweep, key) / layout.METRICS).write_bytes(b"not parquet")  # damage
    assert set_aside_damaged(sweep, planned_keys(sweep), Console(quiet=True)) == [key]
    plan = load_plan(sweep.parent.parent / f"{NAME}.yaml")
    [trial] = [t for t in plan.trials if t.trial_key() == key]
    new_result = run_trial(trial, layout.trial_dir(sweep, key), sweep=NAME)  # trained again, for real

    report = sync_sweep(sweep)
    assert (report.created, report.present) == (1, 1)
    [current] = client.search_runs([record.experiment_id], f"tags.trial_key = '{key}'")  # active runs
    assert current.info.run_id != old.info.run_id
    assert current.info.end_time == int(1000 * new_result["ended_at"])
    assert current.data.metrics["final_test_acc"] == new_result["final_test_acc"]
    retired = client.get_run(old.info.run_id)
    assert retired.info.lifecycle_stage == "deleted" and retired.info.status == "KILLED"
    assert retired.data.tags["superseded_by"] == current.info.run_id
    assert "Superseded" in retired.data.tags["mlflow.note.content"]
    assert finished_children(sweep) == {k: ["FINISHED"] for k in planned_keys(sweep)}
    assert sync_sweep(sweep).created == 0  # and it stays that way
