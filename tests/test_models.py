"""The models' structure, sizes and deterministic initialization."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn

from trainers.config import ModelConfig, TrialConfig
from trainers.events import MemorySink
from trainers.loop import can_pack, train
from trainers.models import BasicBlock, FilterNet, build_model, draw_conv_weight
from trainers.pack import PACKABLE


def build(
    name: str,
    *,
    seed: int = 0,
    in_channels: int = 3,
    image_size: int = 28,
    num_classes: int = 10,
    batchnorm: bool = False,
    **fields: object,
) -> FilterNet:
    return build_model(
        ModelConfig(name=name, **fields),
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        batchnorm=batchnorm,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.fixture(scope="module")
def inception() -> FilterNet:
    return build("inception28")


def test_inception28_size(inception: FilterNet) -> None:
    layers = inception.filter_layers()
    assert len(layers) == 19
    assert sum(layer.conv.out_channels for layer in layers) == 1712
    assert sum(layer.conv.weight.numel() for layer in layers) == 1_644_320
    assert sum(layer.conv.bias.numel() for layer in layers) == 1712
    assert sum(p.numel() for p in inception.fc.parameters()) == 3370
    names = [layer.name for layer in layers]
    assert names[:6] == ["conv1", "in3a.1x1", "in3a.3x3", "in3b.1x1", "in3b.3x3", "in3c.3x3s2"]
    assert names[-1] == "in5b.3x3" and "in4e.3x3s2" in names


@pytest.mark.parametrize(
    ("size", "after_in3c", "after_in4e"), [(28, 14, 7), (32, 16, 8), (15, 8, 4), (8, 4, 2)]
)
def test_inception28_downsampling(inception: FilterNet, size: int, after_in3c: int, after_in4e: int) -> None:
    x = torch.randn(2, 3, size, size)
    stages = {}
    for name, module in inception.named_children():
        x = module(x)
        stages[name] = x.shape
    assert stages["in3c"] == (2, 160, after_in3c, after_in3c)
    assert stages["in4e"] == (2, 240, after_in4e, after_in4e)
    assert stages["in5b"][1] == 336 and x.shape == (2, 10)


@pytest.mark.parametrize("size", [28, 14, 32, 16])
def test_downsample_pool_is_mxnet_ceil_pooling_on_even_sizes(inception: FilterNet, size: int) -> None:
    x = torch.randn(2, 80, size, size)
    assert torch.equal(inception.in3c["pool"](x), nn.MaxPool2d(3, 2, ceil_mode=True)(x))


@pytest.mark.parametrize(
    ("size", "padding", "hidden_fc", "flat"),
    [(15, 1, 500, 13), (15, 0, 500, 9), (28, 1, 0, 26), (28, 0, 500, 22)],
)
def test_crater_cnn_shapes(size: int, padding: int, hidden_fc: int, flat: int) -> None:
    model = build(
        "crater_cnn", in_channels=1, image_size=size, num_classes=2, padding=padding, hidden_fc=hidden_fc
    )
    assert model(torch.randn(3, 1, size, size)).shape == (3, 2)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert linears[0].in_features == 20 * flat * flat
    assert len(linears) == (2 if hidden_fc else 1)
    assert [layer.name for layer in model.filter_layers()] == ["conv1", "conv2"]
    assert all(layer.conv.kernel_size == (4, 4) for layer in model.filter_layers())


def test_crater_cnn_too_small_input() -> None:
    with pytest.raises(ValueError, match="model.padding"):
        build("crater_cnn", in_channels=1, image_size=5, padding=0)


def test_vanilla_cnn() -> None:
    model = build("vanilla_cnn", image_size=32, filters=32, depth=3, batchnorm=True)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    layers = model.filter_layers()
    assert [layer.name for layer in layers] == ["conv1", "conv2", "conv3"]
    assert sum(layer.conv.out_channels for layer in layers) == 96
    assert model.fc.in_features == 32 * 32 * 32


@pytest.mark.parametrize("name", ["crater_cnn", "inception28", "vanilla_cnn", "resnet20"])
@pytest.mark.parametrize("init", ["uniform0.01", "xavier", "kaiming"])
def test_same_seed_same_weights_and_global_rng_untouched(name: str, init: str) -> None:
    state = torch.get_rng_state()
    a, b, c = (build(name, seed=seed, init=init, batchnorm=True).state_dict() for seed in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), state)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    weights = [key for key in a if key.endswith("weight") and ".bn." not in key]
    assert all(not torch.equal(a[key], c[key]) for key in weights)


def test_uniform_init_range_and_zero_biases(inception: FilterNet) -> None:
    for name, param in inception.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, name
        else:
            assert param.abs().max() <= 0.01 and param.abs().max() > 0.009, name


def test_xavier_and_kaiming_scales() -> None:
    conv = build("vanilla_cnn", filters=64, init="xavier").conv2.conv.weight  # fan_in = fan_out = 576
    assert conv.abs().max() <= math.sqrt(6 / 1152) and conv.abs().max() > 0.9 * math.sqrt(6 / 1152)
    conv = build("vanilla_cnn", filters=64, init="kaiming").conv2.conv.weight
    assert conv.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.05)


def test_batchnorm_follows_every_conv_with_gamma_frozen() -> None:
    model = build("inception28", batchnorm=True)
    layers = model.filter_layers()
    assert all(layer.bn is not None for layer in layers)
    for layer in layers:
        bn = layer.bn
        assert bn.num_features == layer.conv.out_channels and bn.eps == 1e-3 and bn.momentum == 0.1
        assert not bn.weight.requires_grad and torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert bn.bias.requires_grad and torch.count_nonzero(bn.bias) == 0
        assert torch.count_nonzero(bn.running_mean) == 0 and torch.equal(
            bn.running_var, torch.ones_like(bn.running_var)
        )
    assert all(layer.bn is None for layer in build("crater_cnn", in_channels=1).filter_layers())


@pytest.mark.parametrize("batchnorm", [False, True])
def test_hooks_on_act_see_each_layer_once_in_forward_order(inception: FilterNet, batchnorm: bool) -> None:
    model = build("inception28", batchnorm=batchnorm) if batchnorm else inception
    layers = model.filter_layers()
    assert len({id(layer.act) for layer in layers}) == len(layers)
    assert all(isinstance(layer.act, nn.ReLU) for layer in layers)
    seen: list[tuple[str, int]] = []
    handles = [
        layer.act.register_forward_hook(
            lambda _m, _i, out, name=layer.name: seen.append((name, out.shape[1]))
        )
        for layer in layers
    ]
    model(torch.randn(2, 3, 28, 28))
    for handle in handles:
        handle.remove()
    assert seen == [(layer.name, layer.conv.out_channels) for layer in layers]


@pytest.mark.parametrize("init", ["uniform0.01", "xavier", "kaiming"])
def test_draw_conv_weight(inception: FilterNet, init: str) -> None:
    conv = inception.filter_layers()[5].conv
    fresh = draw_conv_weight(conv, init, torch.Generator().manual_seed(3))
    assert (
        fresh.shape == conv.weight.shape
        and fresh.dtype == conv.weight.dtype
        and fresh.device == conv.weight.device
    )
    assert not fresh.requires_grad and not torch.equal(fresh, conv.weight)
    assert torch.equal(fresh, draw_conv_weight(conv, init, torch.Generator().manual_seed(3)))
    if init == "uniform0.01":
        assert fresh.abs().max() <= 0.01


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match=r"model\.name: unknown model 'resnet'.*crater_cnn"):
        build_model(
            ModelConfig.model_construct(name="resnet", init="uniform0.01"),
            in_channels=1,
            image_size=28,
            num_classes=2,
            batchnorm=False,
            generator=torch.Generator(),
        )
    conv = nn.Conv2d(1, 2, 3)
    with pytest.raises(ValueError, match=r"model\.init: unknown initializer 'ones'"):
        draw_conv_weight(conv, "ones", torch.Generator())


# --- ResNet-20 -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet() -> FilterNet:
    return build("resnet20", image_size=32, init="kaiming")


def test_resnet20_conv_and_filter_counts(resnet: FilterNet) -> None:
    layers = resnet.filter_layers()
    kernels = Counter(layer.conv.kernel_size for layer in layers)
    assert len(layers) == 21 and kernels == {(3, 3): 19, (1, 1): 2}
    # stem 16 + 6 convs per stage of 16, 32, 64 + the two projection shortcuts (32 and 64)
    assert sum(layer.conv.out_channels for layer in layers) == 16 + 6 * 16 + 6 * 32 + 6 * 64 + 32 + 64 == 784
    shortcuts = [layer for layer in layers if layer.conv.kernel_size == (1, 1)]
    assert [layer.name for layer in shortcuts] == ["stage2.block1.shortcut", "stage3.block1.shortcut"]
    assert all(layer.conv.stride == (2, 2) for layer in shortcuts)
    assert [layer.name for layer in layers][:3] == ["conv1", "stage1.block1.conv1", "stage1.block1.conv2"]


def test_resnet20_parameter_count(resnet: FilterNet) -> None:
    """He et al. 0.27M; RePr Table 3 269k excluding the last FC, which is option A (no shortcut convs)."""
    layers = resnet.filter_layers()
    conv3x3 = sum(layer.conv.weight.numel() for layer in layers if layer.conv.kernel_size == (3, 3))
    conv1x1 = sum(layer.conv.weight.numel() for layer in layers if layer.conv.kernel_size == (1, 1))
    assert (conv3x3, conv1x1) == (267_696, 16 * 32 + 32 * 64)
    assert all(layer.conv.bias is None and layer.bn is not None for layer in layers)
    total = sum(p.numel() for p in resnet.parameters())
    fc = sum(p.numel() for p in resnet.fc.parameters())
    bn = 2 * 784  # gamma (fixed at 1, not trained) and beta per filter
    assert (total, fc) == (267_696 + 2_560 + bn + 650, 650)
    assert total - fc == 271_824  # option A would be 267,696 + 2 * 688 = 269,072: the paper's 269k
    assert abs(total - fc - 269_000) / 269_000 < 0.015
    trainable = sum(p.numel() for p in resnet.parameters() if p.requires_grad)
    assert trainable == total - 784


@pytest.mark.parametrize(("size", "after_stage2", "after_stage3"), [(32, 16, 8), (28, 14, 7), (15, 8, 4)])
def test_resnet20_shapes(resnet: FilterNet, size: int, after_stage2: int, after_stage3: int) -> None:
    x = torch.randn(2, 3, size, size)
    stages = {}
    for name, module in resnet.named_children():
        x = module(x)
        stages[name] = x.shape
    assert stages["stage1"] == (2, 16, size, size)
    assert stages["stage2"] == (2, 32, after_stage2, after_stage2)
    assert stages["stage3"] == (2, 64, after_stage3, after_stage3)
    assert x.shape == (2, 10)
    gray = build("resnet20", in_channels=1, image_size=size, num_classes=4, init="kaiming")
    assert gray(torch.randn(3, 1, size, size)).shape == (3, 4)


def test_resnet20_has_batchnorm_under_every_scheme_and_does_not_pack() -> None:
    assert all(layer.bn is not None for layer in build("resnet20", batchnorm=False).filter_layers())
    for scheme in ("baseline", "randomout", "repr"):
        cfg = TrialConfig.model_validate(
            {"model": {"name": "resnet20"}, "scheme": scheme, "epochs": 90}  # 90 fits RePr's default schedule
        )
        assert cfg.uses_batchnorm and not can_pack(cfg)
    assert "resnet20" not in PACKABLE


def test_resnet20_acts_see_their_own_layer_and_the_sum_has_its_own_relu(resnet: FilterNet) -> None:
    """Hooks on each FilterLayer's act fire once, in filter_layers() order, on that conv's own output;
    every block's output is a separate ReLU of (conv2's act output + shortcut's act output or input)."""
    layers = resnet.filter_layers()
    assert len({id(layer.act) for layer in layers}) == len(layers)
    acts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    blocks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [
        layer.act.register_forward_hook(lambda _m, i, o, name=layer.name: acts.update({name: (i[0], o)}))
        for layer in layers
    ]
    handles += [
        module.register_forward_hook(lambda _m, i, o, name=name: blocks.update({name: (i[0], o)}))
        for name, module in resnet.named_modules()
        if isinstance(module, BasicBlock)
    ]
    resnet.eval()
    try:
        resnet(torch.randn(2, 3, 16, 16))
    finally:
        for handle in handles:
            handle.remove()
        resnet.train()
    assert list(acts) == [layer.name for layer in layers]
    for layer in layers:
        bn_out, out = acts[layer.name]
        assert out.shape[1] == layer.conv.out_channels
        ends_block = layer.name.endswith((".conv2", ".shortcut"))
        assert isinstance(layer.act, nn.Identity if ends_block else nn.ReLU)
        torch.testing.assert_close(out, bn_out if ends_block else bn_out.relu())
    assert len(blocks) == 9
    for name, (x, out) in blocks.items():
        shortcut = acts[f"{name}.shortcut"][1] if f"{name}.shortcut" in acts else x
        torch.testing.assert_close(out, (acts[f"{name}.conv2"][1] + shortcut).relu())
        relu = resnet.get_submodule(name).relu
        assert isinstance(relu, nn.ReLU) and all(relu is not layer.act for layer in layers)


def tiny_resnet_trial(scheme: object, **fields: object) -> TrialConfig:
    """ResNet-20 on 32 synthetic 8x8 training images: two steps of 16 per epoch."""
    doc = {
        "data": {"name": "synthetic", "synthetic_samples": 40, "image_size": 8},
        "model": {"name": "resnet20", "init": "kaiming"},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
        "scheme": scheme,
        "epochs": 2,
        "batch_size": 16,
        "device": "cpu",
    }
    return TrialConfig.model_validate(doc | fields)


@pytest.mark.parametrize("metric", ["ortho", "taylor"])  # taylor ranks through the act hooks
def test_resnet20_trains_with_repr(metric: str) -> None:
    """One S1 epoch, a drop, one S2 epoch, the re-introduction; the first layer is never dropped."""
    cfg = tiny_resnet_trial({"name": "repr", "s1": 1, "s2": 1, "n_iter": 1, "metric": metric})
    sink = MemorySink()
    [result] = train(cfg, sink)
    first, second = sink.epochs
    assert len(first.layers) == 21 and all(math.isfinite(e.train_loss) for e in sink.epochs)
    dropped = sum(layer.dropped for layer in first.layers)
    assert first.layers[0].dropped == 0 and dropped == round(0.3 * (784 - 16))
    assert sum(layer.dropped for layer in second.layers) == 0  # re-introduced at the end of epoch 2
    assert result.total_resets == dropped and result.epochs_done == 2
    with pytest.raises(ValueError, match="pack_size"):
        train(cfg, MemorySink(), seeds=[0, 1], pack_size=2)


def test_resnet20_trains_with_randomout() -> None:
    """A tau no CGN reaches resets every filter of all 21 layers at every step."""
    cfg = tiny_resnet_trial({"name": "randomout", "tau": 1e30}, epochs=1)
    sink = MemorySink()
    [result] = train(cfg, sink)
    assert math.isfinite(sink.epochs[0].train_loss)
    assert result.total_resets == 784 * 2 == sum(layer.resets for layer in sink.epochs[0].layers)
