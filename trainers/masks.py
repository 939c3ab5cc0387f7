"""Weight masks per seed: the conv and linear weights of a model or a seed pack, and how to choose
which of them to keep (IMP's magnitude pruning, edge-popup's top-k of scores).

Every weight is seen as a [K, N] view (K seeds of a pack, N weights of one seed's layer): a packed
conv's [K*F, C, k, k] and a packed linear's [K, O, D] both flatten seed-major, so one code path
serves a seed alone and a pack, and one seed's choice never looks at another seed's weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from trainers.filters import conv_layers
from trainers.funcpack import FuncPack
from trainers.pack import PackedConv, PackedLinear, PackedNet


@dataclass
class MaskedWeight:
    """One conv or linear layer's weight across the seeds of a pack."""

    name: str
    kind: Literal["conv", "linear"]
    weight: torch.Tensor  # the live parameter
    seeds: int
    stacked: bool = False  # a generic pack's parameter: [K, ...] whatever the layer

    def per_seed(self, tensor: torch.Tensor) -> torch.Tensor:
        """[K, N] view of a tensor laid out like the weight."""
        return tensor.view(self.seeds, -1)

    @property
    def single_shape(self) -> tuple[int, ...]:
        """One seed's weight shape: what an initializer draw must have (fans come from it)."""
        shape = tuple(self.weight.shape)
        if self.seeds == 1 and not self.stacked:
            return shape
        if self.stacked or self.kind == "linear":
            return shape[1:]
        return (shape[0] // self.seeds, *shape[1:])

    @property
    def fan_in(self) -> int:
        return math.prod(self.single_shape[1:])

    def stacked_like(self, per_seed: list[torch.Tensor]) -> torch.Tensor:
        """Per-seed tensors of `single_shape` in the weight's own layout."""
        return torch.stack(per_seed).view(self.weight.shape)


def masked_weights(model: nn.Module, layers: Literal["all", "conv", "linear"] = "all") -> list[MaskedWeight]:
    """The conv and linear weights of a model (or pack), in module order, named as filter layers are
    (trainers/filters.py: module paths; a built-in unit's conv by the unit's path)."""
    stacked = isinstance(model, FuncPack)
    seeds = model.seeds if isinstance(model, PackedNet | FuncPack) else 1
    root = model.stack if stacked else model
    convs = {id(conv): name for name, conv in conv_layers(root).items()}
    out = []
    for name, module in root.named_modules():
        if isinstance(module, nn.Conv2d | PackedConv):
            kind: Literal["conv", "linear"] = "conv"
            name = convs.get(id(module), name)
        elif isinstance(module, nn.Linear | PackedLinear):
            kind = "linear"
        else:
            continue
        if layers in ("all", kind):
            out.append(MaskedWeight(name, kind, module.weight, seeds, stacked))
    return out


@torch.no_grad()
def prune_smallest(
    weights: list[torch.Tensor], masks: list[torch.Tensor], rate: float, scope: Literal["layer", "global"]
) -> list[torch.Tensor]:
    """New masks [K, N] (True = kept) that also drop round(rate * kept) of the kept weights with the
    smallest magnitude, per seed: in each layer (`layer`) or over all layers together (`global`).

    Already pruned weights stay pruned. Ties break by position (a stable sort), so the count is exact.
    """
    if scope == "layer":
        return [_prune_rows(w, m, rate) for w, m in zip(weights, masks, strict=True)]
    sizes = [w.shape[1] for w in weights]
    joined = _prune_rows(torch.cat(weights, dim=1), torch.cat(masks, dim=1), rate)
    return [part.contiguous() for part in torch.split(joined, sizes, dim=1)]


def _prune_rows(weight: torch.Tensor, mask: torch.Tensor, rate: float) -> torch.Tensor:
    out = torch.zeros_like(mask)
    for k in range(weight.shape[0]):
        kept = int(mask[k].sum())
        drop = (weight.shape[1] - kept) + round(rate * kept)
        # Pruned weights score -1 so they sort first; NaN (a diverged seed) sorts last.
        score = torch.where(mask[k], weight[k].abs(), torch.full_like(weight[k], -1.0))
        order = torch.argsort(score, stable=True)
        out[k, order[drop:]] = True
    return out


def top_fraction(scores: torch.Tensor, k: float) -> torch.Tensor:
    """[K, N] mask keeping, per seed, the round(k * N) largest |scores| (at least one)."""
    keep = max(1, round(k * scores.shape[1]))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, scores.abs().topk(keep, dim=1).indices, True)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per seed |a & b| / |a | b| of two [K, N] masks: 1 for equal masks."""
    union = (a | b).sum(dim=1).clamp(min=1)
    return (a & b).sum(dim=1) / union
