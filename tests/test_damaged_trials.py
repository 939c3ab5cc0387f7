"""Damaged trial files: each kind is written into a real sweep directory, then aggregated.

A damaged trial is counted as `damaged`, named with its file and the problem, and left out of
every statistic: the summary must equal the one of the same sweep without that trial at all
(where `{}` as result.json used to count as a finished, non-failed trial and shift the std).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sweepfactory import lottery_trials, write_sweep
from typer.testing import CliRunner

from orchestrator import layout
from orchestrator.aggregate import aggregate
from orchestrator.cli import app


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 4)


def dangling(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.with_name("gone-" + path.name))


def deleted(path: Path) -> None:
    path.unlink()


def empty_object(path: Path) -> None:
    path.write_text("{}")


def wrong_columns(path: Path) -> None:
    pq.write_table(pa.table({"step": [0, 1]}), path)


def mistyped_result(path: Path) -> None:
    path.write_text(path.read_text().replace('"failed": false', '"failed": "no"'))


DAMAGE: list[tuple[str, Callable[[Path], None], str]] = [
    (layout.RESULT, truncate, "not JSON"),
    (layout.RESULT, empty, "empty"),
    (layout.RESULT, garbage, "not JSON"),
    (layout.RESULT, empty_object, "epochs_done: Field required (and 11 more)"),
    (layout.RESULT, mistyped_result, "failed: Input should be a valid boolean"),
    (layout.RESULT, dangling, "dangling symlink"),
    (layout.METRICS, truncate, "not Parquet"),
    (layout.METRICS, empty, "empty"),
    (layout.METRICS, garbage, "not Parquet"),
    (layout.METRICS, wrong_columns, "no epoch column"),
    (layout.METRICS, dangling, "dangling symlink"),
    (layout.CONFIG, truncate, "not JSON"),
    (layout.CONFIG, deleted, "missing"),  # was a finished trial, never trained again
    (layout.METRICS, deleted, "missing"),
]
IDS = [f"{name.split('.')[0]}-{damage.__name__}" for name, damage, _ in DAMAGE]


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    trials = lottery_trials([("baseline", {}), ("randomout", {"tau": 1e-8})], range(12), rng_seed=3)
    return write_sweep(tmp_path / "runs", "damaged", trials)


def victim(sweep_dir: Path) -> Path:
    """A finished, non-failed baseline trial (the kind `{}` used to impersonate)."""
    for key in layout.planned_keys(sweep_dir):
        status = layout.trial_status(layout.trial_dir(sweep_dir, key))
        if status.finished and status.result["failed"] is False:
            config = layout.read_json(layout.trial_dir(sweep_dir, key) / layout.CONFIG)
            if config["scheme"] == "baseline":
                return layout.trial_dir(sweep_dir, key)
    raise AssertionError("no healthy baseline trial")


@pytest.mark.parametrize(("name", "damage", "problem"), DAMAGE, ids=IDS)
def test_a_damaged_trial_is_named_counted_and_left_out_of_the_statistics(
    sweep: Path, tmp_path: Path, name: str, damage: Callable[[Path], None], problem: str
) -> None:
    trial_dir = victim(sweep)
    # The reference: the same sweep with that trial never run (pending), which is what it is worth now.
    reference_dir = tmp_path / "reference" / "damaged"
    shutil.copytree(sweep, reference_dir)
    shutil.rmtree(reference_dir / layout.TRIALS / trial_dir.name)
    reference = aggregate(reference_dir).summary

    damage(trial_dir / name)
    status = layout.trial_status(trial_dir)
    assert status.damaged and str(trial_dir / name) in status.problem and problem in status.problem
    assert layout.read_result(trial_dir) is None
    counts = layout.count_trials(sweep, layout.planned_keys(sweep))
    assert (counts["damaged"], counts["finished"]) == (1, 23)

    result = aggregate(sweep)
    row = result.trials.set_index("trial_key").loc[trial_dir.name]
    assert row["status"] == "damaged" and problem in row["problem"]
    assert trial_dir.name not in set(result.epochs["trial_key"])
    base = result.summary.set_index("scheme").loc["baseline"]
    expected = reference.set_index("scheme").loc["baseline"]
    assert (base["n"], base["n_damaged"], base["n_planned"]) == (11, 1, 12)
    stats = ["n_failed", "failure_rate", "acc_median", "acc_std", "std_ci_low", "std_ci_high"]
    assert base[stats].tolist() == expected[stats].tolist()
    randomout = result.summary.set_index("scheme").loc["randomout"]
    assert randomout["wilcoxon_p"] == reference.set_index("scheme").loc["randomout", "wilcoxon_p"]


CLI_CASES = [0, 3, 10]  # truncated and `{}` result.json, a dangling metrics.parquet


@pytest.mark.parametrize(
    ("name", "damage", "problem"), [DAMAGE[i] for i in CLI_CASES], ids=[IDS[i] for i in CLI_CASES]
)
def test_lottery_aggregate_names_the_damaged_file_without_a_traceback(
    sweep: Path, name: str, damage: Callable[[Path], None], problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    trial_dir = victim(sweep)
    damage(trial_dir / name)
    monkeypatch.setenv("LOTTERY_HOME", str(sweep.parent))
    done = CliRunner().invoke(app, ["aggregate", "damaged"])
    assert done.exit_code == 0, done.output
    assert "Traceback" not in done.output
    [line] = [line for line in done.output.splitlines() if line.startswith("damaged")]
    assert str(trial_dir / name) in line and problem in line
    assert pd.read_parquet(layout.aggregate_table(sweep, "summary"))["n_damaged"].sum() == 1


def test_a_sound_trial_is_not_damaged(sweep: Path) -> None:
    statuses = [layout.trial_status(layout.trial_dir(sweep, k)) for k in layout.planned_keys(sweep)]
    assert {s.kind for s in statuses} == {"finished"} and not any(s.problem for s in statuses)
    assert os.path.lexists(victim(sweep) / layout.RESULT)


def test_an_errored_trial_without_its_config_is_damaged_and_an_unfinished_one_is_not(sweep: Path) -> None:
    """config.json is what every outcome is reported by; before an outcome it may not exist yet."""
    trial_dir = victim(sweep)
    (trial_dir / layout.RESULT).unlink()
    (trial_dir / layout.ERROR).write_text("RuntimeError: boom")
    assert layout.trial_status(trial_dir).errored
    (trial_dir / layout.CONFIG).unlink()
    status = layout.trial_status(trial_dir)
    assert status.damaged and status.problem == f"{trial_dir / layout.CONFIG}: missing"
    (trial_dir / layout.ERROR).unlink()
    assert layout.trial_status(trial_dir).kind == "unfinished"  # killed before it wrote its config
