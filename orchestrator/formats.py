"""On-disk format versions of result.json and sweep.json, and the one reader that brings an older file
up to the current shape.

A file states its version in `format` (a file without one is version 0: everything written before the
field existed). Every read goes through `upgrade_result` or `upgrade_record`, which apply one small step
per version in turn, so the rest of the code reads one shape only: a field added later is present, with
the value that means "not recorded", instead of each reader guessing what an old file may lack. A file
from a newer filter-lottery (a higher version) is read as it is.

Version 1 (result.json):
- `ended_at` (when the result was written): None when not recorded; the run's end is then the file's
  modification time (orchestrator/tracking/runs.py).
- `sparsity`, `pack_size`, `threads`: None when not recorded (no MLflow metric or tag, NaN in the table).
- `data_fingerprint` "" and `data_files` {} when not recorded: what generated data records, so a stored
  result from before fingerprints differs from any file-backed data (orchestrator/run/trial.py).
- `device` is left absent: a result without it was trained by an earlier trainer whose numbers mean
  something else, and resuming over it is refused (`check_device_provenance`, orchestrator/run/sweep.py).
- Fields that every result has held since the failure rule (`chance`, `failure_margin`, `failure_rule`,
  ...) are not filled: a result without them is damaged (`layout.ResultSchema`).

Version 2 (result.json):
- `seed_wall_s` (the seed's share of its pack's time, `wall_s / pack_size`): computed from the two when
  `pack_size` was recorded, else None (not recorded).
- `pack_key` (the `packs/<pack_key>/` directory of the pack the seed trained in): None when it trained
  alone or was not recorded.

Version 3 (result.json):
- `test_correct` (the final model's per-example correctness on the test split, trainers/correctness.py):
  "" (not recorded).

Version 1 (sweep.json): `sweep_dir` (the directory it was written for) None when not recorded, so a
copied directory cannot be told apart and is logged as its own.

This module imports nothing of the project, so layout.py and the tracking record read through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

FORMAT = "format"  # the key that holds a file's version

Upgrade = Callable[[dict[str, Any]], dict[str, Any]]


class FormatError(ValueError):
    """A file whose `format` is not a version number; the message names the value."""


def _result_0_to_1(doc: dict[str, Any]) -> dict[str, Any]:
    not_recorded = {"ended_at": None, "sparsity": None, "pack_size": None, "threads": None}
    return not_recorded | {"data_fingerprint": "", "data_files": {}} | doc


def _result_1_to_2(doc: dict[str, Any]) -> dict[str, Any]:
    wall, size = doc.get("wall_s"), doc.get("pack_size")
    known = isinstance(wall, int | float) and isinstance(size, int) and size >= 1
    return {"seed_wall_s": wall / size if known else None, "pack_key": None} | doc


def _result_2_to_3(doc: dict[str, Any]) -> dict[str, Any]:
    return {"test_correct": ""} | doc


def _record_0_to_1(doc: dict[str, Any]) -> dict[str, Any]:
    return {"sweep_dir": None} | doc


# One step per version, keyed by the version it upgrades from; the current version follows from them.
RESULT_UPGRADES: dict[int, Upgrade] = {0: _result_0_to_1, 1: _result_1_to_2, 2: _result_2_to_3}
RECORD_UPGRADES: dict[int, Upgrade] = {0: _record_0_to_1}
RESULT_FORMAT = len(RESULT_UPGRADES)
RECORD_FORMAT = len(RECORD_UPGRADES)


def version(doc: dict[str, Any]) -> int:
    """The version a document states (0 when it states none)."""
    value = doc.get(FORMAT, 0)
    if type(value) is not int or value < 0:  # a bool is not a version
        raise FormatError(f"{FORMAT}: {value!r} is not a version number (a whole number from 0)")
    return value


def _upgrade(doc: dict[str, Any], steps: dict[int, Upgrade]) -> dict[str, Any]:
    """`doc` brought up to the current version, one step at a time (a new dict; `doc` is left alone)."""
    start = version(doc)
    for old in range(start, len(steps)):
        doc = steps[old](doc) | {FORMAT: old + 1}
    return dict(doc)


def upgrade_result(doc: dict[str, Any]) -> dict[str, Any]:
    """A result.json document in the current shape (see the module docstring for what each step fills)."""
    return _upgrade(doc, RESULT_UPGRADES)


def upgrade_record(doc: dict[str, Any]) -> dict[str, Any]:
    """A sweep.json document in the current shape."""
    return _upgrade(doc, RECORD_UPGRADES)
