"""IMP's paper conventions, each an option off by default: per-kind rates with the output layer at half
the linear rate (Frankle & Carbin 2019), the output layer left whole (OpenLTH), and rewound rounds that
train only the steps after the rewind point (OpenLTH). Hand counts on the tiny crater_cnn."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from trialfactory import config
from typer.testing import CliRunner

from orchestrator.cli import app
from trainers.cgn import CgnMonitor
from trainers.config import ImpScheme, TrialConfig
from trainers.data import load_data
from trainers.events import MemorySink
from trainers.filters import filter_groups
from trainers.loop import train
from trainers.optim import RowAdam
from trainers.schemes import TrainContext, build_scheme

# conv1 2x1x4x4 = 32, conv2 2x2x4x4 = 64, hidden 16x72 = 1152, fc (the output layer) 10x16 = 160.
TINY = {"model__filters": 2, "model__hidden_fc": 16}
SIZES = {"conv1": 32, "conv2": 64, "hidden": 1152, "fc": 160}
# batch 450 on the 1,348 training images: 3 steps per epoch (450, 450, 448 images).
STEPS_PER_EPOCH = 3


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    return load_data(config().data, 0, torch.device("cpu"))


def imp(**scheme) -> dict:
    return {"name": "imp", "rounds": 2, "rate": 0.5} | scheme


def kept_per_round(cfg: TrialConfig, digits) -> tuple[dict[str, list[int]], MemorySink]:
    """Weights kept per layer after each round's pruning (round 0: all), from the checkpoints."""
    sink = MemorySink(keep_checkpoints=True)
    train(cfg, sink, seeds=[3], data=digits)
    kept = {name: [size] for name, size in SIZES.items()}
    for epoch, state in sink.checkpoints:
        if (epoch + 1) % cfg.epochs == 0:  # a round ended: the next round's masks
            for name, mask in zip(SIZES, state["scheme"]["masks"], strict=True):
                kept[name].append(int(mask.sum()))
    return kept, sink


# -- rates per layer -----------------------------------------------------------------------------------


def test_defaults_leave_trial_keys_alone():
    cfg = config(scheme=imp())
    assert set(cfg.identity()["scheme"]) == {"name", "rounds", "rate"}
    assert (
        ImpScheme().output_rate() == ImpScheme().kind_rate("conv") == ImpScheme().kind_rate("linear") == 0.2
    )


def test_conv_and_linear_rates_with_the_output_layer_at_half_the_linear_rate(digits):
    scheme = imp(conv_rate=0.25, linear_rate=0.5, output_layer="half")
    kept, _ = kept_per_round(config(scheme=scheme, epochs=1, **TINY), digits)
    # Each layer drops round(rate * kept) of its kept weights per round, at its own rate:
    # conv 0.25 (32 -> 24 -> 18, 64 -> 48 -> 36), hidden 0.5, output fc 0.5 / 2 = 0.25 (160 -> 120 -> 90).
    assert kept == {
        "conv1": [32, 24, 18],
        "conv2": [64, 48, 36],
        "hidden": [1152, 576, 288],
        "fc": [160, 120, 90],
    }


def test_half_under_global_scope_ranks_the_rest_together_and_the_output_layer_alone(digits):
    kept, _ = kept_per_round(
        config(scheme=imp(scope="global", output_layer="half"), epochs=1, **TINY), digits
    )
    assert kept["fc"] == [160, 120, 90]  # 0.25 of its own kept weights
    body = [sum(kept[name][r] for name in ("conv1", "conv2", "hidden")) for r in range(3)]
    assert body == [1248, 624, 312]  # 0.5 of the 1,248 conv + hidden weights, ranked together


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_an_excluded_output_layer_is_never_pruned(digits, scope):
    cfg = config(scheme=imp(scope=scope, output_layer="exclude"), epochs=1, **TINY)
    kept, sink = kept_per_round(cfg, digits)
    assert kept["fc"] == [160, 160, 160]
    if scope == "layer":
        assert kept["hidden"] == [1152, 576, 288] and kept["conv1"] == [32, 16, 8]
    else:
        assert [kept["conv1"][r] + kept["conv2"][r] + kept["hidden"][r] for r in range(3)] == [1248, 624, 312]
    # The whole output layer trains, and counts as kept in the sparsity.
    fc = sink.checkpoints[-1][1]["model"]["fc.weight"]
    assert bool((fc != 0).all())
    assert sink.epochs[-1].extra["sparsity"] == pytest.approx(1 - (312 + 160) / 1408)


def test_output_layer_needs_a_linear_last_layer():
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    cfg = TrialConfig.model_validate({"epochs": 1, "scheme": imp(output_layer="exclude")})
    scheme = build_scheme(cfg.scheme)
    groups = filter_groups(net)
    ctx = TrainContext(
        cfg,
        net,
        groups,
        RowAdam(list(net.parameters())),
        CgnMonitor(groups, tau=0.0, trace_every=0),
        None,
        [],
        seeds=[0],
    )
    with pytest.raises(
        ValueError, match=r"^scheme.output_layer: the last pruned layer \(2\) is a conv layer"
    ):
        scheme.setup(ctx)


@pytest.mark.parametrize(
    ("fields", "field", "why"),
    [
        ({"scope": "global", "conv_rate": 0.1}, "conv_rate", "scope global ranks all layers"),
        ({"layers": "conv", "linear_rate": 0.1}, "linear_rate", "layers conv prunes no linear layer"),
        ({"layers": "conv", "output_layer": "half"}, "output_layer", "layers conv never prunes the output"),
        ({"output_layer": "quarter"}, "output_layer", "'same', 'half' or 'exclude'"),
        ({"round_steps": "rest"}, "round_steps", "'full' or 'remaining'"),
    ],
)
def test_bad_conventions_are_one_line_naming_the_field(fields, field, why):
    with pytest.raises(ValidationError) as info:
        TrialConfig.model_validate({"scheme": imp(**fields)})
    error = info.value.errors()[0]
    assert error["loc"][-1] == field
    assert why in error["msg"] and "\n" not in error["msg"]


# -- steps per rewound round ---------------------------------------------------------------------------


@pytest.mark.parametrize("round_steps", ["full", "remaining"])
def test_a_rewound_round_trains_t_minus_k_steps_with_round_steps_remaining(digits, round_steps):
    # T = 2 epochs x 3 steps = 6, k = 4: a rewound round skips epoch 0 whole and 1 step of epoch 1.
    cfg = config(scheme=imp(rewind_step=4, round_steps=round_steps), epochs=2, batch_size=450, **TINY)
    sink = MemorySink()
    train(cfg, sink, seeds=[3], data=digits)
    ends = [0] + [r.steps for r in sink.epochs if r.extra["round_end"]]
    trained = [b - a for a, b in zip(ends, ends[1:], strict=False)]  # steps per round
    assert trained == ([6, 2, 2] if round_steps == "remaining" else [6, 6, 6])
    if round_steps == "remaining":
        # The skipped epoch is not recorded; epoch e of every round covers the same steps of round 0's.
        assert [r.epoch for r in sink.epochs] == [0, 1, 3, 5]
        # The partial epoch's train accuracy is over the 898 images it trained on, not all 1,348.
        hits = sink.epochs[2].train_acc * 898
        assert hits == pytest.approx(round(hits), abs=1e-6)
    else:
        assert [r.epoch for r in sink.epochs] == list(range(6))


def test_the_control_trains_the_same_steps_as_the_rewound_path(digits):
    fields = {"rewind_step": 4, "round_steps": "remaining"}
    rewound, control = MemorySink(), MemorySink()
    train(config(scheme=imp(**fields), epochs=2, batch_size=450, **TINY), rewound, seeds=[3], data=digits)
    train(
        config(scheme=imp(reinit=True, **fields), epochs=2, batch_size=450, **TINY),
        control,
        seeds=[3],
        data=digits,
    )
    # phases 0, 1*, 1, 2*: each later phase trains 2 steps in its last epoch only.
    assert [r.epoch for r in control.epochs] == [0, 1, 3, 5, 7]
    assert [r.steps for r in control.epochs] == [3, 6, 8, 10, 12]
    # The control's rewound path is the rewound trial's (same masks, same batches).
    assert control.epochs[3].test_loss == rewound.epochs[2].test_loss


def test_a_rewind_point_at_the_end_of_round_0_leaves_nothing_to_train(digits):
    cfg = config(scheme=imp(rewind_step=6, round_steps="remaining"), epochs=2, batch_size=450, **TINY)
    with pytest.raises(
        ValueError, match=r"^scheme.rewind_step: 6 leaves none of round 0's 6 optimizer steps"
    ):
        train(cfg, MemorySink(), data=digits)


def test_lottery_train_reports_the_rewind_point_in_one_line_and_exits_2(tmp_path):
    args = ["train", "--scheme=imp", "--epochs=1", "--set=scheme.rounds=1", "--set=scheme.rewind_step=22"]
    args += ["--set=scheme.round_steps=remaining", "--set=device=cpu", f"--out={tmp_path}", "--no-mlflow"]
    result = CliRunner().invoke(app, args)  # digits at batch 64: 22 steps per epoch
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: scheme.rewind_step: 22 leaves none of round 0's 22 optimizer steps")
    assert "Traceback" not in result.output
