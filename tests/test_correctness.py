"""Per-example correctness on the test split, and the test-set floor computed from it."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from sweepfactory import lottery_trials, write_sweep
from trialfactory import config

from dashboards.decision import decide
from orchestrator.aggregate import aggregate
from trainers.correctness import decode, encode, finite_test_set_sd
from trainers.data import load_data
from trainers.events import MemorySink
from trainers.loop import train


def test_bits_round_trip_and_stay_small() -> None:
    hits = np.random.default_rng(0).random(10_001) < 0.8
    text = encode(hits)
    assert text.startswith("10001:") and len(text) < 10_001 / 8 * 1.4
    assert np.array_equal(decode(text), hits)
    assert decode("") is None


def test_the_floor_by_hand() -> None:
    # Two seeds on 4 examples: p = 1, 1/2, 1/2, 0 -> sum p(1-p) = 1/2 -> sqrt(1/2) / 4 = 0.1768.
    rows = [np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)]
    assert finite_test_set_sd(rows) == pytest.approx(math.sqrt(0.5) / 4)
    assert math.isnan(finite_test_set_sd(rows[:1]))


def test_the_floor_matches_the_spread_of_independent_per_example_draws() -> None:
    # Known truth: each seed gets example i right with probability q_i, independently. The accuracy's SD
    # over seeds is then sqrt(sum q_i (1 - q_i)) / n, and the floor estimates it from the seeds alone.
    rng = np.random.default_rng(1)
    q = rng.beta(4, 1, size=2000)
    seeds = rng.random((400, q.size)) < q
    truth = math.sqrt((q * (1 - q)).sum()) / q.size
    assert finite_test_set_sd(list(seeds)) == pytest.approx(truth, rel=0.03)
    assert seeds.mean(axis=1).std(ddof=1) == pytest.approx(truth, rel=0.1)


@pytest.fixture(scope="module")
def digits():
    return load_data(config().data, 0, torch.device("cpu"))


@pytest.mark.slow
def test_a_trial_records_which_test_examples_it_gets_right_packed_or_alone(digits) -> None:
    cfg = config(epochs=2)
    packed = train(cfg, MemorySink(), seeds=[1, 2, 3], pack_size=3, data=digits)
    alone = [train(cfg, MemorySink(), seeds=[s], data=digits)[0] for s in (1, 2, 3)]
    for p, a in zip(packed, alone, strict=True):
        bits = decode(p.test_correct)
        assert bits is not None and bits.size == len(digits.y_test)
        assert bits.mean() == pytest.approx(p.final_test_acc)  # the same final model as the accuracy
        assert p.test_correct == a.test_correct  # a pack's seed is the seed alone, example by example
    assert packed[0].test_correct != packed[1].test_correct


def test_aggregate_reads_the_bits_and_states_the_floor(tmp_path) -> None:
    arms = [("baseline", {})]
    sweep = write_sweep(tmp_path, "floor", lottery_trials(arms, seeds=range(6)))
    rng = np.random.default_rng(2)
    rows = [rng.random(300) < 0.7 for _ in range(6)]
    for trial_dir, bits in zip(sorted((sweep / "trials").iterdir()), rows, strict=True):
        result = json.loads((trial_dir / "result.json").read_text())
        (trial_dir / "result.json").write_text(json.dumps(result | {"test_correct": encode(bits)}))
    tables = aggregate(sweep)
    assert tables.trials["test_correct"].str.startswith("300:").all()
    row = decide(tables.trials).iloc[0]
    assert row["test_floor_n"] == 6 and row["test_floor_sd"] == pytest.approx(finite_test_set_sd(rows))
    # A result written before the field: read as not recorded, the floor is NaN and says from 0 seeds.
    old = tables.trials.assign(test_correct=pd.Series([""] * 6, dtype="string"))
    assert math.isnan(decide(old).iloc[0]["test_floor_sd"]) and decide(old).iloc[0]["test_floor_n"] == 0
