"""The study on the parent run, read back through MlflowClient: the question, the setting, the per-arm
table (description and `summary/arms.json`), `summary/<arm>/<statistic>` metrics, and the stamp that
tells a summary the sweep has moved on from.

A fake width-grid sweep (tests/sweepfactory.py) is logged by the driver's own code (`open_sweep`,
`reconcile`) into a sqlite store and summarised as `lottery aggregate` does (`summary_to_parent`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sweepfactory import lottery_trials, write_sweep

from orchestrator import layout
from orchestrator.aggregate import aggregate, load_trials, trials_fingerprint
from orchestrator.spec import load_plan
from orchestrator.tracking.runs import default_tracking_uri
from orchestrator.tracking.study import ARMS_TABLE, stale_line, summary_to_parent
from orchestrator.tracking.sweep import SweepRecord, open_sweep, reconcile

SPEC = Path(__file__).parent / "specs" / "cluster_smoke.yaml"
ARMS = [("baseline", {}), ("randomout", {"tau": 1e-8, "active_fraction": 1.0})]
QUESTION = "Does RandomOut lower the failure rate of a 2- and an 8-filter CraterCNN?"


class _Quiet:
    def print(self, *args: object, **kwargs: object) -> None:
        pass


@dataclass(frozen=True)
class Summarised:
    sweep_dir: Path
    record: SweepRecord
    client: MlflowClient
    summary: pd.DataFrame
    decision: pd.DataFrame


@pytest.fixture(scope="module")
def summarised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Summarised]:
    tmp = tmp_path_factory.mktemp("parent")
    sweep_dir = write_sweep(tmp, "study", lottery_trials(ARMS, seeds=range(4), filters=(2, 8), fail_rate=0.5))
    spec = json.loads(layout.spec_file(sweep_dir).read_text())
    layout.spec_file(sweep_dir).write_text(json.dumps(spec | {"description": QUESTION}))
    record = open_sweep(load_plan(SPEC), sweep_dir, default_tracking_uri(sweep_dir))
    reconcile(record, sweep_dir, layout.planned_keys(sweep_dir), errored=True)
    tables = aggregate(sweep_dir)
    summary_to_parent(record, sweep_dir, tables, console=_Quiet())
    client = MlflowClient(tracking_uri=record.tracking_uri)
    yield Summarised(sweep_dir, record, client, tables.summary, tables.decision)


def _parent(s: Summarised):
    return s.client.get_run(s.record.parent_run_id)


def test_the_description_states_the_question_the_setting_each_arm_and_the_report(summarised: Summarised):
    note = _parent(summarised).data.tags["mlflow.note.content"]
    assert f"**Question**: {QUESTION}" in note
    assert "**Setting**: lr=0.01 optimizer=sgd" in note
    children = summarised.client.search_runs(
        [summarised.record.experiment_id], f"tags.mlflow.parentRunId = '{summarised.record.parent_run_id}'"
    )
    arms = {run.data.tags["config_hash"]: run.data.tags["arm"] for run in children}
    assert set(arms.values()) == {
        "baseline 2f",
        "baseline 8f",
        "randomout 2f P=1 tau=1e-08",
        "randomout 8f P=1 tau=1e-08",
    }
    rows = {line.split(" | ")[0].strip("| "): line for line in note.splitlines() if line.startswith("| ")}
    for r in summarised.summary.itertuples(index=False):
        row = rows[arms[r.config_hash]]  # named as the runs table groups it
        ci = f"{100 * r.failure_rate:.1f} [{100 * r.failure_ci_low:.1f}, {100 * r.failure_ci_high:.1f}]"
        assert f" {r.n} | {r.n_failed} | {ci} | {100 * r.acc_median:.2f} | {100 * r.acc_iqr:.2f} |" in row, (
            row
        )
        if r.scheme == "randomout":
            assert (
                f"{100 * r.gain_median:.2f} | {r.n_better}/{r.n_tied}/{r.n_worse} | {r.wilcoxon_p:.3g}" in row
            )
    assert "Wilcoxon p" in rows["arm"] and "better/tied/worse" in rows["arm"]
    # The decision-grade columns: the IQM with its CI for every arm, P(better) for each compared arm.
    for d in summarised.decision.itertuples(index=False):
        row = rows[arms[d.config_hash]]
        assert f"| {100 * d.iqm:.1f} [{100 * d.iqm_ci_low:.1f}, {100 * d.iqm_ci_high:.1f}] |" in row, row
        if d.scheme == "randomout":
            assert row.rstrip(" |").endswith(
                f"{d.p_improve:.2f} [{d.p_improve_ci_low:.2f}, {d.p_improve_ci_high:.2f}]"
            )
    assert "IQM % [95% CI]" in rows["arm"] and "P(better) [95% CI]" in rows["arm"]
    assert f"/runs/{summarised.record.parent_run_id}/artifacts/report/report.html)" in note
    tags = _parent(summarised).data.tags
    assert f"Summary of {tags['summary.trials']} trials at {tags['summary.at']}" in note


def test_the_arm_table_is_an_mlflow_table_and_metrics_read_per_arm(summarised: Summarised):
    run = _parent(summarised)
    local = summarised.client.download_artifacts(run.info.run_id, ARMS_TABLE)
    table = json.loads(Path(local).read_text())
    assert table["columns"][:3] == ["arm", "n", "failed"] and len(table["data"]) == len(summarised.summary)
    assert ARMS_TABLE in json.loads(run.data.tags["mlflow.loggedArtifacts"])[0]["path"]
    summary_keys = [k for k in run.data.metrics if "/" in k]
    assert summary_keys and all(k.startswith("summary/") for k in summary_keys)  # one chart section
    per_arm = {k.split("/")[1] for k in summary_keys}
    assert len(per_arm) == len(summarised.summary) and len(summary_keys) <= 6 * len(per_arm)
    base8 = summarised.summary.set_index(["scheme", "filters"]).loc[("baseline", 8)]
    assert run.data.metrics["summary/baseline_8f/failure_ci_low"] == pytest.approx(base8.failure_ci_low)


def test_the_stamp_names_the_trials_and_tells_a_stale_summary(summarised: Summarised, tmp_path: Path):
    tags = _parent(summarised).data.tags
    trials = load_trials(summarised.sweep_dir)
    assert tags["summary.fingerprint"] == trials_fingerprint(trials)
    assert tags["summary.trials"] == str(len(trials)) and tags["summary.at"].endswith("UTC")
    assert stale_line(summarised.record, trials, summarised.sweep_dir) is None

    moved_on = trials.copy()
    moved_on.loc[0, "final_test_acc"] += 0.01  # a trial trained again since the summary
    line = stale_line(summarised.record, moved_on, summarised.sweep_dir)
    assert line is not None and "no longer matches" in line and tags["summary.at"] in line
    assert f"lottery aggregate {summarised.sweep_dir}" in line and "\n" not in line


@pytest.mark.integration  # `lottery aggregate` in a subprocess
def test_aggregate_refreshes_the_stamp_of_a_sweep_that_moved_on(tmp_path: Path):
    sweep_dir = write_sweep(tmp_path, "small", lottery_trials(ARMS, seeds=range(2)))
    record = open_sweep(load_plan(SPEC), sweep_dir, default_tracking_uri(sweep_dir))
    reconcile(record, sweep_dir, layout.planned_keys(sweep_dir), errored=True)
    summary_to_parent(record, sweep_dir, aggregate(sweep_dir), console=_Quiet())
    client = MlflowClient(tracking_uri=record.tracking_uri)
    before = client.get_run(record.parent_run_id).data.tags["summary.fingerprint"]
    result = layout.trial_dir(sweep_dir, layout.planned_keys(sweep_dir)[0]) / layout.RESULT
    result.write_text(json.dumps(json.loads(result.read_text()) | {"final_test_acc": 0.99, "failed": False}))
    assert stale_line(record, load_trials(sweep_dir), sweep_dir) is not None
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "aggregate", str(sweep_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    after = client.get_run(record.parent_run_id).data.tags["summary.fingerprint"]
    assert after != before and after == trials_fingerprint(load_trials(sweep_dir))
    assert stale_line(record, load_trials(sweep_dir), sweep_dir) is None
