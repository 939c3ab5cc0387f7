"""Where the numbers must match the papers by construction: the failure rule on imbalanced data, the
reference's input scale, Adam's state of reborn filters, RePr's masks, drop counts and ortho sums, and
the provenance every result carries."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_data import crater_dir  # noqa: F401 - a fixture
from trialfactory import config

from trainers.cgn import filter_cgn
from trainers.config import DataConfig, TrialConfig
from trainers.data import LoadedData, load_data
from trainers.events import MemorySink
from trainers.filters import filter_groups, zero_optimizer_rows
from trainers.loop import build_pack, train
from trainers.optim import RowAdam
from trainers.progress import Progress
from trainers.ranking import global_drop_masks
from trainers.recordio import iter_records

CPU = torch.device("cpu")


def run(cfg: TrialConfig, data: LoadedData, keep_checkpoints: bool = False) -> MemorySink:
    sink = MemorySink(keep_checkpoints=keep_checkpoints)
    train(cfg, sink, data=data)
    return sink


# --- 1. failure rule: the best constant predictor, not 1/C -------------------------------------------


def blank_inputs(data: LoadedData) -> LoadedData:
    """The same labels with every image zero: a net can only learn the class prior, i.e. it becomes the
    constant predictor of the train split's majority class."""
    return LoadedData(
        x_train=torch.zeros_like(data.x_train),
        y_train=data.y_train,
        x_test=torch.zeros_like(data.x_test),
        y_test=data.y_test,
        x_val=data.x_val,
        y_val=data.y_val,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        variant="blank",
        majority=data.majority,
    )


def imbalanced(n: int, share: float, size: int = 8) -> LoadedData:
    y = (torch.arange(n) % 10 < round(10 * share)).long()  # class 1 is `share` of both splits
    x = torch.zeros(n, 1, size, size)
    half = n // 2
    data = LoadedData(x[:half], y[:half], x[half:], y[half:], x[:0], y[:0], 2, 1, size, "70/30")
    data.majority = float(torch.bincount(y[half:]).max()) / (n - half)
    return data


def constant_predictor_result(data: LoadedData, margin: float = 0.05):
    cfg = config(
        model__filters=2, optim={"name": "sgd", "lr": 0.5}, epochs=3, full_batch=True, failure_margin=margin
    )
    return run(cfg, data).results[0]


def test_a_net_collapsed_to_the_majority_class_fails_on_craters(crater_dir: Path):  # noqa: F811
    craters = load_data(DataConfig(name="craters", data_dir=crater_dir, image_size=15), 0, CPU)
    result = constant_predictor_result(blank_inputs(craters))
    assert result.final_test_acc == pytest.approx(290 / 486)  # all "non-crater"
    assert result.chance == pytest.approx(290 / 486)
    assert result.final_test_acc > 0.5 + 0.05  # the old rule (1/C + margin) called this a success
    assert result.failed
    assert result.failure_rule == (
        "failed if final test accuracy <= majority-class accuracy 0.597 + 0.05 (or the loss diverged)"
    )


def test_a_net_collapsed_to_the_majority_class_fails_on_a_70_30_set():
    result = constant_predictor_result(imbalanced(400, 0.7))
    assert result.final_test_acc == pytest.approx(0.7) and result.chance == pytest.approx(0.7)
    assert result.failed


def test_a_balanced_test_split_keeps_one_over_c():
    result = constant_predictor_result(imbalanced(400, 0.5))
    assert result.chance == 0.5 and result.final_test_acc == 0.5 and result.failed
    assert "majority-class accuracy 0.500 + 0.05" in result.failure_rule


# --- 2. the reference's input scale ------------------------------------------------------------------


def raw_crater_pixels(path: Path) -> torch.Tensor:
    images = []
    for _label, payload in iter_records(path):
        with Image.open(io.BytesIO(payload)) as image:
            images.append(np.asarray(image.convert("L"), dtype=np.float32))
    return torch.from_numpy(np.stack(images))[:, None]


def test_mean_image_inputs_are_raw_pixels_minus_the_train_mean_image(crater_dir: Path):  # noqa: F811
    data = load_data(DataConfig(name="craters", data_dir=crater_dir, normalize="mean_image"), 0, CPU)
    raw_train = raw_crater_pixels(crater_dir / "All-Fold1-train.rec")
    raw_test = raw_crater_pixels(crater_dir / "All-Fold1-test.rec")
    mean_image = raw_train.mean(dim=0, keepdim=True)
    torch.testing.assert_close(data.x_train, raw_train - mean_image, rtol=0, atol=1e-4)
    torch.testing.assert_close(data.x_test, raw_test - mean_image, rtol=0, atol=1e-4)
    assert 5 < data.x_train.std() < 12  # the pixel scale is kept (standardised would be 1)
    assert "mean image subtracted" in data.variant


def test_cgn_at_init_under_mean_image_equals_a_hand_computation_on_raw_pixels(crater_dir: Path):  # noqa: F811
    cfg = config(data={"name": "craters", "data_dir": str(crater_dir), "normalize": "mean_image"})
    data = load_data(cfg.data, 0, CPU)
    model = build_pack(cfg, [cfg.seed], data)
    x, y = data.x_train[:32], data.y_train[:32]
    F.cross_entropy(model(x), y).backward()  # training's mean loss
    ours = [filter_cgn(g, 32) for g in filter_groups(model)]

    raw = raw_crater_pixels(crater_dir / "All-Fold1-train.rec")
    by_hand_input = raw[:32] - raw.mean(dim=0, keepdim=True)
    reference = build_pack(cfg, [cfg.seed], data)
    F.cross_entropy(reference(by_hand_input), y, reduction="sum").backward()  # the reference's sum
    for layer, cgn in zip(reference.filter_layers(), ours, strict=True):
        grad = layer.conv.weight.grad
        by_hand = torch.stack([grad[k].abs().sum() for k in range(grad.shape[0])])
        torch.testing.assert_close(cgn[0], by_hand, rtol=1e-3, atol=0)

    standard = load_data(cfg.data.model_copy(update={"normalize": "standard"}), 0, CPU)
    model = build_pack(cfg, [cfg.seed], standard)
    F.cross_entropy(model(standard.x_train[:32]), y).backward()
    first = filter_cgn(filter_groups(model)[0], 32)
    assert (ours[0] / first).median() > 4  # standardising shrank the first layer's CGN by the pixel std


# --- 3. Adam's state of a reborn filter --------------------------------------------------------------


def test_row_adam_is_torch_adam_until_a_reset():
    torch.manual_seed(0)
    a = torch.randn(6, 2, 3, 3, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    ours, theirs = RowAdam([a], lr=0.01, weight_decay=0.01), torch.optim.Adam([b], lr=0.01, weight_decay=0.01)
    for _ in range(25):
        g = torch.randn(6, 2, 3, 3)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert torch.equal(a, b)


def test_a_reborn_filters_first_update_equals_a_fresh_adam_step():
    cfg = config(epochs=1)
    data = load_data(cfg.data, 0, CPU)
    model = build_pack(cfg, [cfg.seed], data)
    optimizer = RowAdam([p for p in model.parameters() if p.requires_grad], lr=0.003)
    x, y = data.x_train[:64], data.y_train[:64]
    for _ in range(200):  # deep into training: Adam's shared bias correction is ~1 by now
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    group = filter_groups(model)[1]
    reborn = torch.zeros(1, group.filters, dtype=torch.bool)
    reborn[0, 2] = True
    zero_optimizer_rows(optimizer, group, reborn)

    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    before, grad = group.weight.detach().clone(), group.weight.grad.clone()
    optimizer.step()
    update = group.weight.detach() - before

    fresh_row = before[2].clone().requires_grad_(True)
    fresh = torch.optim.Adam([fresh_row], lr=0.003)
    fresh_row.grad = grad[2].clone()
    fresh.step()
    torch.testing.assert_close(update[2], fresh_row.detach() - before[2], rtol=1e-5, atol=1e-9)
    # A shared step count (what torch.optim.Adam does) would move it by about (1 - b1) / sqrt(1 - b2):
    shared = 0.1 / (1 - 0.999**201) ** 0.5 / (0.001 / (1 - 0.999**201)) ** 0.5
    assert shared > 3  # so the check above tells the two apart


def test_resume_equals_uninterrupted_with_per_filter_adam_steps():
    digits = load_data(config().data, 0, CPU)
    scheme = {"name": "randomout", "tau": 1e-2, "reset_optimizer_state": True}
    cfg = config(scheme=scheme, epochs=4, model__filters=6, model__init="uniform0.01")
    full = run(cfg, digits, keep_checkpoints=True)
    assert full.results[0].total_resets > 0
    assert "row_step" in next(iter(full.checkpoints[1][1]["optimizer"]["state"].values()))
    resumed = MemorySink()
    train(cfg, resumed, data=digits, resume=full.checkpoints[1][1])
    assert [e.test_acc for e in resumed.epochs] == [e.test_acc for e in full.epochs[2:]]
    assert resumed.results[0].total_resets == full.results[0].total_resets


# --- 4. RePr: masks in eval mode, drop counts, ortho over live filters ------------------------------


def repr_config(**overrides) -> TrialConfig:
    scheme = {
        "name": "repr",
        "s1": 1,
        "s2": 2,
        "n_iter": 1,
        "drop_fraction": 0.3,
        "include_first_layer": True,
    }
    return config(scheme=scheme, epochs=4, model__filters=6, **overrides)


def test_dropped_filters_output_exactly_zero_in_eval_mode_with_batchnorm():
    digits = load_data(config().data, 0, CPU)
    cfg = repr_config(model__batchnorm=True)
    sink = run(cfg, digits, keep_checkpoints=True)
    epoch, state = sink.checkpoints[1]  # after one epoch of sub-network training
    drop = state["scheme"]["drop"]
    assert drop is not None and any(bool(m.any()) for m in drop)
    model = build_pack(cfg, [cfg.seed], digits)
    model.load_state_dict(state["model"])
    outputs = []
    hooks = [
        g.act.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for g in filter_groups(model)
    ]
    model.eval()
    with torch.no_grad():
        model(digits.x_test)
    for hook in hooks:
        hook.remove()
    for out, mask in zip(outputs, drop, strict=True):
        dropped = out[:, mask[0]]
        assert dropped.numel() == 0 or dropped.abs().max().item() == 0.0
        assert out[:, ~mask[0]].abs().max().item() > 0


def test_drop_fraction_counts_eligible_or_all_filters():
    scores = [torch.rand(32, generator=torch.Generator().manual_seed(i)) for i in range(3)]  # C3(32)
    eligible = [False, True, True]
    by_eligible = global_drop_masks(scores, eligible, 0.3)
    by_all = global_drop_masks(scores, eligible, 0.3, of_all=True)
    assert sum(int(m.sum()) for m in by_eligible) == 19  # round(0.3 * 64)
    assert sum(int(m.sum()) for m in by_all) == 29  # round(0.3 * 96)
    assert not by_all[0].any() and not by_eligible[0].any()  # the first layer is never dropped


def test_drop_fraction_of_all_is_a_scheme_option():
    digits = load_data(config().data, 0, CPU)
    counts = {}
    for of in ("eligible", "all"):
        scheme = {"name": "repr", "s1": 1, "s2": 1, "n_iter": 1, "drop_fraction": 0.3, "drop_fraction_of": of}
        sink = run(config(scheme=scheme, epochs=2, model__filters=10), digits)
        counts[of] = sink.epochs[0].flat()["dropped"]
    assert counts == {"eligible": 3, "all": 6}  # 0.3 x 10 eligible (conv2), 0.3 x 20 all


def test_ortho_sum_is_reported_over_live_filters():
    digits = load_data(config().data, 0, CPU)
    cfg = repr_config()
    sink = run(cfg, digits, keep_checkpoints=True)
    _epoch, state = sink.checkpoints[0]  # end of epoch 0: filters just dropped
    drop = state["scheme"]["drop"]
    for layer, mask in zip(sink.epochs[0].layers, drop, strict=True):
        weight = state["model"][f"{layer.layer}.conv.weight"]
        live = F.normalize(weight.flatten(1)[~mask[0]].double(), dim=1)
        overlap = (live @ live.T - torch.eye(len(live), dtype=torch.float64)).abs()
        by_hand = float((overlap.sum(dim=1) / len(live)).sum())
        assert layer.ortho_sum == pytest.approx(by_hand, rel=1e-5)
        assert layer.dropped == int(mask.sum()) > 0


# --- 9.3 one tau; 9.4 per-seed records; 8.7 provenance ------------------------------------------------


def test_one_tau_per_trial():
    routed = TrialConfig.model_validate({"tau": 1e-6, "scheme": "randomout"})
    assert routed.scheme.tau == 1e-6 and routed.count_tau == 1e-6
    assert (
        routed.trial_key()
        == TrialConfig.model_validate({"scheme": {"name": "randomout", "tau": 1e-6}}).trial_key()
    )
    assert TrialConfig.model_validate({"tau": 1e-6, "scheme": "baseline"}).count_tau == 1e-6
    with pytest.raises(ValueError, match="tau: given twice"):
        TrialConfig.model_validate({"tau": 1e-6, "scheme": {"name": "randomout", "tau": 1e-5}})


def test_progress_checkpoints_of_the_parallel_list_format_still_load():
    old = {
        "seeds": [3, 4],
        "epoch": 2,
        "steps": 40,
        "wall_s": 1.5,
        "epochs_done": [2, 1],
        "best_test_acc": [0.9, 0.2],
        "total_resets": [5, 0],
        "last": [(0.95, 0.9, 0.3), (0.1, 0.1, float("nan"))],
        "diverged": [False, True],
    }
    progress = Progress.from_state(old)
    assert progress.seed_list() == [3, 4] and progress.seeds[1].diverged and progress.seeds[0].test_acc == 0.9
    assert Progress.from_state(progress.state()) == progress


def test_results_record_device_threads_and_pack_size():
    digits = load_data(config().data, 0, CPU)
    sink = MemorySink()
    train(config(epochs=1), sink, data=digits, seeds=[1, 2], pack_size=2)
    for result in sink.results:
        assert (result.device, result.threads, result.pack_size) == ("cpu", torch.get_num_threads(), 2)


@pytest.mark.parametrize(
    "scheme",
    [
        "baseline",
        "batchnorm",
        {"name": "randomout", "tau": 1e-12},
        {"name": "randomout"},
        {"name": "repr", "s1": 1, "s2": 1, "n_iter": 1},
    ],
)
def test_a_saved_config_loads_back_as_itself(scheme):
    """What the sweep stores (model_dump) is what every trial loads: it must round-trip for every scheme."""
    cfg = config(scheme=scheme, epochs=3, tau=1e-6 if scheme == "baseline" else 1e-8)
    again = TrialConfig.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg and again.trial_key() == cfg.trial_key() and again.count_tau == cfg.count_tau
