"""The example of your own network and data (examples/custom) end to end through `lottery sweep`:
a real embedded Ray, a real MLflow sqlite store, run from the checkout while the net, loader and spec
sit in another folder (relative paths resolve against the spec's folder, and Ray's workers import
them from there)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from raynodes import kill_pids, processes_with

from orchestrator import layout
from orchestrator.aggregate import load_trials
from orchestrator.spec import load_plan
from orchestrator.tracking.sweep import SweepRecord
from trainers.custom import sha256_of

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom"
EXAMPLE_PARAMETERS = 906  # examples/custom/net.py at width 8 on 1-channel images, 10 classes


@pytest.fixture
def ray_tmpdir() -> Iterator[str]:
    """A short private Ray temp root; the sweep's Ray processes are found by it and killed by PID."""
    path = tempfile.mkdtemp(prefix="lc", dir="/tmp")
    yield path
    kill_pids(processes_with(f"RAY_TMPDIR={path}"))
    shutil.rmtree(path, ignore_errors=True)


def sweep(spec: Path, ray_tmpdir: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LOTTERY_", "RAY_ADDRESS"))}
    env |= {"RAY_TMPDIR": ray_tmpdir, "RAY_USAGE_STATS_ENABLED": "0"}
    command = [sys.executable, "-m", "orchestrator", "sweep", str(spec)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_the_example_runs_through_lottery_sweep_and_records_its_net(tmp_path: Path, ray_tmpdir: str) -> None:
    study = tmp_path / "study"
    shutil.copytree(EXAMPLE, study)
    doc = yaml.safe_load((study / "spec.yaml").read_text())
    doc["base"]["data"]["kwargs"] = {"train": 300}  # small and quick: 300 train images, 1 epoch
    doc["base"]["epochs"] = 1
    doc["seeds"] = {"start": 0, "count": 2}
    doc["storage_path"] = str(tmp_path / "runs")
    (study / "spec.yaml").write_text(yaml.safe_dump(doc))
    plan = load_plan(study / "spec.yaml")
    assert len(plan.trials) == 4  # baseline and randomout, 2 seeds each
    assert [len(unit) for unit in plan.units] == [2, 2]  # pack_size auto: a generic pack per scheme

    done = sweep(study / "spec.yaml", ray_tmpdir)
    assert done.returncode == 0, done.stdout + done.stderr
    sweep_dir = tmp_path / "runs" / plan.spec.name
    net_sha = sha256_of(study / "net.py")
    for trial in plan.trials:
        result = json.loads((layout.trial_dir(sweep_dir, trial.trial_key()) / layout.RESULT).read_text())
        assert (result["builder"], result["builder_sha256"]) == ("net.py:build", net_sha)
        assert result["parameters"] == EXAMPLE_PARAMETERS
        loader = result["data_files"]["loader"]
        assert (loader["target"], loader["source_sha256"]) == ("data.py:load", sha256_of(study / "data.py"))
        assert result["epochs_done"] == 1
        assert result["pack_size"] == 2  # trained in a generic (torch.func) pack
    layers = layout.read_table(layout.trial_dir(sweep_dir, plan.trials[0].trial_key()) / layout.LAYERS)
    assert sorted(set(layers.column("layer").to_pylist())) == sorted(
        ["stem.0", "blocks.0.dw", "blocks.0.pw", "blocks.1.dw", "blocks.1.pw"]
    )

    record = SweepRecord.load(sweep_dir)
    client = MlflowClient(record.tracking_uri)
    runs = client.search_runs(
        [record.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{record.parent_run_id}'"
    )
    assert sorted(r.data.tags["trial_key"] for r in runs) == sorted(t.trial_key() for t in plan.trials)
    for run in runs:
        assert run.data.tags["builder"] == "net.py:build"
        assert run.data.tags["builder_sha256"] == net_sha
        assert run.data.tags["parameters"] == str(EXAMPLE_PARAMETERS)
        assert run.data.params["model.builder"] == "net.py:build"
        assert run.data.params["model.kwargs.width"] == "8"

    # The builder's kwargs are the user's axes: they name the setting; model.filters means nothing here.
    trials = load_trials(sweep_dir)
    assert trials["filters"].isna().all()
    assert {json.loads(s)["model.width"] for s in trials["setting"]} == {8}
    assert {json.loads(s)["data.train"] for s in trials["setting"]} == {300}

    # The builder edited after the run: its stored results are other code's, refused in one line.
    net = study / "net.py"
    net.write_text(net.read_text() + "\n# edited\n")
    again = sweep(study / "spec.yaml", ray_tmpdir)
    assert again.returncode == 2, again.stdout + again.stderr
    (line,) = again.stderr.strip().splitlines()
    assert line.startswith("error: base.model.builder: the stored result of trial") and net_sha[:12] in line
