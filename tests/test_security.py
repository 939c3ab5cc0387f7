"""The embedded Ray of `lottery sweep` is secure by default: token auth on, loopback only.

While a real sweep runs (the CLI as a subprocess with a private RAY_TMPDIR), its Ray processes
are read from /proc: every TCP port they listen on must be a loopback address, and the GCS must
refuse a call without the token or with a wrong one while accepting the right one. The Jobs API
side (a head with a dashboard) is checked in tests/test_cluster.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from raynodes import gcs_call, is_loopback, kill_pids, listening, new_token, processes_with
from specfactory import spec_doc

from orchestrator.run.trainable import read_attempts
from orchestrator.spec import load_plan

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_ray_listens_on_loopback_only_and_refuses_clients_without_the_token(tmp_path: Path) -> None:
    spec = tmp_path / "secure.yaml"
    base = {
        "data": {"name": "digits"},
        "model": {"name": "crater_cnn", "filters": 2, "hidden_fc": 16},
        "epochs": 4,
        "device": "cpu",
    }
    doc = spec_doc("secure", base=base, pack_size=1)
    spec.write_text(yaml.safe_dump(doc | {"storage_path": str(tmp_path / "runs")}))
    trial_dirs = [tmp_path / "runs" / "secure" / "trials" / t.trial_key() for t in load_plan(spec).trials]
    ray_tmpdir, token = tempfile.mkdtemp(prefix="ls", dir="/tmp"), new_token()
    # RAY_AUTH_MODE unset, as a new user runs it; the token is given so the test can present it.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "LOTTERY_"))}
    env |= {"RAY_TMPDIR": ray_tmpdir, "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    marker = f"RAY_TMPDIR={ray_tmpdir}"
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "sweep", str(spec)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not all(read_attempts(d) for d in trial_dirs) and driver.poll() is None:
            assert time.monotonic() < deadline, "no trial started within 120 s"
            time.sleep(0.2)
        assert driver.poll() is None, driver.communicate()[0]
        pids = processes_with(marker)
        ports = listening(pids)
        gcs = next((port for _, name, _, port in ports if name == "gcs_server"), None)
        assert gcs is not None, ports
        answers = {
            "none": gcs_call(f"127.0.0.1:{gcs}", None),
            "wrong": gcs_call(f"127.0.0.1:{gcs}", new_token()),
            "right": gcs_call(f"127.0.0.1:{gcs}", token),
        }
        output, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, 9)
        kill_pids(processes_with(marker))
        subprocess.run(["rm", "-rf", ray_tmpdir], check=False)

    names = {name for _, name, _, _ in ports}
    assert {"gcs_server", "raylet"} <= names, ports
    assert [row for row in ports if not is_loopback(row[2])] == []
    assert answers == {"none": "UNAUTHENTICATED", "wrong": "UNAUTHENTICATED", "right": "OK"}
    assert driver.returncode == 0 and "2/2 finished" in output, output


def test_no_file_turns_ray_token_auth_off() -> None:
    """Token auth is the only guard on a Ray port: no Makefile, code, test, bench or compose file may
    set RAY_AUTH_MODE to disabled (as a shell export, a dict entry or an environment default)."""
    import re

    root = ROOT
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True)
    setting = re.compile(r"""RAY_AUTH_MODE["']?\s*(\?=|:=|=|:|,)\s*["']?disabled""")
    offenders = [
        f"{name}:{number}"
        for name in files.stdout.split()
        if name != "tests/test_security.py" and (root / name).is_file()
        for number, line in enumerate((root / name).read_text(errors="replace").splitlines(), 1)
        if setting.search(line) and not line.lstrip().startswith("#")
    ]
    assert offenders == []


def test_no_usage_reports_leave_a_lottery_process_or_the_compose_servers() -> None:
    """MLflow 3 starts a usage-reporting client when it is first imported, unless it sees a CI or test
    run; outside them (a researcher's shell, a cluster job) only the project's default keeps it off."""
    import mlflow

    probe = "import {}; import mlflow.telemetry.client as c; print(c.get_telemetry_client() is None)"
    markers = ("CI", "PYTEST_CURRENT_TEST", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "GITHUB_ACTIONS")
    env = {k: v for k, v in os.environ.items() if k not in markers}
    off = {}
    for module in ("mlflow", "orchestrator.cli", "orchestrator.tracking.runs"):
        done = subprocess.run(
            [sys.executable, "-c", probe.format(module)], env=env, cwd=ROOT, capture_output=True, text=True
        )
        off[module] = done.stdout.strip()
    assert off == {"mlflow": "False", "orchestrator.cli": "True", "orchestrator.tracking.runs": "True"}, (
        f"mlflow {mlflow.__version__}: {off}"
    )
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in ("mlflow", "ray-head", "ray-worker"):
        assert compose[name]["environment"]["MLFLOW_DISABLE_TELEMETRY"] == "true", name
