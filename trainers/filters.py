"""One conv layer's filters across the K seeds of a pack (K = 1 for an ordinary model).

Schemes, CGN and ranking all work on [K, F, ...] views of the live tensors,
so one code path serves a single seed and a seed pack, and every per-seed,
per-filter edit is a masked `torch.where` with no host sync.

This module owns what a filter is in any net: the output channels of every `nn.Conv2d` found by
walking the module tree (`conv_layers`), named by module path. A grouped or depthwise conv is no
different: output channel o has weight[o] of in_channels / groups inputs, and that is its filter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainers.funcpack import FuncPack
from trainers.models import ConvUnit
from trainers.pack import PackedConv, PackedNet
from trainers.surgery import ConvBatchNorm

# Modules that own one conv under the attribute `conv` and name their filter layer by their own path.
_CONV_OWNERS: tuple[type[nn.Module], ...] = (ConvUnit, ConvBatchNorm)


@dataclass
class FilterGroup:
    name: str
    weight: torch.Tensor  # [K*F, C, k, k], or [K, F, C, k, k] when `stacked`
    bias: torch.Tensor | None  # [K*F] or [K, F]
    bn: nn.BatchNorm2d | None  # only when K == 1
    act: nn.Module  # a forward hook on it sees this layer's output, [B, K*F, H, W] (one seed: [B, F, H, W])
    seeds: int
    stacked: bool = False  # a FuncPack's parameter: a leading seed dimension

    @property
    def filters(self) -> int:
        return self.weight.shape[1] if self.stacked else self.weight.shape[0] // self.seeds

    @property
    def single_shape(self) -> tuple[int, ...]:
        """The weight shape of one seed's layer: what an initializer draw must have."""
        return (self.filters, *self.weight.shape[(2 if self.stacked else 1) :])

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """[K, F, D] view of any tensor laid out like this layer's weight, bias or BN vectors."""
        return tensor.view(self.seeds, self.filters, -1)

    def params(self) -> list[torch.Tensor]:
        """Every parameter whose rows index this layer's filters."""
        params = [self.weight] + ([self.bias] if self.bias is not None else [])
        if self.bn is not None:
            params += [p for p in (self.bn.weight, self.bn.bias) if p is not None]
        return params


def conv_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Every `nn.Conv2d` of the module tree, in registration order, by its filter layer's name.

    The name is the conv's module path (`blocks.dw.0`), except that a conv owned by a unit of the
    built-in nets (or by the batchnorm surgery's wrapper) takes its owner's path (`conv1`, not
    `conv1.conv`), which keeps the built-in nets' layer names.
    """
    owners = {id(m.conv) for m in model.modules() if isinstance(m, _CONV_OWNERS)}
    return {
        name.removesuffix(".conv") if id(module) in owners else name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
    }


def _parents(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    return {id(child): (parent, key) for parent in model.modules() for key, child in parent.named_children()}


def _bn_and_output(
    conv: nn.Conv2d, parents: dict[int, tuple[nn.Module, str]]
) -> tuple[nn.Module | None, nn.Module]:
    """The BatchNorm that normalises this conv's channels and the module whose output is the layer's.

    Built-in units and the surgery's wrapper say so themselves. Elsewhere a `BatchNorm2d` of matching
    width registered right after the conv in the same parent (`Sequential(conv, bn, relu)`, the common
    way to write it) counts as the conv's; RePr then masks its shift and running mean too.
    """
    parent, key = parents.get(id(conv), (None, ""))
    if isinstance(parent, ConvUnit):
        return parent.bn, parent.act
    if isinstance(parent, ConvBatchNorm):
        return parent.bn, parent
    if parent is not None:
        keys = list(parent._modules)
        after = parent._modules[keys[keys.index(key) + 1]] if keys.index(key) + 1 < len(keys) else None
        if isinstance(after, nn.BatchNorm2d) and after.num_features == conv.out_channels:
            return after, after
    return None, conv


def filter_groups(model: nn.Module) -> list[FilterGroup]:
    if isinstance(model, PackedNet):
        return [
            FilterGroup(name, m.weight, m.bias, None, m.act, model.seeds)
            for name, m in model.named_children()
            if isinstance(m, PackedConv)
        ]
    if isinstance(model, FuncPack):
        # Hooks go on the template, whose modules run the forward (`FuncPack.seed_forward`).
        template = conv_layers(model.template)
        parents = _parents(model.template)
        return [
            FilterGroup(
                name,
                conv.weight,
                conv.bias,
                None,
                _bn_and_output(template[name], parents)[1],
                model.seeds,
                stacked=True,
            )
            for name, conv in conv_layers(model.stack).items()
        ]
    parents = _parents(model)
    groups = []
    for name, conv in conv_layers(model).items():
        bn, out = _bn_and_output(conv, parents)
        groups.append(FilterGroup(name, conv.weight, conv.bias, bn, out, 1))
    return groups


@torch.no_grad()
def where_rows(
    group: FilterGroup, tensor: torch.Tensor, mask: torch.Tensor, value: torch.Tensor | float
) -> None:
    """In place: rows (seed, filter) selected by `mask` [K, F] take `value` ([K, F, ...] or a scalar)."""
    view = group.rows(tensor)
    m = mask.unsqueeze(-1)
    if isinstance(value, torch.Tensor):
        view.copy_(torch.where(m, value.reshape(view.shape), view))
    else:
        view.masked_fill_(m.expand_as(view), value)


def optimizer_row_states(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> list[torch.Tensor]:
    """The per-element state tensors (Adam moments, SGD momentum) of one parameter."""
    state = optimizer.state.get(param, {})
    return [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == param.shape]


def zero_optimizer_rows(optimizer: torch.optim.Optimizer, group: FilterGroup, mask: torch.Tensor) -> None:
    """Restart the optimizer state of the masked (seed, filter) rows as a fresh optimizer's.

    Adam needs its step count restarted too (bias correction), which `RowAdam.reset_rows` does; for
    SGD, zero momentum is exactly a fresh start."""
    reset_rows = getattr(optimizer, "reset_rows", None)
    for param in group.params():
        if reset_rows is not None:
            reset_rows(param, mask.reshape(-1))
            continue
        for state in optimizer_row_states(optimizer, param):
            where_rows(group, state, mask, 0.0)
