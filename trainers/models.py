"""The CNNs under study, with weights drawn only from the caller's generator.

Models are built on the meta device and every tensor is then drawn from the given generator, so the
seed alone fixes the weights (bit-identical across builds) and building a model never advances the
global RNG that other code may depend on.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from trainers.config import ModelConfig
from trainers.surgery import BN_EPS, BN_MOMENTUM

_INITIALIZERS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "uniform0.01": lambda t, g: nn.init.uniform_(t, -0.01, 0.01, generator=g),
    "xavier": lambda t, g: nn.init.xavier_uniform_(t, generator=g),
    "kaiming": lambda t, g: nn.init.kaiming_normal_(t, mode="fan_in", nonlinearity="relu", generator=g),
}


def derive_seeds(seed: int) -> tuple[int, int]:
    """Independent streams for initialization and the scheme's draws, both from the trial seed."""
    init_seed, scheme_seed = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint64)
    return int(init_seed), int(scheme_seed)


@dataclass
class FilterLayer:
    """A conv layer whose filters the schemes score and reset.

    `act` is this layer's own ReLU instance, so a forward hook on it sees exactly this layer's output.
    """

    name: str
    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None
    act: nn.Module


class ConvUnit(nn.Module):
    """MXNet's ConvFactory: conv (with bias) -> [BatchNorm] -> ReLU.

    ResNet units pass bias=False (BN follows) and, where a residual sum comes next, an identity
    `act`: the schemes' hooks on `act` must see this conv's own output, not the sum.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        *,
        stride: int = 1,
        padding: int = 0,
        batchnorm: bool,
        bias: bool = True,
        act: nn.Module | None = None,
    ):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=bias)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM) if batchnorm else None
        self.act = nn.ReLU() if act is None else act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)


class FilterNet(nn.Sequential):
    """A feed-forward net of ConvUnits and friends; a unit's module path is its layer name."""

    def filter_layers(self) -> list[FilterLayer]:
        return [
            FilterLayer(name, module.conv, module.bn, module.act)
            for name, module in self.named_modules()
            if isinstance(module, ConvUnit)
        ]


class Concat(nn.ModuleDict):
    """Inception branches: each sees the same input, outputs are stacked along channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.values()], dim=1)


def _simple(cin: int, n1x1: int, n3x3: int, batchnorm: bool) -> Concat:
    return Concat(
        {
            "1x1": ConvUnit(cin, n1x1, 1, batchnorm=batchnorm),
            "3x3": ConvUnit(cin, n3x3, 3, padding=1, batchnorm=batchnorm),
        }
    )


def _downsample(cin: int, n3x3: int, batchnorm: bool) -> Concat:
    """Stride-2 conv beside a stride-2 max-pool.

    MXNet rounded pooled sizes up (28 -> 14 -> 7, like the conv). One -inf row/column on the far side
    plus ceil_mode gives the same windows for even sizes and, unlike MXNet, the conv's size for odd ones.
    """
    pool = nn.Sequential(
        nn.ConstantPad2d((0, 1, 0, 1), float("-inf")), nn.MaxPool2d(3, stride=2, ceil_mode=True)
    )
    return Concat({"3x3s2": ConvUnit(cin, n3x3, 3, stride=2, padding=1, batchnorm=batchnorm), "pool": pool})


def _crater_cnn(
    cfg: ModelConfig, *, in_channels: int, image_size: int, num_classes: int, batchnorm: bool
) -> FilterNet:
    side = image_size + 2 * (2 * cfg.padding - 3)  # two 4x4 stride-1 convs
    if side < 1:
        raise ValueError(
            f"model.padding: crater_cnn with padding {cfg.padding} leaves nothing of a "
            f"{image_size}x{image_size} input; raise data.image_size or model.padding"
        )
    layers = OrderedDict(
        conv1=ConvUnit(in_channels, cfg.filters, 4, padding=cfg.padding, batchnorm=batchnorm),
        conv2=ConvUnit(cfg.filters, cfg.filters, 4, padding=cfg.padding, batchnorm=batchnorm),
        flatten=nn.Flatten(),
    )
    width = cfg.filters * side * side
    if cfg.hidden_fc:
        layers["hidden"] = nn.Linear(width, cfg.hidden_fc)  # no nonlinearity, as in the reference symbol
        width = cfg.hidden_fc
    layers["fc"] = nn.Linear(width, num_classes)
    return FilterNet(layers)


def _inception28(
    cfg: ModelConfig, *, in_channels: int, image_size: int, num_classes: int, batchnorm: bool
) -> FilterNet:
    """MXNet's inception-bn-28-small; global pooling makes it work for any input size."""
    bn = batchnorm
    return FilterNet(
        OrderedDict(
            conv1=ConvUnit(in_channels, 96, 3, padding=1, batchnorm=bn),
            in3a=_simple(96, 32, 32, bn),
            in3b=_simple(64, 32, 48, bn),
            in3c=_downsample(80, 80, bn),
            in4a=_simple(160, 112, 48, bn),
            in4b=_simple(160, 96, 64, bn),
            in4c=_simple(160, 80, 80, bn),
            in4d=_simple(160, 48, 96, bn),
            in4e=_downsample(144, 96, bn),
            in5a=_simple(240, 176, 160, bn),
            in5b=_simple(336, 176, 160, bn),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(336, num_classes),
        )
    )


def _vanilla_cnn(
    cfg: ModelConfig, *, in_channels: int, image_size: int, num_classes: int, batchnorm: bool
) -> FilterNet:
    """RePr's C^n(X): n x (3x3 conv, pad 1, X filters) then one FC; no pooling."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i in range(1, cfg.depth + 1):
        cin = in_channels if i == 1 else cfg.filters
        layers[f"conv{i}"] = ConvUnit(cin, cfg.filters, 3, padding=1, batchnorm=batchnorm)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(cfg.filters * image_size * image_size, num_classes)
    return FilterNet(layers)


class BasicBlock(nn.Module):
    """He et al.'s basic block: ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x)).

    conv2 ends in its own identity `act` (its BN output, before the sum), and the ReLU after the sum
    is `relu`, a separate module: a FilterLayer's act sees only its own layer. The shortcut is a
    1x1 conv + BN where the shape changes (option B), else the identity. Submodules are registered
    in forward order (conv1, conv2, shortcut), so hooks fire in `filter_layers()` order.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        unit = dict(batchnorm=True, bias=False)
        self.conv1 = ConvUnit(cin, cout, 3, stride=stride, padding=1, **unit)
        self.conv2 = ConvUnit(cout, cout, 3, padding=1, act=nn.Identity(), **unit)
        projects = stride != 1 or cin != cout
        self.shortcut = ConvUnit(cin, cout, 1, stride=stride, act=nn.Identity(), **unit) if projects else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


RESNET20_WIDTHS = (16, 32, 64)
RESNET20_BLOCKS = 3  # per stage: 6n + 2 = 20 layers with n = 3


def _resnet20(
    cfg: ModelConfig, *, in_channels: int, image_size: int, num_classes: int, batchnorm: bool
) -> FilterNet:
    """The CIFAR ResNet-20 of He et al. 2016 (§4.2), with 1x1 projection shortcuts (option B).

    3x3 conv 16, three stages of 3 basic blocks (16, 32, 64 filters; stride 2 at the first block of
    stages 2 and 3), global average pool, FC: 19 3x3 convs + 2 shortcut convs, 784 filters. BN
    follows every conv whatever `batchnorm` says (it is part of the architecture; the config reports
    it through `TrialConfig.uses_batchnorm`), with this project's BN convention (gamma fixed at 1,
    eps 1e-3; He et al. learn gamma). Convs have no bias, as BN follows. Global pooling makes it work
    for any input size. `cfg.filters`, `depth`, `hidden_fc` and `padding` do not apply.
    """
    width = RESNET20_WIDTHS[0]
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=ConvUnit(in_channels, width, 3, padding=1, batchnorm=True, bias=False)
    )
    for s, cout in enumerate(RESNET20_WIDTHS, start=1):
        blocks = OrderedDict()
        for b in range(1, RESNET20_BLOCKS + 1):
            stride = 2 if s > 1 and b == 1 else 1
            blocks[f"block{b}"] = BasicBlock(width, cout, stride)
            width = cout
        layers[f"stage{s}"] = nn.Sequential(blocks)
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(width, num_classes)
    return FilterNet(layers)


def _custom(
    cfg: ModelConfig,
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    batchnorm: bool,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """The user's net (`model.builder`, trainers/custom.py), drawn from the trial's generator like the
    built-ins: conv and linear weights from `model.init` (so RandomOut's re-draws match the layers'
    first draw), biases zero; anything else as the builder made it under torch's RNG seeded from the
    generator. The builder's source hash rides on the net as `builder_sha256`, for the result."""
    from trainers.custom import build_network

    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    model, target = build_network(
        cfg, in_channels=in_channels, num_classes=num_classes, image_size=image_size, seed=seed
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                module.weight.copy_(_draw(module.weight, cfg.init, generator))
                if module.bias is not None:
                    module.bias.zero_()
    if batchnorm:  # the scheme by module surgery; a net it cannot treat is refused in one line
        from trainers.surgery import insert_batchnorm

        insert_batchnorm(model, torch.zeros(2, in_channels, image_size, image_size))
    model.builder_sha256 = target.sha256
    return model


MODELS: dict[str, Callable[..., FilterNet]] = {
    "crater_cnn": _crater_cnn,
    "inception28": _inception28,
    "vanilla_cnn": _vanilla_cnn,
    "resnet20": _resnet20,
    "custom": _custom,
}


def build_model(
    cfg: ModelConfig,
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    batchnorm: bool,
    generator: torch.Generator,
) -> FilterNet:
    builder = MODELS.get(cfg.name)
    if cfg.name == "custom":
        _initializer(cfg.init)
        return _custom(
            cfg,
            in_channels=in_channels,
            image_size=image_size,
            num_classes=num_classes,
            batchnorm=batchnorm,
            generator=generator,
        )
    if builder is None:
        raise ValueError(f"model.name: unknown model {cfg.name!r}; choose one of {', '.join(MODELS)}")
    _initializer(cfg.init)  # fail before building
    with torch.device("meta"):
        model = builder(
            cfg, in_channels=in_channels, image_size=image_size, num_classes=num_classes, batchnorm=batchnorm
        )
    model.to_empty(device="cpu")
    _initialize(model, cfg.init, generator)
    return model


def draw_conv_weight(conv: nn.Conv2d, init: str, generator: torch.Generator) -> torch.Tensor:
    """A fresh weight for `conv` from the named initializer (RandomOut's reset draw)."""
    return _draw(conv.weight, init, generator)


LAYER_DEFAULT_INIT = "default"  # a conv's own default initializer (PyTorch's), for nets built elsewhere


def _layer_default(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """PyTorch's Conv2d/Linear `reset_parameters` weight draw (kaiming_uniform, a = sqrt(5)), from the
    given generator rather than the global one. Fans come from the weight shape, so a grouped or
    depthwise conv ([F, C / groups, k, k]) gets its own fan_in, as PyTorch gives it."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)


def draw_filters(
    shape: tuple[int, ...], init: str | None, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """A fresh [F, C, k, k] draw; fans come from this one-seed shape, so packs draw as single seeds do.

    `init` None (or LAYER_DEFAULT_INIT) draws as the layer's own default initializer would: a net
    built by user code has no project initializer of its own."""
    fresh = torch.empty(shape, device=generator.device)
    draw = _layer_default if init in (None, LAYER_DEFAULT_INIT) else _initializer(init)
    return draw(fresh, generator).to(device)


def _initializer(init: str) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    if init not in _INITIALIZERS:
        raise ValueError(
            f"model.init: unknown initializer {init!r}; choose one of {', '.join(_INITIALIZERS)}"
        )
    return _INITIALIZERS[init]


def _draw(like: torch.Tensor, init: str, generator: torch.Generator) -> torch.Tensor:
    """Drawn on the generator's device (a generator only draws there), then moved to `like`'s."""
    fresh = torch.empty(like.shape, dtype=like.dtype, device=generator.device)
    return _initializer(init)(fresh, generator).to(like.device)


@torch.no_grad()
def _initialize(model: nn.Module, init: str, generator: torch.Generator) -> None:
    """Fill every tensor of a model materialised by `to_empty` (whose memory is garbage until then)."""
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.weight.copy_(_draw(module.weight, init, generator))
            if module.bias is not None:  # ResNet convs have none (BN follows)
                module.bias.zero_()
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.weight.fill_(1.0).requires_grad_(False)  # gamma fixed at 1, as MXNet's fix_gamma
            module.bias.zero_()
        else:
            continue
        done.update(id(p) for p in module.parameters(recurse=False))
    missing = [name for name, p in model.named_parameters() if id(p) not in done]
    if missing:
        raise TypeError(f"no initializer for parameters {missing}")
