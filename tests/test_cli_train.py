"""`lottery train`: one trial to a trial directory and a real MLflow (sqlite) run; bad input exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from typer.testing import CliRunner

from orchestrator.cli import app

ROOT = Path(__file__).resolve().parents[1]
LOTTERY = [sys.executable, "-m", "orchestrator"]


def crater_dir() -> Path:
    return Path(os.environ.get("LOTTERY_SHARED_DATA", ROOT.parent / "shared" / "data")) / "craters"


@pytest.mark.slow
def test_train_on_craters_with_randomout_logs_a_run_that_reads_back(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        *LOTTERY,
        "train",
        "--scheme=randomout",
        "--dataset=craters",
        f"--data-dir={crater_dir()}",
        "--epochs=2",
        "--tau=1e-8",
        "--set=data.image_size=15",
        "--set=model.filters=4",
        "--set=batch_size=128",
        f"--out={tmp_path / 'runs'}",
        f"--tracking-uri={uri}",
        "--experiment=craters",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("craters")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["scheme"] == "randomout" and tags["dataset"] == "craters" and tags["seed"] == "0"
    assert len(tags["trial_key"]) == 16 and tags["config_hash"] != tags["trial_key"]
    assert run.data.params["scheme.tau"] == "1e-08" and run.data.params["data.image_size"] == "15"
    assert (tags["device"], tags["pack_size"]) == ("cpu", "1") and int(tags["threads"]) >= 1
    stored = json.loads(next((tmp_path / "runs" / "train" / "trials").glob("*/result.json")).read_text())
    assert tags["data_fingerprint"] == stored["data_fingerprint"] and len(stored["data_fingerprint"]) == 16
    history = client.get_metric_history(run.info.run_id, "test_acc")
    assert [m.step for m in history] == [0, 1]
    assert 0.0 < history[-1].value <= 1.0
    assert run.data.metrics["final_test_acc"] == history[-1].value

    local = Path(
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, tracking_uri=uri, dst_path=tmp_path / "a")
    )
    metrics = pd.read_parquet(local / "metrics.parquet")
    assert metrics["epoch"].tolist() == [0, 1]
    assert metrics["test_acc"].iloc[-1] == pytest.approx(history[-1].value)
    trace = pd.read_parquet(local / "cgn_trace.parquet")
    assert list(trace.columns) == ["epoch", "step", "layer", "filter", "cgn", "reset"]
    assert len(trace) == 2 * (4 + 4)  # per-epoch mean row for each filter of both conv layers
    trial_dir = tmp_path / "runs" / "train" / "trials" / tags["trial_key"]
    assert (trial_dir / "result.json").exists() and not (trial_dir / "checkpoint.pt").exists()


@pytest.mark.slow
def test_same_trial_twice_is_not_retrained_nor_logged_twice(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["train", "--epochs=1", f"--out={tmp_path}", f"--tracking-uri={uri}", "--set=model.filters=2"]
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    result_file = next(tmp_path.glob("train/trials/*/result.json"))
    stamp = result_file.stat().st_mtime_ns
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert result_file.stat().st_mtime_ns == stamp
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert len(client.search_runs([client.get_experiment_by_name("lottery-train").experiment_id])) == 1


BAD_INPUT = [
    (["--scheme=dropout"], "scheme"),
    (["--model=resnet"], "model.name"),
    (["--dataset=imagenet"], "data.name"),
    (["--scheme=randomout", "--tau=-1"], "scheme.tau"),
    (["--scheme=randomout", "--active-fraction=1.5"], "scheme.active_fraction"),
    (["--scheme=repr", "--drop-fraction=0"], "scheme.drop_fraction"),
    (["--scheme=repr", "--drop-fraction=1"], "scheme.drop_fraction"),
    (["--dataset=craters", "--data-dir=/nonexistent/craters"], "data.data_dir"),
    (["--set=epochs=0"], "epochs"),
    (["--set=model.colour=red"], "model.colour"),
    (["--scheme=repr", "--epochs=5"], "n_iter"),
    (["--seed=18446744073709551616"], "seed"),  # trained an epoch, then an OverflowError writing its tables
    (["--set=optim.lr=.inf"], "optim.lr: Input should be a finite number"),  # every trial "diverged"
    (["--set=data.image_size=4", "--set=model.padding=0"], "model.padding: crater_cnn with padding 0"),
    (["--set=scheme.tau=1e-6"], "scheme.tau: no scheme is named; add --scheme randomout"),
    (["--set=epochs=[1"], "--set 'epochs=[1': the value is not a YAML value"),
    (
        ["--scheme=imp", "--set=scheme.scope=global", "--set=scheme.conv_rate=0.1"],
        "scheme.conv_rate: scope global",
    ),
    (
        ["--scheme=imp", "--set=scheme.layers=conv", "--set=scheme.output_layer=exclude"],
        "scheme.output_layer",
    ),
]


@pytest.mark.parametrize(("args", "field"), BAD_INPUT)
def test_bad_input_is_one_line_naming_the_field_and_exit_2(tmp_path, args, field):
    result = CliRunner().invoke(app, ["train", *args, f"--out={tmp_path}", "--no-mlflow"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert field in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "train").exists(), "nothing may start on bad input"


def test_malformed_yaml_exits_2_without_a_traceback(tmp_path):
    bad = tmp_path / "trial.yaml"
    bad.write_text("model:\n  name: crater_cnn\n filters: [4\n")
    done = subprocess.run(
        [*LOTTERY, "train", f"--config={bad}", f"--out={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: YAML")
    assert "Traceback" not in done.stderr + done.stdout


def test_trial_yaml_is_loaded_and_flags_override_it(tmp_path):
    from orchestrator.run.single import build_trial_config

    path = tmp_path / "trial.yaml"
    path.write_text("scheme: {name: randomout, tau: 1.0e-6}\nmodel: {filters: 3}\nepochs: 7\n")
    cfg = build_trial_config(path, {"epochs": 2}, ["scheme.active_fraction=0.5"])
    assert (cfg.epochs, cfg.model.filters, cfg.scheme.tau, cfg.scheme.active_fraction) == (2, 3, 1e-6, 0.5)


@pytest.mark.slow
def test_train_uses_a_sweep_trials_thread_rule_and_its_numbers(tmp_path):
    """`lottery train` and a sweep trial at the default resources train with the same thread count,
    so a BatchNorm trial (whose sums depend on it) gives the same numbers both ways."""
    import json

    import torch

    from orchestrator.run.single import build_trial_config
    from orchestrator.run.trial import run_trial
    from orchestrator.spec import Resources

    overrides = ["model.filters=8", "model.hidden_fc=64"]
    done = subprocess.run(
        [*LOTTERY, "train", "--scheme=batchnorm", "--epochs=2", *(f"--set={o}" for o in overrides)]
        + [f"--out={tmp_path / 'cli'}", "--no-mlflow"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
    )
    assert done.returncode == 0, done.stderr
    cli = json.loads(next((tmp_path / "cli").glob("train/trials/*/result.json")).read_text())
    assert cli["threads"] == Resources().threads == 1

    config = build_trial_config(None, {"scheme.name": "batchnorm", "epochs": 2}, overrides)
    before = torch.get_num_threads()
    torch.set_num_threads(Resources().threads)  # what the trainable does with a sweep's resources.cpu
    try:
        swept = run_trial(config, tmp_path / "sweep" / config.trial_key(), sweep="train")
    finally:
        torch.set_num_threads(before)
    assert swept["threads"] == cli["threads"]
    numbers = ("final_test_acc", "final_test_loss", "final_train_acc")
    assert [swept[k] for k in numbers] == [cli[k] for k in numbers]


def test_train_into_an_existing_out_says_it_reused_the_stored_result(tmp_path):
    args = ["train", "--epochs=1", f"--out={tmp_path}", "--no-mlflow", "--set=model.filters=2"]
    assert CliRunner().invoke(app, args).exit_code == 0
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    trial_dir = next(tmp_path.glob("train/trials/*"))
    said = " ".join(again.output.split())
    assert f"reused the stored result in {trial_dir}" in said and "to retrain, remove that directory" in said
    assert "epoch 1" not in said  # no training progress: nothing was trained


@pytest.mark.slow
def test_an_unreachable_tracking_uri_keeps_the_result_names_uri_and_cause_and_exits_3(tmp_path):
    """As `lottery sweep` does: the result stays on disk, one line says where MLflow was, why it failed and
    how to log the run later, and the exit code says tracking is incomplete (it was 0 and named only
    the exception class)."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LOTTERY_"))}
    args = ["train", "--epochs=1", "--set=model.filters=2", f"--out={tmp_path}", f"--tracking-uri={uri}"]
    done = subprocess.run([*LOTTERY, *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)

    assert done.returncode == 3, done.stderr
    line = next(x for x in done.stderr.splitlines() if "tracking incomplete" in x)
    assert f"MLflow at {uri} is unavailable (" in line and "Connection" in line, line
    assert "run the same command again" in line
    assert "Traceback" not in done.stderr
    results = list((tmp_path / "train" / "trials").glob("*/result.json"))
    assert len(results) == 1 and str(results[0].parent) in line
