"""The user's own net and loader on a multi-node loopback Ray cluster (`lottery sweep --address`).

The net and loader files live only in the driver's folder (a temporary directory, not on any
worker's path). The driver ships them with the job's runtime_env, and the worker imports the copy
Ray placed in its own runtime resources: the builder writes the path it was imported from to a
marker file, so the test reads which file each process actually ran.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from raynodes import cluster, new_token
from test_cluster import driver, trial_dirs

from orchestrator import layout
from orchestrator.run.trainable import read_attempts
from orchestrator.spec import load_plan
from trainers.custom import sha256_of

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom"
MARKED = '''

def build_marked(*, marker: str, **kwargs):
    """The example's builder, noting which file of it ran (the driver's, or a worker's shipped copy)."""
    with open(marker, "a") as out:
        out.write(__file__ + "\\n")
    return build(**kwargs)
'''


def test_a_worker_imports_the_shipped_net_and_loader_not_the_driver_s_files(tmp_path: Path) -> None:
    study = tmp_path / "study"
    study.mkdir()
    (study / "mynet.py").write_text((EXAMPLE / "net.py").read_text() + MARKED)
    shutil.copy(EXAMPLE / "data.py", study / "myloader.py")
    marker = tmp_path / "imported-from.txt"
    storage = str(tmp_path / "storage")
    doc = {
        "name": "custom-cluster",
        "base": {
            "data": {"name": "custom", "loader": "myloader.py:load", "kwargs": {"train": 200}},
            "model": {
                "name": "custom",
                "builder": "mynet.py:build_marked",
                "kwargs": {"marker": str(marker), "width": 4},
                "init": "kaiming",
            },
            "optim": {"name": "adam", "lr": 0.01},
            "epochs": 1,
            "device": "cpu",
        },
        "seeds": [0, 1],
        "schemes": [{"name": "baseline"}],
        "pack_size": 1,
        "storage_path": storage,
        "max_failures": 0,
    }
    spec = study / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    plan = load_plan(spec)
    dirs = trial_dirs(spec, storage)
    token = new_token()
    log = tmp_path / "driver.log"
    with cluster(token, [{"num_cpus": 1}]) as (head, worker):
        worker_id = worker.node_id()
        with driver(spec, head, token, log, {"LOTTERY_HOME": str(tmp_path / "home")}) as process:
            returncode = process.wait(timeout=500)
        output = log.read_text()
        node_dirs = [head.temp_dir, worker.temp_dir]
        imported = marker.read_text().splitlines()
    assert returncode == 0, output

    driver_copy = str(study / "mynet.py")
    assert driver_copy in imported  # the driver's preflight built it from its own folder
    shipped = [path for path in imported if path != driver_copy]
    assert shipped, imported  # every trial built the net on the worker ...
    assert all(any(path.startswith(d) for d in node_dirs) for path in shipped), (shipped, node_dirs)
    assert all("runtime_resources" in path for path in shipped), shipped  # ... from Ray's shipped copy
    sha = sha256_of(study / "mynet.py")
    for trial in plan.trials:
        directory = dirs[trial.trial_key()]
        result = json.loads((directory / layout.RESULT).read_text())
        assert (result["builder"], result["builder_sha256"]) == ("mynet.py:build_marked", sha)
        assert result["data_files"]["loader"]["source_sha256"] == sha256_of(study / "myloader.py")
        assert {line["node_id"] for line in read_attempts(directory)} == {worker_id}
