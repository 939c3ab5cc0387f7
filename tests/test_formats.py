"""On-disk format versions: new files state theirs, older files read through one upgrade into the
current shape, and every reader sees that shape (orchestrator/formats.py)."""

from __future__ import annotations

import math
import os

import pytest
from trialfactory import store_finished, stored_result

from orchestrator import formats, layout
from orchestrator.aggregate import load_trials
from orchestrator.tracking.record import SweepRecord
from trainers.events import TrialResult


def _trial_result() -> TrialResult:
    keys = ("epochs_done", "total_resets", "reinit_fallbacks", "failed", "diverged")
    return TrialResult(
        seed=0,
        final_test_acc=0.9,
        final_train_acc=0.9,
        best_test_acc=0.9,
        final_test_loss=0.1,
        chance=0.5,
        failure_margin=0.05,
        wall_s=1.0,
        **{k: v for k, v in stored_result().items() if k in keys},
    )


def test_a_new_result_states_the_version_the_reader_upgrades_to():
    assert _trial_result().to_dict()["format"] == formats.RESULT_FORMAT == 3


def test_a_result_from_before_the_format_reads_as_current_with_what_it_lacks_not_recorded(tmp_path):
    old = stored_result()  # no format, no device, sparsity, ended_at, pack_size, threads, fingerprint
    store_finished(tmp_path / "t", old)
    status = layout.trial_status(tmp_path / "t")
    assert status.finished
    assert status.result == old | {
        "format": 3,
        "ended_at": None,
        "sparsity": None,
        "pack_size": None,
        "threads": None,
        "data_fingerprint": "",
        "data_files": {},
        "seed_wall_s": None,  # its pack size was not recorded: its share of the pack's time is unknown
        "pack_key": None,
        "test_correct": "",  # which test examples it got right: not recorded
    }
    assert "device" not in status.result  # the mark of an earlier trainer, refused on resume
    assert layout.read_json(tmp_path / "t" / layout.RESULT) == old  # reading never rewrites the file


def test_an_old_result_keeps_what_it_recorded_and_a_current_one_reads_unchanged(tmp_path):
    old = stored_result(sparsity=0.25, device="cpu", threads=2)
    assert formats.upgrade_result(old)["sparsity"] == 0.25
    assert formats.upgrade_result(old)["threads"] == 2
    current = formats.upgrade_result(old)
    assert formats.upgrade_result(current) == current
    # from a newer filter-lottery: read as it is
    newer = stored_result(format=formats.RESULT_FORMAT + 1, added_later=True)
    assert formats.upgrade_result(newer) == newer


@pytest.mark.parametrize("value", ["1", True, -1, 1.0, None])
def test_a_result_whose_format_is_not_a_version_is_damaged_and_named(tmp_path, value):
    store_finished(tmp_path / "t", stored_result(format=value))
    status = layout.trial_status(tmp_path / "t")
    assert status.damaged
    assert "result.json: format: " in (status.problem or "")


def test_an_old_result_aggregates_as_before(tmp_path):
    """sparsity not recorded: NaN in the trial table, as when the key was simply absent."""
    from sweepfactory import FakeTrial, write_sweep

    sweep = write_sweep(tmp_path, "s", [FakeTrial("baseline", 0, 0.9), FakeTrial("baseline", 1, 0.8)])
    old, current = sorted((sweep / "trials").iterdir())
    assert "format" not in layout.read_json(old / layout.RESULT)
    doc = layout.read_json(current / layout.RESULT)
    # a version-1 file as the trainer wrote one: it has every field that version has (pack_size too)
    layout.atomic_write_json(current / layout.RESULT, doc | {"format": 1, "sparsity": 0.5, "pack_size": 1})
    rows = load_trials(sweep).set_index("trial_key")
    assert list(rows["status"]) == ["finished", "finished"]
    assert math.isnan(rows.loc[old.name, "sparsity"]) and rows.loc[current.name, "sparsity"] == 0.5
    assert sorted(rows["final_test_acc"]) == pytest.approx([0.8, 0.9])


def test_run_times_of_a_result_without_ended_at_end_at_the_files_time(tmp_path):
    from orchestrator.tracking.runs import result_end_ms, run_times

    store_finished(tmp_path / "t", stored_result(wall_s=2.0))
    os.utime(tmp_path / "t" / layout.RESULT, (1000.0, 1000.0))
    result = layout.trial_status(tmp_path / "t").result
    assert result is not None
    assert run_times(tmp_path / "t", result) == (998_000, 1_000_000)
    assert result_end_ms(tmp_path / "t", result | {"ended_at": 500.0}) == 500_000


def test_sweep_json_states_its_version_and_an_old_one_reads_without_sweep_dir(tmp_path):
    record = SweepRecord("s", "sqlite:///x.db", "1", "abc", str(tmp_path.resolve()))
    record.save(tmp_path)
    assert layout.read_json(layout.record_file(tmp_path))["format"] == formats.RECORD_FORMAT == 1
    assert SweepRecord.load(tmp_path) == record
    old = {"name": "s", "tracking_uri": "sqlite:///x.db", "experiment_id": "1", "parent_run_id": "abc"}
    layout.atomic_write_json(layout.record_file(tmp_path), old)
    loaded = SweepRecord.load(tmp_path)
    assert loaded == SweepRecord(**old) and loaded.sweep_dir is None
    assert loaded.written_elsewhere(tmp_path / "elsewhere") is None  # not recorded: cannot tell a copy


def test_each_upgrade_step_is_keyed_by_the_version_it_upgrades_from():
    for steps in (formats.RESULT_UPGRADES, formats.RECORD_UPGRADES):
        assert sorted(steps) == list(range(len(steps)))
