"""Which failures repeat (no retry after them), and the line a sweep with errored trials ends on."""

from __future__ import annotations

from sweepfactory import FakeTrial, write_sweep

from orchestrator import layout
from orchestrator.errors import ERRORED_EXIT
from orchestrator.run.errored import errored_line, last_line
from orchestrator.run.repeats import last_failure, record_failure

TRACEBACK = """Traceback (most recent call last):
  File "/x/trainable.py", line 170, in run_planned_trial
    results = run_trials(
ValueError: bad value in <Tensor object at {address}>
"""


def test_only_the_same_error_at_the_same_epoch_is_a_repeat(tmp_path):
    unit = tmp_path / "unit"
    assert last_failure(unit) is None
    assert not record_failure(unit, None, TRACEBACK.format(address="0x7f01"), 3)  # a first failure
    first = last_failure(unit)
    assert first is not None and first["epoch"] == 3
    assert first["line"] == "ValueError: bad value in <Tensor object at 0x7f01>"
    # Another process puts the same object elsewhere in memory: still the same error.
    assert record_failure(unit, first, TRACEBACK.format(address="0x55aa"), 3)
    assert not record_failure(unit, first, TRACEBACK.format(address="0x7f01"), 4)  # an epoch went by
    assert not record_failure(unit, first, TRACEBACK.replace("bad value", "other value"), 3)
    (unit / layout.FAILURE).write_text("{not json")  # a torn record never stops a retry
    assert last_failure(unit) is None


def test_the_errored_line_names_the_count_the_first_error_in_plan_order_and_its_file(tmp_path):
    trials = [
        FakeTrial("baseline", 0, 0.9),
        FakeTrial("baseline", 1, 0.9, status="errored"),
        FakeTrial("baseline", 2, 0.9, status="errored"),
    ]
    sweep_dir = write_sweep(tmp_path, "s", trials)
    keys = layout.planned_keys(sweep_dir)
    error = sweep_dir / "trials" / keys[1] / "error.txt"
    assert errored_line(sweep_dir, keys, 2) == (
        f"ended with 2 errored trial(s) (exit {ERRORED_EXIT}); first error: {keys[1]}: "
        f"RuntimeError: synthetic failure; see {error}"
    )
    assert errored_line(sweep_dir, keys[::-1], 2).startswith(
        f"ended with 2 errored trial(s) (exit 4); first error: {keys[2]}: "
    )


def test_last_line_is_one_short_line():
    assert last_line("Traceback ...\n  File x\nKeyError:   'a'\n\n") == "KeyError: 'a'"
    assert last_line("") == "an error"
    assert last_line("E: " + "x" * 400).endswith("...") and len(last_line("E: " + "x" * 400)) == 303
