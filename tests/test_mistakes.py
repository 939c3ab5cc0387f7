"""Mistakes a new user makes that a spec file cannot hold, each caught before anything starts.

Flag mistakes, trial files given to the wrong command, a device this machine lacks, a second driver
on a running sweep, data that changed under a stored result, signals, help texts and the dry run's
cost estimate. The spec-file mistakes are the corpus in malformed_specs/ (test_malformed_specs.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from barrier import Barrier
from specfactory import spec_doc
from trialfactory import store_finished, stored_result
from typer.testing import CliRunner, Result

from orchestrator import layout
from orchestrator.cli import app
from orchestrator.spec import load_plan
from trainers.config import DataConfig
from trainers.data import load_data
from trainers.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set=model.filters=2", "--set=model.hidden_fc=0", "--set=data.image_size=8", "--epochs=1"]


def crater_dir() -> Path:
    base = Path(os.environ.get("LOTTERY_SHARED_DATA", ROOT.parent / "shared" / "data"))
    folder = base / "craters"
    if not (folder / "All-Fold1-train.rec").is_file():
        pytest.fail(f"crater data not found at {folder}; set LOTTERY_SHARED_DATA to the shared data folder")
    return folder


def lottery(args: list[str], home: Path | None = None) -> Result:
    env = {"RAY_ADDRESS": None, "MLFLOW_TRACKING_URI": None, "LOTTERY_DATA_DIR": None}
    if home is not None:
        env["LOTTERY_HOME"] = str(home)
    return CliRunner().invoke(app, args, env=env)


def one_error_line(result: Result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and "╭" not in result.output
    return lines[0]


def write_spec(path: Path, **changes: Any) -> Path:
    base = {
        "data": {"name": "digits"},
        "model": {"name": "crater_cnn", "filters": 2, "hidden_fc": 0},
        "epochs": 3,
        "device": "cpu",
    }
    doc = spec_doc("mistakes", base=base, pack_size=1, resources={"cpu": 1}) | changes
    path.write_text(yaml.safe_dump(doc))
    return path


# --- flags and trial files ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "--epochs", "abc"], "error: --epochs: Input should be a valid integer"),
        (["train", "--epoch", "3"], "error: --epoch: no such option; did you mean '--epochs'?"),
        (["sweep", "--dryrun", "x.yaml"], "error: --dryrun: no such option; did you mean '--dry-run'?"),
        (["sweep"], "error: Missing argument 'spec'"),
    ],
)
def test_a_flag_mistake_is_one_error_line_not_a_box(args: list[str], expected: str, tmp_path: Path) -> None:
    line = one_error_line(lottery(args, tmp_path / "home"))
    assert line.startswith(expected)
    if "abc" in args:
        assert "(got 'abc')" in line  # the value is echoed


def test_an_empty_trial_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    line = one_error_line(lottery(["train", "-c", str(empty), f"--out={tmp_path / 'out'}", "--no-mlflow"]))
    assert line.startswith(f"error: --config: {empty} is empty")
    assert not (tmp_path / "out").exists()


def test_a_sweep_spec_given_to_train_points_to_sweep(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "spec.yaml")
    line = one_error_line(lottery(["train", "--config", str(spec), f"--out={tmp_path / 'out'}"]))
    assert "is a sweep spec" in line and line.endswith(f"run it with: lottery sweep {spec}")
    assert not (tmp_path / "out").exists()


def test_train_refuses_a_batch_larger_than_the_training_set(tmp_path: Path) -> None:
    args = ["train", "--set=batch_size=5000", *TINY, f"--out={tmp_path / 'out'}", "--no-mlflow"]
    line = one_error_line(lottery(args))
    assert line.startswith("error: batch_size: 5000 is larger than the training set (1348 images")
    assert "full_batch: true" in line
    assert not (tmp_path / "out").exists()


def test_cuda_on_a_machine_without_it_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    line = one_error_line(lottery(["train", "--device", "cuda", f"--out={tmp_path / 'out'}", "--no-mlflow"]))
    assert line == "error: device: 'cuda' requested but no CUDA device is available; use 'auto' or 'cpu'"

    spec = write_spec(tmp_path / "spec.yaml")
    doc = yaml.safe_load(spec.read_text())
    doc["base"]["device"] = "cuda"
    spec.write_text(yaml.safe_dump(doc))
    for extra in ([], ["--dry-run"]):
        line = one_error_line(lottery(["sweep", str(spec), *extra], tmp_path / "home"))
        assert line.startswith("error: base.device: 'cuda' but this machine has no CUDA device")
    assert not (tmp_path / "home").exists() and not (tmp_path / "out").exists()


# --- help texts -----------------------------------------------------------------------------------


def help_text(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


def test_help_names_where_results_live() -> None:
    for command in ("aggregate", "report", "ui", "sync"):
        text = help_text(command)
        assert "$LOTTERY_HOME, default ./runs" in text and "$LOTTERY_HOME/runs" not in text, command
    sweep = help_text("sweep")
    assert "Results go to <storage_path>/<name>/" in sweep
    assert "Run every check the real run does" in sweep and "--retrain-changed" in sweep
    train = help_text("train")
    assert "--device" in train and "Training epochs" in train and "/train/trials/<trial_key>/" in train


# --- one driver per sweep -------------------------------------------------------------------------


def test_a_second_driver_is_refused_naming_the_first(tmp_path: Path) -> None:
    home = tmp_path / "home"
    spec = write_spec(tmp_path / "spec.yaml")
    sweep_dir = home / "mistakes"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from orchestrator import layout\n"
            "with layout.driver_lock(Path(sys.argv[1])):\n"
            "    print('locked', flush=True); time.sleep(120)",
            str(sweep_dir),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        line = one_error_line(lottery(["sweep", str(spec)], home))
        assert line.startswith("error: sweep 'mistakes': another driver is running it")
        assert f"host {socket.gethostname()}, pid {holder.pid}" in line
        assert sorted(p.name for p in sweep_dir.iterdir()) == [layout.DRIVER_LOCK]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    with layout.driver_lock(sweep_dir):  # a dead driver's lock is gone with it
        pass


@pytest.mark.integration
def test_a_cluster_without_the_gpus_a_trial_asks_for_is_refused_right_after_connecting(
    tmp_path: Path,
) -> None:
    """Ray would queue such a trial forever; the check runs before anything is written or logged."""
    import ray

    from orchestrator.errors import UserError
    from orchestrator.run.sweep import run_sweep

    spec = write_spec(tmp_path / "spec.yaml", resources={"cpu": 1, "gpu": 1})
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    try:  # this process's Ray stands in for the cluster behind the address
        with pytest.raises(
            UserError, match=r"^resources.gpu: each trial asks for 1 GPU\(s\) but the Ray cluster "
        ):
            run_sweep(load_plan(spec), root=tmp_path / "home", address="ray://head:10001")
    finally:
        ray.shutdown()
    assert sorted(p.name for p in (tmp_path / "home" / "mistakes").iterdir()) == [layout.DRIVER_LOCK]


# --- data fingerprints ----------------------------------------------------------------------------


def record_ends(path: Path) -> list[int]:
    """Byte offset after each record (whole records only, as the crater files hold)."""
    data, ends, offset = path.read_bytes(), [], 0
    while offset < len(data):
        _, lrecord = struct.unpack_from("<II", data, offset)
        offset += 8 + (lrecord & ((1 << 29) - 1))
        offset += -offset % 4
        ends.append(offset)
    return ends


def test_a_crater_file_cut_at_a_record_boundary_is_refused(tmp_path: Path) -> None:
    source = crater_dir()
    shutil.copy(source / "All-Fold1-test.rec", tmp_path)
    train = (source / "All-Fold1-train.rec").read_bytes()
    (tmp_path / "All-Fold1-train.rec").write_bytes(train[: record_ends(source / "All-Fold1-train.rec")[436]])

    with pytest.raises(DataError, match=r"holds 437 records, the published fold 4,374"):
        load_data(DataConfig(name="craters", data_dir=tmp_path), 0, torch.device("cpu"))


def altered_craters(tmp_path: Path) -> Path:
    """The crater files with one byte of the first record's id changed: same images, other bytes."""
    folder = tmp_path / "altered"
    shutil.copytree(crater_dir(), folder)
    path = folder / "All-Fold1-train.rec"
    data = bytearray(path.read_bytes())
    data[8 + 8] ^= 0xFF  # part header (8 bytes), then the IRHeader's flag and label: the id
    path.write_bytes(bytes(data))
    return folder


@pytest.mark.slow
def test_a_stored_result_is_never_reported_for_other_data(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["train", "--dataset=craters", *TINY, f"--out={out}", "--no-mlflow"]
    assert lottery([*args, f"--data-dir={crater_dir()}"]).exit_code == 0
    trial_dir = next((out / "train" / "trials").iterdir())
    first = json.loads((trial_dir / "result.json").read_text())
    assert len(first["data_fingerprint"]) == 16
    assert {k: v["records"] for k, v in first["data_files"].items()} == {
        "All-Fold1-train.rec": 4374,
        "All-Fold1-test.rec": 486,
    }
    stored = {name: (trial_dir / name).read_bytes() for name in ("result.json", "config.json")}

    altered = altered_craters(tmp_path)
    line = one_error_line(lottery([*args, f"--data-dir={altered}"]))
    assert f"trial {trial_dir.name}" in line and "was trained on other data" in line
    assert f"data fingerprint {first['data_fingerprint']}" in line and "--retrain-changed" in line
    assert {name: (trial_dir / name).read_bytes() for name in stored} == stored  # nothing rewritten

    assert lottery([*args, f"--data-dir={altered}", "--retrain-changed"]).exit_code == 0
    second = json.loads((trial_dir / "result.json").read_text())
    assert second["data_fingerprint"] not in ("", first["data_fingerprint"])
    (aside,) = trial_dir.parent.glob(f"{trial_dir.name}.{layout.CHANGED_DATA}-*")
    assert (aside / "result.json").read_bytes() == stored["result.json"]  # kept, not deleted


@pytest.mark.slow
def test_a_sweep_refuses_stored_results_of_other_data(tmp_path: Path) -> None:
    home = tmp_path / "home"
    spec = write_spec(tmp_path / "spec.yaml", seeds=[0])
    doc = yaml.safe_load(spec.read_text())
    doc["base"]["data"] = {"name": "craters", "data_dir": str(crater_dir()), "image_size": 8}
    spec.write_text(yaml.safe_dump(doc))
    key = load_plan(spec).trials[0].trial_key()
    trial_dir = layout.trial_dir(home / "mistakes", key)
    fake = stored_result(device="cpu", data_fingerprint="0123456789abcdef", wall_s=3.0)
    store_finished(trial_dir, fake)

    for command in (["sweep", str(spec)], ["sweep", "--dry-run", str(spec)]):
        line = one_error_line(lottery(command, home))
        assert line.startswith(f"error: base.data: the stored result of trial {key} was trained on other")
        assert "data fingerprint 0123456789abcdef" in line
    result = lottery(["sweep", "--dry-run", "--no-estimate", "--retrain-changed", str(spec)], home)
    assert result.exit_code == 0, result.output
    assert "1 stored result(s) trained on other data would be set aside and retrained" in result.stdout
    assert json.loads((trial_dir / "result.json").read_text()) == fake  # a dry run moves nothing


# --- the dry run's cost estimate ------------------------------------------------------------------


def test_dry_run_estimates_the_cost_from_a_probe_then_from_finished_trials(tmp_path: Path) -> None:
    home = tmp_path / "home"
    spec = write_spec(tmp_path / "spec.yaml")
    result = lottery(["sweep", "--dry-run", str(spec)], home)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "estimated cost: 6 unit-epochs x measured s/epoch" in text  # 2 seeds alone x 3 epochs
    assert "1 from a one-epoch probe" in text
    assert not home.exists()

    key = load_plan(spec).trials[0].trial_key()
    trial_dir = layout.trial_dir(home / "mistakes", key)
    store_finished(trial_dir, stored_result(device="cpu", wall_s=30.0))
    text = " ".join(lottery(["sweep", "--dry-run", str(spec)], home).stdout.split())
    assert "estimated cost: 3 unit-epochs x measured s/epoch = 30 s" in text  # 10 s per stored epoch
    assert "1 from finished trials" in text


# --- signals --------------------------------------------------------------------------------------


def start_sweep(spec: Path, home: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["LOTTERY_HOME"] = str(home)
    env |= extra_env or {}
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "sweep", str(spec)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.kill
@pytest.mark.integration
def test_sigterm_stops_a_sweep_like_ctrl_c(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    home = tmp_path / "home"
    spec = write_spec(tmp_path / "spec.yaml", max_concurrent_trials=1)
    barrier = Barrier(tmp_path / "barrier")  # the first trial holds after its first epoch
    driver = start_sweep(spec, home, barrier.env())
    try:
        wait_for(lambda: bool(barrier.reached()), 180, "a trial held after a trained epoch")
        driver.send_signal(signal.SIGTERM)
        barrier.release()  # it trains on as any running trial would, until Tune stops it
        out, err = driver.communicate(timeout=120)
    finally:
        driver.kill()

    assert driver.returncode == 1, err
    assert f"interrupted: run `lottery sweep {spec}` again to resume" in err
    assert "SIGTERM received" not in out + err and "Traceback" not in err  # no C++ or Python stack
    assert "Tuner.restore" not in err  # Tune's own resume hint is not this project's
    record = layout.read_json(layout.record_file(home / "mistakes"))
    run = MlflowClient(record["tracking_uri"]).get_run(record["parent_run_id"])
    assert run.info.status == "KILLED"


@pytest.mark.integration
def test_ctrl_c_during_start_up_says_it_stopped_and_how_to_resume(tmp_path: Path) -> None:
    home = tmp_path / "home"
    spec = write_spec(tmp_path / "spec.yaml")
    driver = start_sweep(spec, home)
    try:
        assert driver.stderr is not None
        header = ""
        while "on an embedded local Ray" not in header:  # printed just before Ray starts
            header = driver.stderr.readline()
            assert header, "the driver ended before starting Ray"
        driver.send_signal(signal.SIGINT)
        out, err = driver.communicate(timeout=120)
    finally:
        driver.kill()

    assert driver.returncode in (1, 130), err
    assert f"`lottery sweep {spec}` again to resume" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
