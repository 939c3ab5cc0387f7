"""How many tracking-store requests one trial's run costs: a single logging process on the driver
serves the whole cluster, and every request is a transaction (a round trip to a server)."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from trialfactory import config

from orchestrator import layout
from orchestrator.run.trial import run_trial, run_trials
from orchestrator.tracking.runs import BATCH, BATCH_PARAMS, _batches, ensure_experiment, log_trial
from orchestrator.tracking.store import prepare_store


def test_batches_keep_mlflows_limits_and_put_the_tags_last() -> None:
    params = [Param(f"p{i}", "v") for i in range(250)]
    metrics = [Metric(f"m{i}", 1.0, 0, 0) for i in range(2300)]
    tags = [RunTag("logged", "complete")]
    batches = list(_batches(params, metrics, tags))
    for p, m, t in batches:
        assert len(p) <= BATCH_PARAMS and len(m) <= BATCH and len(p) + len(m) + len(t) <= BATCH
    assert [x for p, _, _ in batches for x in p] == params
    assert [x for _, m, _ in batches for x in m] == metrics
    assert [t for _, _, t in batches] == [[]] * (len(batches) - 1) + [tags]  # with the last values
    assert len(batches) == 3  # 100 + 900, 100 + 900, 50 + 500 + the tag
    assert list(_batches([], [], tags)) == [([], [], tags)]
    assert list(_batches(params[:10], metrics[:5], [])) == [(params[:10], metrics[:5], [])]
    with pytest.raises(ValueError, match="tags"):
        list(_batches([], [], tags * (BATCH_PARAMS + 1)))


class CountingClient(MlflowClient):
    """A real client that counts the store requests it makes."""

    def __init__(self, uri: str) -> None:
        super().__init__(tracking_uri=uri)
        self.calls: collections.Counter[str] = collections.Counter()

    def create_run(self, *args: Any, **kwargs: Any) -> Any:
        self.calls["create_run"] += 1
        return super().create_run(*args, **kwargs)

    def log_batch(self, *args: Any, **kwargs: Any) -> Any:
        self.calls["log_batch"] += 1
        return super().log_batch(*args, **kwargs)

    def set_terminated(self, *args: Any, **kwargs: Any) -> Any:
        self.calls["set_terminated"] += 1
        return super().set_terminated(*args, **kwargs)


@pytest.mark.slow
def test_a_trials_run_is_three_store_requests_with_everything_in_it(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    trial_dir = tmp_path / "trials" / "t"
    result = run_trial(config(epochs=3), trial_dir, sweep="s")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepare_store(uri)
    client = CountingClient(uri)
    experiment = ensure_experiment(client, "s", tmp_path / "artifacts")
    run_id = log_trial(client, experiment, trial_dir)

    assert client.calls == {"create_run": 1, "log_batch": 1, "set_terminated": 1}
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["logged"] == "complete"
    assert run.data.params["epochs"] == "3" and run.data.params["model.filters"] == "4"
    assert run.data.metrics["final_test_acc"] == result["final_test_acc"]
    history = client.get_metric_history(run_id, "test_acc")
    assert [m.step for m in history] == [0, 1, 2]
    artifacts = {f.path for f in client.list_artifacts(run_id)}
    assert {layout.METRICS, layout.TRACE, layout.RESULT, layout.CGN_FIGURE} <= artifacts
    assert log_trial(client, experiment, trial_dir) == run_id  # complete: found, nothing logged again
    assert client.calls["create_run"] == 1


@pytest.mark.slow
def test_without_run_figures_neither_the_trial_nor_tracking_draws_one(tmp_path: Path) -> None:
    """`run_figures: false` saves the drawing on the worker; tracking must not make it up on the driver."""
    torch.set_num_threads(1)
    trial_dir = tmp_path / "trials" / "t"
    run_trials([config(epochs=2)], [trial_dir], sweep="s", run_figures=False)
    assert (trial_dir / layout.TRACE).exists() and not (trial_dir / layout.CGN_FIGURE).exists()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepare_store(uri)
    client = MlflowClient(tracking_uri=uri)
    run_id = log_trial(client, ensure_experiment(client, "s", tmp_path / "artifacts"), trial_dir)
    artifacts = {f.path for f in client.list_artifacts(run_id)}
    assert layout.TRACE in artifacts and layout.CGN_FIGURE not in artifacts
