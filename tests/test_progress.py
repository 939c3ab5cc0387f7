"""The live progress line counts trials (seeds), not Tune trials: a seed pack weighs its size."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

from ray.tune.experiment import Trial

from orchestrator.run.progress import Counts, ProgressCallback


def _unit(index: int, status: str, result: dict | None = None) -> SimpleNamespace:
    """What Counts reads of a Tune trial: its status, its unit index and its last result."""
    return SimpleNamespace(status=status, config={"unit": index}, last_result=result or {})


def test_counts_are_of_seeds_in_packs() -> None:
    sizes = [4, 4, 1, 2, 3]  # 14 seeds in 5 Tune trials
    trials = [
        # a pack of 4 done, 3 of its seeds lottery-failed (the unit's `failed` is their mean, 0.75)
        _unit(
            0, Trial.TERMINATED, {"epochs_done": 3, "seeds_finished": 4, "seeds_failed": 3, "failed": 0.75}
        ),
        _unit(1, Trial.RUNNING, {"epoch": 1}),
        _unit(2, Trial.TERMINATED, {"epochs_done": 3, "seeds_finished": 1, "seeds_failed": 1, "failed": 1.0}),
        _unit(3, Trial.ERROR),
        _unit(4, Trial.TERMINATED, {"epoch": 0}),  # stopped by an interrupt: not done
    ]
    c = Counts.of(trials, sizes)
    assert (c.total, c.done, c.running, c.failed, c.errored, c.pending) == (14, 5, 4, 4, 2, 3)


def test_the_line_says_trials_and_survives_a_restore() -> None:
    callback = pickle.loads(pickle.dumps(ProgressCallback("demo", [4, 4, 1])))
    callback._update([_unit(0, Trial.TERMINATED, {"epochs_done": 2, "seeds_finished": 4, "seeds_failed": 2})])
    text = callback.line().plain
    assert text.startswith("sweep demo: 4/9 done · 0 running · 5 pending · 2 failed · 0 errored")
