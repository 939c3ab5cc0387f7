"""MLflow as the study's view: `lottery ui` on a logged sweep, read in headless Chromium and over REST.

A fake sweep on disk (tests/sweepfactory.py: baseline vs RandomOut, two widths, some baseline seeds
failed) is logged by the driver's own code (`open_sweep`, `reconcile`, `lottery aggregate`'s summary
step) into a sqlite store; `lottery ui` serves it and prints the URL a researcher opens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from browser import HEADLESS_FLAGS, Browser
from server import stop_process_group
from sweepfactory import lottery_trials, write_sweep

from orchestrator import formats, layout
from orchestrator.aggregate import aggregate
from orchestrator.spec import load_plan
from orchestrator.tracking.names import FAILED_SUFFIX
from orchestrator.tracking.runs import default_tracking_uri, seed_wall_s
from orchestrator.tracking.study import NAME_COLUMN, summary_to_parent
from orchestrator.tracking.sweep import SweepRecord, open_sweep, reconcile
from orchestrator.tracking.ui_server import OPEN_PATH

SPEC = Path(__file__).parent / "specs" / "cluster_smoke.yaml"
ARMS = [("baseline", {}), ("randomout", {"tau": 1e-8, "active_fraction": 1.0})]
# A width grid: four arms, each named by scheme, width and every hyperparameter (defaults too).
ARM_GROUPS = ("baseline 2f", "baseline 8f", "randomout 2f P=1 tau=1e-08", "randomout 8f P=1 tau=1e-08")
UI_START_S = 300.0  # a cold `mlflow ui` takes 20-100 s on a loaded 2-core machine


@dataclass(frozen=True)
class ServedSweep:
    sweep_dir: Path
    record: SweepRecord
    url: str  # the first line `lottery ui` printed: the runs
    parent_url: str  # its second: the parent run (the study)
    base: str


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_healthy(base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + UI_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"lottery ui exited with {process.returncode} before {base} answered")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{base}/health did not answer within {UI_START_S:.0f} s")


def _rest(base: str, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{endpoint}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedSweep]:
    tmp = tmp_path_factory.mktemp("study")
    sweep_dir = write_sweep(tmp, "study", lottery_trials(ARMS, seeds=range(4), filters=(2, 8), fail_rate=0.5))
    record = open_sweep(load_plan(SPEC), sweep_dir, default_tracking_uri(sweep_dir))
    reconcile(record, sweep_dir, layout.planned_keys(sweep_dir), errored=True)
    summary_to_parent(record, sweep_dir, aggregate(sweep_dir), console=_Quiet())
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "ui", str(sweep_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().decode().rstrip("\n")
        parent_url = process.stdout.readline().decode().rstrip("\n")
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, process)
        yield ServedSweep(sweep_dir, record, url, parent_url, base)
    finally:
        stop_process_group(process, grace_s=5.0)


class _Quiet:
    def print(self, *args: object, **kwargs: object) -> None:
        pass


def _chromium(args: list[str], profile: Path) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "Chromium is not installed: apt-get install -y chromium"
    process = subprocess.Popen(
        [binary, *HEADLESS_FLAGS, f"--user-data-dir={profile}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stdout, _ = process.communicate(timeout=150)
    finally:
        stop_process_group(process, grace_s=5.0)
    assert process.returncode == 0
    return stdout.decode(errors="replace")


@pytest.mark.integration  # MLflow UI server
def test_ui_prints_the_runs_and_the_parent_run_and_stores_a_view_grouped_by_arm(served: ServedSweep) -> None:
    assert served.url == f"{served.base}{OPEN_PATH}"
    assert served.parent_url == f"{served.base}{OPEN_PATH}?run={served.record.parent_run_id}"
    with urllib.request.urlopen(served.url, timeout=30) as response:
        page = response.read().decode()
    found = re.search(
        r"#/experiments/(\w+)/runs\?workflowType=machine_learning&amp;viewStateShareKey=(\w+)", page
    )
    assert found and found[1] == served.record.experiment_id, page
    with urllib.request.urlopen(
        f"{served.base}/api/2.0/mlflow/experiments/get?experiment_id={served.record.experiment_id}"
    ) as response:
        tags = {t["key"]: t["value"] for t in json.loads(response.read())["experiment"]["tags"]}
    view = json.loads(tags[f"mlflow.sharedViewState.{found[2]}"])
    assert view["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "arm"}]
    assert view["columnWidths"][NAME_COLUMN] == 380 and NAME_COLUMN in view["columnOrder"]


def _open_runs(page: Browser, url: str) -> None:
    page.open(url)
    page.wait("document.querySelector('.ag-row a[href*=\"/runs/\"]')", timeout_s=120)
    page.wait("document.body.innerText.includes('Group: ')")


@pytest.mark.integration  # MLflow UI server, Chromium
def test_runs_page_groups_by_arm_in_distinct_colours_with_outcome_first_and_whole_names(
    served: ServedSweep, tmp_path: Path
) -> None:
    with Browser(tmp_path / "profile") as page:
        _open_runs(page, served.url)
        lines = page.text().splitlines()
        groups = {
            line.removeprefix("Group: "): lines[i - 1]
            for i, line in enumerate(lines)
            if line.startswith("Group: ")
        }
        assert set(groups) == set(ARM_GROUPS), groups  # a width grid is never pooled; defaults named
        colours = list(groups.values())
        assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colours) and len(set(colours)) == len(colours)
        headers = page.js(
            "Array.from(document.querySelectorAll('.ag-header-cell[col-id]')).map(h => "
            "[h.getAttribute('col-id'), h.getBoundingClientRect().x, h.getBoundingClientRect().width])"
        )
        cells = {col: (x, width) for col, x, width in headers}
        assert cells[NAME_COLUMN][1] >= 370, cells  # the stored width applies to the run-name column
        study = [c for c in cells if c.startswith(("tags.", "metrics."))]
        assert min(study, key=lambda c: cells[c][0]) == "tags.`outcome`", cells
        cut = page.js(
            "Array.from(document.querySelectorAll('.ag-row a[href*=\"/runs/\"]'))"
            ".filter(a => a.innerText.includes('lottery-failed'))"
            ".map(a => [a.innerText, a.scrollWidth <= a.clientWidth + 1])"
        )
        assert cut and all(whole for _, whole in cut), cut  # ' [lottery-failed]' is read whole
        outcome = page.js(
            "Array.from(document.querySelectorAll('.ag-cell[col-id=\"tags.`outcome`\"]'))"
            ".map(c => c.innerText)"
        )
        assert "lottery-failed" in outcome and "ok" in outcome, outcome
        out = os.environ.get("LOTTERY_SHOTS")
        if out:  # keep the page for a reader (not a test outcome)
            page.screenshot(Path(out) / "mlflow_runs_grouped.png")


@pytest.mark.integration  # MLflow UI server, Chromium
def test_a_run_clicked_in_the_table_stays_in_model_training(served: ServedSweep, tmp_path: Path) -> None:
    with Browser(tmp_path / "profile") as page:
        _open_runs(page, served.url)
        href = page.js(
            "(() => { const a = Array.from(document.querySelectorAll('.ag-row a[href*=\"/runs/\"]'))"
            ".find(a => a.innerText.includes('lottery-failed'));"
            " a.click(); return a.getAttribute('href'); })()"
        )
        page.wait(f"location.hash.startsWith({json.dumps(href)})")
        page.wait("document.body.innerText.includes('Lottery failure')")  # the run page, with its note
        links = dict(
            page.js(
                "Array.from(document.querySelectorAll('a')).map(a => [a.getAttribute('href'), a.innerText])"
            )
        )
        experiment = f"#/experiments/{served.record.experiment_id}"
        assert not [h for h in links if h and "evaluation-runs" in h], links  # no GenAI breadcrumb or sidebar
        assert f"{experiment}/runs" in links and "Runs" in links.values(), links
        assert f"{experiment}/chat-sessions" not in links, links
        page.call("Runtime.evaluate", expression=f"location.hash = {json.dumps(experiment + '/runs')}")
        page.wait("document.querySelector('.ag-row a[href*=\"/runs/\"]')")  # the breadcrumb's page: the runs


@pytest.mark.integration  # MLflow UI server
def test_child_runs_last_as_long_as_their_trials(served: ServedSweep) -> None:
    body = {"experiment_ids": [served.record.experiment_id], "filter": "", "max_results": 1000}
    runs = _rest(served.base, "runs/search", body)["runs"]
    children = [r for r in runs if "trial_key" in _tags(r)]
    assert len(children) == len(layout.planned_keys(served.sweep_dir)) == 16
    for run in children:
        tags = _tags(run)
        result = json.loads(
            (layout.trial_dir(served.sweep_dir, tags["trial_key"]) / "result.json").read_text()
        )
        start, end = int(run["info"]["start_time"]), int(run["info"]["end_time"])
        own = seed_wall_s(formats.upgrade_result(result))  # its share of its pack's time
        assert abs((end - start) / 1000 - own) < 1.0
        assert abs(end / 1000 - result["ended_at"]) < 1.0
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert metrics["failed"] == float(result["failed"])
        assert run["info"]["run_name"].endswith(FAILED_SUFFIX) == result["failed"]
        if result["failed"]:
            assert (
                "Lottery failure" in tags["mlflow.note.content"]
                and result["failure_rule"] in tags["mlflow.note.content"]
            )
        assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
        assert run["info"]["run_name"].startswith(f"{tags['scheme']} seed={tags['seed']} ")
        listing = f"{served.base}/api/2.0/mlflow/artifacts/list?run_id={run['info']['run_id']}"
        with urllib.request.urlopen(listing, timeout=30) as response:
            files = {f["path"]: f for f in json.loads(response.read()).get("files", [])}
        assert int(files["cgn_filters.png"]["file_size"]) > 2000  # the per-filter CGN trace, drawn
    assert any(_tags(r)["failed"] == "true" for r in children)


@pytest.mark.integration  # MLflow UI server
def test_parent_run_carries_the_spec_and_per_arm_summaries(served: ServedSweep) -> None:
    body = {"experiment_ids": [served.record.experiment_id], "filter": "", "max_results": 1000}
    parent = next(
        r for r in _rest(served.base, "runs/search", body)["runs"] if _tags(r).get("role") == "sweep"
    )
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params["name"] == "cluster-smoke" and json.loads(params["seeds"]) == [0, 1]
    assert params["base.model.filters"] == "2" and params["max_failures"] == "0"
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    summary = aggregate(served.sweep_dir).summary.set_index(["scheme", "filters"])
    base2 = summary.loc[("baseline", 2)]
    assert metrics["summary/baseline_2f/failure_rate"] == pytest.approx(base2.failure_rate)
    assert metrics["summary/baseline_2f/failure_ci_high"] == pytest.approx(base2.failure_ci_high)
    assert metrics["summary/randomout_8f_P1_tau1e-08/acc_median"] == pytest.approx(
        summary.loc[("randomout", 8)].acc_median
    )
    assert "summary/baseline_8f/acc_iqr" in metrics
    assert re.fullmatch(r"[0-9a-f]{40}", _tags(parent)["mlflow.source.git.commit"])


def test_ui_refuses_a_busy_port_before_starting_anything(tmp_path: Path) -> None:
    sweep_dir = write_sweep(tmp_path, "busy", lottery_trials(ARMS[:1], seeds=range(2)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator", "ui", str(sweep_dir), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.strip() == f"error: --port: 127.0.0.1:{port} is already in use; pick another with --port"
    )
    assert done.stdout == "" and not (sweep_dir / "mlflow.db").exists()
