"""A full or read-only sweep directory, on a real file system: a small tmpfs mounted for the test
(the tests run as root) and unmounted afterwards; its size, or a remount read-only, is the fault.

Before start: one line and exit 2, nothing started. During a sweep: the trial's write fails with
ENOSPC, the sweep stops at once (no retries) with one line naming the path and the free space, the
parent run is KILLED, exit 5; once the disk has room the same command resumes and finishes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from raynodes import kill_pids, processes_with
from specfactory import BASE, write_spec
from typer.testing import CliRunner

from orchestrator import layout
from orchestrator.cli import app
from orchestrator.errors import STORAGE_EXIT, USAGE_EXIT
from orchestrator.run.trainable import read_attempts
from orchestrator.run.trial import PackSink
from orchestrator.storage_fault import StorageFault
from orchestrator.tracking.sweep import SweepRecord

ROOT = Path(__file__).resolve().parents[1]
# Big enough for the spec, the plan, Tune's state and a trial's first epoch of records; the
# checkpoint of a 4,000-unit hidden layer (4 MB) is not.
SMALL = "2m"


@contextlib.contextmanager
def small_disk(where: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` (read-only if asked), unmounted however the test ends."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def ray_tmpdir() -> Iterator[str]:
    """A short private Ray temp root for the driver subprocess; its Ray processes are killed by PID."""
    path = tempfile.mkdtemp(prefix="lr", dir="/tmp")
    yield path
    kill_pids(processes_with(f"RAY_TMPDIR={path}"))
    shutil.rmtree(path, ignore_errors=True)


def spec_file(tmp_path: Path, storage: Path, name: str, hidden_fc: int = 16, epochs: int = 2) -> Path:
    model = BASE["model"] | {"hidden_fc": hidden_fc}
    return write_spec(
        tmp_path,
        name,
        base=BASE | {"model": model, "epochs": epochs},
        pack_size=1,
        storage_path=str(storage),
        # The tracking store beside the test, so the parent run can still be closed when the disk is full.
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )


# --- the file layer -----------------------------------------------------------------------------


def test_a_write_to_a_full_or_read_only_disk_is_a_storage_fault_naming_the_file(tmp_path: Path):
    with small_disk(tmp_path / "disk", "256k") as disk:
        target = disk / "trials" / "k" / layout.METRICS
        target.parent.mkdir(parents=True)
        with pytest.raises(StorageFault) as raised:
            layout.atomic_write_bytes(target, bytes(1024**2))
        assert (raised.value.path, raised.value.code) == (str(target), errno.ENOSPC)
        assert raised.value.free is not None and raised.value.free < 64 * 1024  # when it failed
        assert f"storage: cannot write {target} (no space left on the device;" in raised.value.line()
        assert list(target.parent.iterdir()) == []  # the partial temporary file gave its space back

        # A checkpoint: torch.save on a full disk raises an opaque RuntimeError; written by the file
        # layer it is the same storage fault.
        sink = PackSink({}, disk / "packs" / "p")
        with pytest.raises(StorageFault) as raised:
            sink.on_checkpoint(0, {"weights": torch.zeros(512 * 1024)})
        assert raised.value.code == errno.ENOSPC and raised.value.path.endswith(layout.CHECKPOINT)

    with small_disk(tmp_path / "ro", "256k", read_only=True) as disk:
        with pytest.raises(StorageFault) as raised:
            layout.append_line(disk / layout.ATTEMPTS, "{}")
        assert raised.value.code == errno.EROFS and "read-only file system" in raised.value.line()


def test_lottery_train_into_a_full_disk_is_one_line_and_exit_5(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "1m") as disk:
        args = ["train", "--dataset=digits", "--epochs=2", "--set", "model.hidden_fc=4000"]
        result = CliRunner().invoke(app, [*args, f"--out={disk}", "--no-mlflow"], env={"LOTTERY_HOME": None})
        assert result.exit_code == STORAGE_EXIT, result.output
        assert "Traceback" not in result.output
        [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert line.startswith(f"error: storage: cannot write {disk / layout.TRAIN}"), line
        assert "(no space left on the device; " in line


# --- before start -------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_an_unwritable_sweep_directory_is_one_line_and_exit_2_before_anything_starts(
    tmp_path: Path, fault: str
) -> None:
    """It was a 66-line traceback (read-only; 20 s) or Tune retrying every trial into the full disk."""
    with small_disk(tmp_path / "disk", "64k", read_only=fault == "read-only") as disk:
        if fault == "full":
            with contextlib.suppress(OSError), open(disk / "ballast", "wb") as f:
                f.write(bytes(1024**2))
        spec = spec_file(tmp_path, disk / "runs", "unwritable")
        env = {"RAY_ADDRESS": None, "MLFLOW_TRACKING_URI": None, "LOTTERY_HOME": str(tmp_path / "home")}
        result = CliRunner().invoke(app, ["sweep", str(spec)], env=env)
        assert result.exit_code == USAGE_EXIT, result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and "Traceback" not in result.output, result.output
        meaning = "read-only file system" if fault == "read-only" else "no space left on the device"
        assert lines[0].startswith(f"error: storage_path: cannot write to {disk} ({meaning}; "), lines[0]
        assert " free)" in lines[0] and "storage_path" in lines[0]
        assert sorted(p.name for p in disk.iterdir()) == ([] if fault == "read-only" else ["ballast"])
    assert not (tmp_path / "mlflow.db").exists()  # nothing started


# --- during a sweep -----------------------------------------------------------------------------


@pytest.mark.integration
def test_a_disk_that_fills_up_stops_the_sweep_at_once_with_exit_5_and_it_resumes(
    tmp_path: Path, ray_tmpdir: str
) -> None:
    """The first checkpoint (4 MB) does not fit in the 2 MiB sweep directory. Before: every trial
    retried into the full disk for 217 s, 21 ENOSPC lines, exit 1, no summary, parent RUNNING."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {"RAY_TMPDIR": ray_tmpdir, "RAY_USAGE_STATS_ENABLED": "0", "LOTTERY_HOME": str(tmp_path / "home")}
    with small_disk(tmp_path / "disk", SMALL) as disk:
        spec = spec_file(tmp_path, disk, "full", hidden_fc=4000)
        sweep = [sys.executable, "-m", "orchestrator", "sweep", str(spec)]
        done = subprocess.run(sweep, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        said = done.stdout + done.stderr
        assert done.returncode == STORAGE_EXIT, said
        assert "Traceback" not in said and "retrying" not in said and "Errno" not in said, said
        [fault] = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert fault.startswith(f"error: storage: cannot write {disk / 'full'}"), fault
        assert "(no space left on the device; " in fault and " free)" in fault
        assert f"run `lottery sweep {spec}` to resume" in done.stderr
        sweep_dir = disk / "full"
        keys = layout.planned_keys(sweep_dir)
        assert all(len(read_attempts(layout.trial_dir(sweep_dir, k))) <= 1 for k in keys)  # no retries
        assert not any((layout.trial_dir(sweep_dir, k) / layout.ERROR).exists() for k in keys)
        record = SweepRecord.load(sweep_dir)
        parent = MlflowClient(tracking_uri=record.tracking_uri).get_run(record.parent_run_id)
        assert parent.info.status == "KILLED"

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # room again
        again = subprocess.run(sweep, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert again.returncode == 0, again.stdout + again.stderr
        assert all(layout.trial_status(layout.trial_dir(sweep_dir, k)).finished for k in keys)
        assert json.loads((sweep_dir / layout.RECORD).read_text())["parent_run_id"] == record.parent_run_id
        parent = MlflowClient(tracking_uri=record.tracking_uri).get_run(record.parent_run_id)
        assert parent.info.status == "FINISHED"
