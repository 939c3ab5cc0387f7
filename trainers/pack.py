"""Seed packs: K seeds of one configuration trained at once as one network.

A pack is built from K ordinary models (each drawn from its own seed's
generator, so a seed's initial weights are bit-identical to its single-seed
weights) by stacking their parameters. All seeds of a configuration share the
data seed, hence the same batches, so the input is shared too:
  first conv   one conv with K*F output channels over the shared input
  later convs  one grouped conv, groups = K (seed k only sees its own channels)
  linear       one batched matmul over [K, B, D]
Nothing couples the seeds: the loss is the *sum* of the per-seed mean losses
(so each seed gets exactly its own gradient), the optimizers are elementwise,
and every scheme edit is a per-(seed, filter) mask. This replaces vmap, whose
per-call overhead is what a tiny CNN's step time is made of.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from trainers.funcpack import FuncPack
from trainers.models import ConvUnit, FilterNet, build_model, derive_seeds

if TYPE_CHECKING:
    from trainers.config import TrialConfig
    from trainers.data import LoadedData

PACKABLE = ("crater_cnn", "vanilla_cnn")
# The measured rule behind `pack_size: auto` (bench/pack.py, CraterCNN on craters, 2-core CPU; numbers in
# bench/RESULTS.md). Packing pays when one seed's step is per-operation overhead:
#   at batch 32, no hidden FC, 1-4 filters: packs of 64 gave 3.8-21x; with the 500-wide hidden FC (whose
#   weights make a pack memory-bound): 1 filter 3.9-6.9x at 32, 4 filters 1.7-2.7x at 8 (less at 32+);
#   20 filters: a pack is 0.6-1.07x, so wide layers run one seed per process. (Ranges: three runs.)
# A bigger step is compute, not overhead, and the grouped second conv then costs a pack more per seed
# than a seed alone (one thread, as trials run; best pack vs one seed, one run each, no hidden FC):
#   2 filters: batch 32 3.7x, 256 1.46x, 1024 1.14x, full (4374 images) 0.96x;
#   3 filters: batch 64 1.5x;  4 filters: batch 32 1.86x, 64 1.05x, 128 0.88x, 256 0.93x, full 0.53x;
#   with the hidden FC: 2 filters at 256 1.27x, 4 filters at 64 1.22x (pack 8; 0.93x at 30).
# So 2-4 filters pack only while filters^2 x images per step <= 1024 (the second conv's work per
# seed). One filter per conv (a depthwise second conv) always pays: 4.5x at 1024, 3.6x at full batch
# (pack 8; packs of 30 gave less there). On CUDA, where a tiny step is kernel launches, the batch-32
# rule stands at any batch (not measured here: bench/gpu_check.sh times a pack of 64 vs one seed).
AUTO_PACK_NO_HIDDEN = ((4, 64),)  # (at most this many filters per conv, seeds per pack)
AUTO_PACK = ((2, 32), (4, 8))
LARGE_STEP_WORK = 1024  # filters^2 x images per step above which 2-4 filters train alone on a CPU
ONE_FILTER_SMALL_STEP = 256  # images per step up to which one-filter nets pack as at batch 32
ONE_FILTER_LARGE_PACK = 8  # seeds per pack of one-filter nets at larger steps
# A custom net packs generically (trainers/funcpack.py) where vmap batches it (trainers/packcheck.py).
# Measured (bench/generic_pack.py, 2-core CPU shared with other work, one thread, the ways taking turns
# step by step, medians of 200 steps; bench/RESULTS.md): the example net (examples/custom, width 8,
# 906 parameters, Adam, batch 32) trains 3.5x one seed's seed-steps/s in packs of 8 and 3.9x in packs
# of 32 (whole-epoch turns, one run: 3.7x and 3.2x). 8 then: as fast within the noise, a quarter of the
# memory, and a failed pack retries 8 seeds, not 32. What a user's net costs is unknown, so the rule
# borrows the CraterCNN bounds above: packs paid at batch 32 up to 4 filters with the hidden FC
# (338k parameters: 1.7-2.7x in packs of 8) and not at 20 filters (1.7M: 0.6-1.07x); larger steps
# were not measured for custom nets, so on a CPU they train alone.
AUTO_PACK_CUSTOM = 8
CUSTOM_MAX_PARAMETERS = 400_000  # per seed; above it a custom net trains one seed per trial
CUSTOM_SMALL_STEP = 32  # images per step up to which a custom net packs on a CPU


def auto_pack_size(
    model_name: str,
    filters: int,
    batchnorm: bool,
    hidden_fc: int = 0,
    *,
    images_per_step: int | None,
    device: str,
    parameters: int | None = None,
) -> int:
    """Seeds per pack for `pack_size: auto`: 1 unless the model packs, is narrow and its step is small.

    `images_per_step` is the batch size, None for full batch (the whole training set, which
    planning does not load: counted as large). A `device: auto` trial is sized as on a CPU.
    `parameters`: one seed's count, for a custom net that vmap batches (else None: it trains alone).
    """
    if model_name == "custom":
        if batchnorm or parameters is None or parameters > CUSTOM_MAX_PARAMETERS:
            return 1
        small = images_per_step is not None and images_per_step <= CUSTOM_SMALL_STEP
        return AUTO_PACK_CUSTOM if device == "cuda" or small else 1
    if model_name not in PACKABLE or batchnorm:
        return 1
    rule = AUTO_PACK_NO_HIDDEN if model_name == "crater_cnn" and hidden_fc == 0 else AUTO_PACK
    size = next((size for widest, size in rule if filters <= widest), 1)
    if device == "cuda" or size == 1:
        return size
    if images_per_step is None:  # full batch
        return ONE_FILTER_LARGE_PACK if filters == 1 else 1
    if filters == 1:
        return size if images_per_step <= ONE_FILTER_SMALL_STEP else ONE_FILTER_LARGE_PACK
    return size if filters**2 * images_per_step <= LARGE_STEP_WORK else 1


class PackedConv(nn.Module):
    def __init__(self, units: list[ConvUnit], first: bool) -> None:
        super().__init__()
        conv = units[0].conv
        self.seeds = len(units)
        self.stride, self.padding = conv.stride, conv.padding
        self.groups = 1 if first else self.seeds
        self.weight = nn.Parameter(torch.cat([u.conv.weight.detach() for u in units]))
        self.bias = nn.Parameter(torch.cat([u.conv.bias.detach() for u in units]))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.conv2d(x, self.weight, self.bias, self.stride, self.padding, groups=self.groups))


class PackedFlatten(nn.Module):
    def __init__(self, seeds: int) -> None:
        super().__init__()
        self.seeds = seeds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, K*F, h, w] -> [K, B, F*h*w]: per seed, the same order as nn.Flatten on [B, F, h, w].
        return x.reshape(x.shape[0], self.seeds, -1).transpose(0, 1)


class PackedLinear(nn.Module):
    def __init__(self, linears: list[nn.Linear]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in linears]))  # [K, O, D]
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in linears]).unsqueeze(1))  # [K, 1, O]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight.transpose(1, 2))


def can_pack(config: TrialConfig) -> bool:
    """Grouped-conv packs need a conv/linear stack without BatchNorm (BN statistics would need per-seed
    handling). Any other net may still pack generically (`generic_pack_problem` says whether)."""
    return config.model.name in PACKABLE and not config.uses_batchnorm


def build_pack(
    config: TrialConfig, seeds: list[int], data: LoadedData, generic: bool | None = None
) -> nn.Module:
    """Each seed's model from its own generator (bit-identical to the seed alone), packed if K > 1:
    grouped convs for the built-in feed-forward nets, a torch.func pack for any other (or `generic`).
    IMP's control arm builds its fresh initialisations here too, from seeds shifted by its offset."""
    models = [
        build_model(
            config.model,
            in_channels=data.in_channels,
            image_size=data.image_size,
            num_classes=data.num_classes,
            batchnorm=config.uses_batchnorm,
            generator=torch.Generator().manual_seed(derive_seeds(seed)[0]),
        )
        for seed in seeds
    ]
    if len(models) == 1:
        return models[0]
    if generic is None:
        generic = not can_pack(config)
    return FuncPack(models) if generic else PackedNet(models)


class PackedNet(nn.Sequential):
    """K seeds of a conv/flatten/linear FilterNet without BatchNorm; returns logits [K, B, classes]."""

    def __init__(self, models: list[FilterNet]) -> None:
        seeds = len(models)
        modules: dict[str, nn.Module] = {}
        first = True
        for name, module in models[0].named_children():
            parts = [dict(m.named_children())[name] for m in models]
            if isinstance(module, ConvUnit):
                if module.bn is not None:
                    raise ValueError("pack_size: BatchNorm models train one seed per process")
                modules[name] = PackedConv(parts, first)
                first = False
            elif isinstance(module, nn.Flatten):
                modules[name] = PackedFlatten(seeds)
            elif isinstance(module, nn.Linear):
                modules[name] = PackedLinear(parts)
            else:
                raise ValueError(f"pack_size: cannot pack layer {name!r} ({type(module).__name__})")
        super().__init__(OrderedDict(modules))
        self.seeds = seeds

    def unpack(self, index: int, into: FilterNet) -> FilterNet:
        """Seed `index`'s weights as an ordinary model (for checks and export)."""
        with torch.no_grad():
            for name, module in self.named_children():
                target = dict(into.named_children())[name]
                if isinstance(module, PackedConv):
                    f = module.weight.shape[0] // self.seeds
                    target.conv.weight.copy_(module.weight[index * f : (index + 1) * f])
                    target.conv.bias.copy_(module.bias[index * f : (index + 1) * f])
                elif isinstance(module, PackedLinear):
                    target.weight.copy_(module.weight[index])
                    target.bias.copy_(module.bias[index, 0])
        return into
