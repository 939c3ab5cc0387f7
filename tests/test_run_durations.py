"""A packed seed's time is its share of the pack's: durations compare schemes, not how seeds were packed.

K seeds trained at once as one network take the pack's wall time together; each seed's result, its row
in the trial table and its MLflow run (metric, duration, tags naming the pack) say its own share.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from trialfactory import config, store_finished, stored_result

from orchestrator import formats, layout
from orchestrator.aggregate import load_trials
from orchestrator.run.trial import pack_key, run_trials
from orchestrator.tracking.runs import ensure_experiment, log_trial
from orchestrator.tracking.store import prepare_store


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, list[Path]]:
    """Three seeds of one configuration trained as one pack, as a sweep's worker trains them."""
    torch.set_num_threads(1)
    sweep_dir = tmp_path_factory.mktemp("sweep")
    configs = [config(epochs=2, seed=seed) for seed in (0, 1, 2)]
    dirs = [layout.trial_dir(sweep_dir, c.trial_key()) for c in configs]
    unit = layout.pack_dir(sweep_dir, pack_key(configs))
    run_trials(configs, dirs, sweep="s", pack_dir=unit, run_figures=False)
    layout.atomic_write_json(layout.spec_file(sweep_dir), {"name": "s", "failure_margin": 0.05})
    return sweep_dir, configs, dirs


def test_each_seed_of_a_pack_records_its_share_and_the_pack_it_shared(packed) -> None:
    _, configs, dirs = packed
    results = [layout.trial_status(d).result for d in dirs]
    assert all(r is not None for r in results)
    wall = {r["wall_s"] for r in results}
    assert len(wall) == 1 and wall.pop() > 0  # the pack's time, the same for every seed
    for r in results:
        assert r["format"] == formats.RESULT_FORMAT
        assert r["pack_size"] == 3 and r["pack_key"] == pack_key(configs)
        assert r["seed_wall_s"] == pytest.approx(r["wall_s"] / 3)


def test_the_trial_table_carries_the_seed_time_beside_the_packs(packed) -> None:
    sweep_dir, _, _ = packed
    trials = load_trials(sweep_dir)
    assert list(trials["pack_size"]) == [3, 3, 3]
    assert (trials["seed_wall_s"] * 3).tolist() == pytest.approx(trials["wall_s"].tolist())


def test_a_packed_seeds_run_lasts_its_share_and_names_its_pack(packed, tmp_path: Path) -> None:
    _, configs, dirs = packed
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepare_store(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = ensure_experiment(client, "s", tmp_path / "artifacts")
    result = layout.trial_status(dirs[0]).result
    assert result is not None
    run = client.get_run(log_trial(client, experiment, dirs[0]))
    duration_s = (run.info.end_time - run.info.start_time) / 1000
    assert duration_s == pytest.approx(result["wall_s"] / 3, abs=0.002)  # not the pack's wall time
    assert run.data.metrics["seed_wall_s"] == pytest.approx(result["wall_s"] / 3)
    tags = run.data.tags
    assert tags["pack_key"] == pack_key(configs) and tags["pack_size"] == "3"
    assert float(tags["pack_wall_s"]) == pytest.approx(result["wall_s"], abs=0.001)
    # its epochs end within its own time
    history = client.get_metric_history(run.info.run_id, "test_acc")
    assert max(m.timestamp for m in history) <= run.info.end_time


def test_a_seed_trained_alone_keeps_its_whole_time_and_names_no_pack(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    trial_dir = tmp_path / "trials" / "t"
    (result,) = run_trials([config(epochs=1)], [trial_dir], sweep="s", run_figures=False)
    assert result["pack_size"] == 1 and result["pack_key"] is None
    assert result["seed_wall_s"] == result["wall_s"]


def test_a_format_1_result_reads_with_its_seed_time_and_no_pack_key(tmp_path: Path) -> None:
    """A result written before the seed's share was recorded: computed from its pack's time and size."""
    store_finished(tmp_path / "t", stored_result(format=1, wall_s=6.0, pack_size=4))
    result = layout.trial_status(tmp_path / "t").result
    assert result is not None
    assert (
        result["format"] == formats.RESULT_FORMAT
        and result["seed_wall_s"] == 1.5
        and result["pack_key"] is None
    )
    unknown = formats.upgrade_result(stored_result(format=1, pack_size=None))
    assert unknown["seed_wall_s"] is None  # not recorded: the run falls back to the pack's time
