"""The seed split by source: init (weights), order (batches), augment (augmentation draws), replicate.

Each source must move only its own randomness: the tests train tiny nets and look at what changed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_augment import trial as augmented_trial

import trainers.loop as loop
from orchestrator.errors import UserError
from orchestrator.spec import load_plan
from trainers.augment import crop_flip
from trainers.config import SOURCE_SEEDS, TrialConfig
from trainers.data import load_data
from trainers.events import MemorySink
from trainers.pack import build_pack

CPU = torch.device("cpu")


def trial(**fields: object) -> TrialConfig:
    """tests/test_augment.py's tiny augmented crater_cnn (two steps of 16 per epoch), for 2 epochs."""
    return augmented_trial(**({"epochs": 2} | fields))


@pytest.fixture(scope="module")
def data():
    return load_data(trial().data, 0, CPU)


@pytest.fixture
def seen(monkeypatch):
    """Every training batch the loop makes: (the raw images' sums, the augmentation draws), in order."""
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recorded(x, draws):
        batches.append((x.sum(dim=(1, 2, 3)).clone(), draws.clone()))
        return crop_flip(x, draws)

    monkeypatch.setattr(loop, "crop_flip", recorded)
    return batches


def run(cfg: TrialConfig, data, **kwargs) -> MemorySink:
    sink = MemorySink(keep_checkpoints=True)
    loop.train(cfg, sink, data=data, **kwargs)
    return sink


def test_unsplit_trials_keep_their_keys_and_numbers(data):
    """A trial that splits nothing is the trial of before the split: same key, same stream."""
    assert TrialConfig().trial_key() == "753132226ff9573a"
    plain = trial(data_seed=3)
    assert plain.source_seeds() == {"order_seed": None, "augment_seed": None, "replicate": 0}
    assert plain.config_hash() == plain.pack_hash()
    # data_seed's stream for both order and augmentation, as one order_seed equal to it without augment
    same = run(trial(data_seed=3, data={"name": "synthetic", "synthetic_samples": 40}), data)
    named = run(trial(data_seed=3, order_seed=3, data={"name": "synthetic", "synthetic_samples": 40}), data)
    assert named.results[0].final_test_acc == same.results[0].final_test_acc
    assert [e.train_loss for e in named.epochs] == [e.train_loss for e in same.epochs]


def test_order_seed_changes_the_order_only(data, seen):
    run(trial(order_seed=1, augment_seed=7), data)
    first = list(seen)
    seen.clear()
    run(trial(order_seed=2, augment_seed=7), data)
    # the same augmentation draws at every position, different images in the batches
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, seen, strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, seen, strict=True))
    # and the same initial weights
    before = [build_pack(trial(order_seed=s), [0], data).state_dict() for s in (1, 2)]
    assert all(torch.equal(before[0][k], before[1][k]) for k in before[0])


def test_augment_seed_changes_the_augmentation_only(data, seen):
    run(trial(order_seed=1, augment_seed=7), data)
    first = list(seen)
    seen.clear()
    run(trial(order_seed=1, augment_seed=8), data)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, seen, strict=True))  # same images
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, seen, strict=True))


def test_init_seed_changes_the_weights_not_the_batches(data, seen):
    run(trial(seed=0, order_seed=1, augment_seed=7), data)
    first = list(seen)
    seen.clear()
    run(trial(seed=1, order_seed=1, augment_seed=7), data)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, seen, strict=True))
    weights = [build_pack(trial(seed=s), [s], data).state_dict() for s in (0, 1)]
    assert not all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_replicate_is_a_new_trial_with_the_same_numbers(data):
    a, b = trial(order_seed=1, augment_seed=7), trial(order_seed=1, augment_seed=7, replicate=1)
    assert a.trial_key() != b.trial_key() and a.pair_key() != b.pair_key()
    assert a.config_hash() == b.config_hash()  # one arm
    ra, rb = run(a, data), run(b, data)
    assert ra.results[0].final_test_acc == rb.results[0].final_test_acc  # bit-identical on CPU
    assert [e.train_loss for e in ra.epochs] == [e.train_loss for e in rb.epochs]


def test_identities_an_arm_pools_the_sources_a_pair_shares_them():
    base = trial(order_seed=1, augment_seed=7)
    other_order = base.model_copy(update={"order_seed": 2})
    assert other_order.config_hash() == base.config_hash()  # the same arm
    assert other_order.pack_hash() != base.pack_hash()  # but never one pack: other batches
    assert other_order.pair_key() != base.pair_key()  # and never paired with it
    scheme = TrialConfig.model_validate(base.model_dump(mode="json") | {"scheme": {"name": "batchnorm"}})
    assert scheme.pair_key() == base.pair_key() and scheme.config_hash() != base.config_hash()


def test_split_augmentation_resumes_to_the_same_numbers(data):
    cfg = trial(order_seed=1, augment_seed=7, epochs=3, scheme={"name": "randomout", "tau": 1e-3})
    full = run(cfg, data)
    resumed = MemorySink()
    loop.train(cfg, resumed, data=data, resume=full.checkpoints[0][1])
    assert "augment_gen" in full.checkpoints[0][1]
    assert [e.train_loss for e in resumed.epochs] == [e.train_loss for e in full.epochs[1:]]


def test_pack_of_init_seeds_equals_each_alone_under_split_sources(data):
    cfg = trial(order_seed=4, augment_seed=9)
    packed = run(cfg, data, seeds=[0, 1, 2], pack_size=3)
    alone = [run(cfg.with_seed(s), data).results[0] for s in (0, 1, 2)]
    for p, a in zip(packed.results, alone, strict=True):
        assert p.final_test_acc == pytest.approx(a.final_test_acc, abs=1e-6)
        assert p.final_train_acc == pytest.approx(a.final_train_acc, abs=1e-6)


def test_augment_seed_without_augmentation_is_one_line():
    with pytest.raises(ValueError, match="augment_seed: data.augment is none"):
        trial(augment_seed=1, data={"name": "synthetic"})


# --- the spec form ------------------------------------------------------------------------------------


def spec(tmp_path: Path, seeds: object, **base: object) -> Path:
    doc = {
        "name": "factorial",
        "base": {
            "data": {"name": "synthetic", "synthetic_samples": 40, "augment": "crop_flip"},
            "model": {"name": "crater_cnn", "filters": 2, "hidden_fc": 0},
            "epochs": 1,
            "batch_size": 16,
            "device": "cpu",
        }
        | base,
        "seeds": seeds,
        "schemes": [{"name": "baseline"}, {"name": "batchnorm"}],
        "pack_size": 4,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_seeds_by_source_expand_a_full_factorial(tmp_path):
    plan = load_plan(
        spec(tmp_path, {"init": [0, 1, 2], "order": [10, 11], "augment": [5, 6], "replicates": 2})
    )
    assert len(plan.trials) == 2 * 3 * 2 * 2 * 2  # schemes x init x order x augment x replicates
    cells = {(t.seed, *t.source_seeds().values(), t.scheme.name) for t in plan.trials}
    assert len(cells) == len(plan.trials)  # every combination once
    assert {t.order_seed for t in plan.trials} == {10, 11} and {t.replicate for t in plan.trials} == {0, 1}
    assert len({t.config_hash() for t in plan.trials}) == 2  # one arm per scheme
    for unit in plan.units:  # a pack trains one cell's init seeds: the same batches
        members = [plan.trials[i] for i in unit]
        assert len({m.pack_hash() for m in members}) == 1
    baseline_units = [u for u in plan.units if plan.trials[u[0]].scheme.name == "baseline"]
    assert sorted(len(u) for u in baseline_units) == [3] * 8  # the 3 init seeds of each of 8 cells
    rows = plan.rows()
    assert all(set(SOURCE_SEEDS) <= set(r) for r in rows)


def test_split_seeds_set_data_seed(tmp_path):
    plan = load_plan(spec(tmp_path, {"init": [0], "split": [3, 4]}))
    assert sorted(t.data_seed for t in plan.trials) == [3, 3, 4, 4]
    assert {t.order_seed for t in plan.trials} == {None}


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        ({"order": [1, 2]}, "seeds.init: seeds split by source need init"),
        ({"init": [0], "orders": [1]}, "seeds.orders: not a seed source"),
        ({"init": [0], "order": [1, 1]}, "seed 1 is listed more than once"),
        ({"init": [0], "replicates": 0}, "replicates"),
    ],
)
def test_a_malformed_seed_split_is_one_line(tmp_path, seeds, message):
    with pytest.raises(UserError, match=message) as caught:
        load_plan(spec(tmp_path, seeds))
    assert "\n" not in str(caught.value)


def test_augment_seeds_without_augmentation_are_refused(tmp_path):
    path = spec(tmp_path, {"init": [0], "augment": [1, 2]}, data={"name": "synthetic"})
    with pytest.raises(UserError, match="seeds.augment: schemes\\[0\\] trains with data.augment: none"):
        load_plan(path)


def test_the_trial_cap_counts_the_cells(tmp_path):
    path = spec(tmp_path, {"init": {"start": 0, "count": 50}, "order": {"start": 0, "count": 50}})
    doc = yaml.safe_load(path.read_text()) | {"max_trials": 1000}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match=r"5,000 trials .*50 seeds x 50 seed cells \(50 order seeds\)"):
        load_plan(path)


# --- a sequential study that stops on a variance share's interval ---------------------------------


def sequential_spec(tmp_path: Path, until: object, **seeds: object) -> Path:
    return spec(
        tmp_path,
        {"init": {"start": 0, "max": 6}, "order": [10, 11, 12], "batch": 3, "until": until} | seeds,
    )


def test_a_sequential_factorial_opens_init_seeds_batch_by_batch(tmp_path):
    plan = load_plan(
        sequential_spec(tmp_path, {"variance_share_ci_width": {"source": "order", "width": 0.3}})
    )
    assert plan.spec.sequential is not None and plan.spec.sequential.until.source == "order"
    assert plan.n_batches == 2 and len(plan.trials) == 2 * 6 * 3
    first = plan.trials[: plan.batch_ends[0]]
    assert {t.seed for t in first} == {0, 1, 2} and {t.order_seed for t in first} == {10, 11, 12}
    for unit in plan.units:
        assert len({plan.trials[i].pack_hash() for i in unit}) == 1


@pytest.mark.parametrize(
    ("until", "seeds", "message"),
    [
        ({"variance_share_ci_width": {"source": "augment", "width": 0.3}}, {}, "augment is not split"),
        ({"variance_share_ci_width": {"source": "nondeterminism", "width": 0.3}}, {}, "replicates >= 2"),
        ({"variance_share_ci_width": {"source": "order", "width": 2}}, {}, "less than or equal to 1"),
    ],
)
def test_a_variance_rule_names_what_it_lacks(tmp_path, until, seeds, message):
    with pytest.raises(UserError, match=message) as caught:
        load_plan(sequential_spec(tmp_path, until, **seeds))
    assert "\n" not in str(caught.value)


def test_the_variance_rule_replays_over_the_looks():
    from orchestrator.sequential import replay
    from orchestrator.spec_seeds import Sequential

    rng = np.random.default_rng(0)
    rows = []
    for init in range(12):
        for order in (10, 11, 12, 13):
            acc = 0.5 + 0.1 * (order - 11.5) + 0.01 * rng.standard_normal()  # order decides
            rows.append({"seed": init, "order_seed": order, "final_test_acc": acc})
    trials = pd.DataFrame(rows).assign(
        config_hash="arm", scheme="baseline", hparam_label="", status="finished", test_correct=""
    )
    trials = trials.assign(augment_seed=pd.array([pd.NA] * len(trials), dtype="Int64"), replicate=0)
    seeds = list(range(12))
    loose = Sequential(batch=4, until={"kind": "variance_share_ci_width", "source": "order", "width": 0.5})
    result = replay(loose, seeds, trials)
    assert result.stop_look == 1  # order holds nearly all the variance at once, the interval is narrow
    looks = result.looks
    assert looks["statistic"].iloc[0] == "order_share" and looks["estimate"].iloc[0] > 0.9
    from orchestrator.tables import sequential_statement

    assert "fixed-n" in sequential_statement(looks) and "not anytime-valid" in sequential_statement(looks)
    strict = Sequential(batch=4, until={"kind": "variance_share_ci_width", "source": "order", "width": 1e-9})
    never = replay(strict, seeds, trials)
    assert never.stop_look is None and never.complete_looks == 3
    widths = (never.looks["cs_high"] - never.looks["cs_low"]).tolist()
    assert widths[-1] <= widths[0]  # more init seeds, a narrower interval
