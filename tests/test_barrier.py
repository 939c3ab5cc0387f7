"""The kill tests' barrier (LOTTERY_HOLD, orchestrator/run/trainable.py) as tests/barrier.py drives it:
which trials hold, that a held one waits until released, and nothing else. No Ray: the hold itself."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from barrier import Barrier

from orchestrator.run.trainable import HOLD_ENV, _hold


def held(barrier: Barrier, epoch: int, keys: list[str]) -> threading.Thread:
    thread = threading.Thread(target=_hold, args=(barrier.env()[HOLD_ENV], epoch, keys), daemon=True)
    thread.start()
    return thread


def test_a_trial_holds_after_its_epoch_until_released_and_says_so(tmp_path: Path) -> None:
    barrier = Barrier(tmp_path / "barrier", epoch=1)
    thread = held(barrier, 1, ["a", "b"])  # a pack of two seeds: both are announced
    deadline = time.monotonic() + 10
    while barrier.reached() != {"a", "b"} and time.monotonic() < deadline:
        time.sleep(0.01)
    assert barrier.reached() == {"a", "b"}
    thread.join(0.3)
    assert thread.is_alive()  # still waiting
    barrier.release()
    thread.join(5)
    assert not thread.is_alive()


def test_other_epochs_and_trials_not_listed_run_through(tmp_path: Path) -> None:
    barrier = Barrier(tmp_path / "barrier", epoch=1, only=["held"])
    for epoch, keys in ((0, ["held"]), (2, ["held"]), (1, ["free"])):
        thread = held(barrier, epoch, keys)
        thread.join(5)
        assert not thread.is_alive(), (epoch, keys)
    assert barrier.reached() == set()
    thread = held(barrier, 1, ["free", "held"])  # a pack holds if any of its seeds is listed
    thread.join(0.3)
    assert thread.is_alive() and barrier.reached() == {"free", "held"}
    barrier.release()
    thread.join(5)
    assert not thread.is_alive()
