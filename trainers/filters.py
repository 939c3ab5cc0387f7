"""One conv layer's filters across the K seeds of a pack (K = 1 for an ordinary model).

Schemes, CGN and ranking all work on [K, F, ...] views of the live tensors,
so one code path serves a single seed and a seed pack, and every per-seed,
per-filter edit is a masked `torch.where` with no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainers.pack import PackedConv, PackedNet


@dataclass
class FilterGroup:
    name: str
    weight: torch.Tensor  # [K*F, C, k, k]
    bias: torch.Tensor | None  # [K*F]
    bn: nn.BatchNorm2d | None  # only when K == 1
    act: nn.Module  # its output is [B, K*F, H, W]
    seeds: int

    @property
    def filters(self) -> int:
        return self.weight.shape[0] // self.seeds

    @property
    def single_shape(self) -> tuple[int, ...]:
        """The weight shape of one seed's layer: what an initializer draw must have."""
        return (self.filters, *self.weight.shape[1:])

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """[K, F, D] view of any tensor laid out like this layer's weight, bias or BN vectors."""
        return tensor.view(self.seeds, self.filters, -1)

    def params(self) -> list[torch.Tensor]:
        """Every parameter whose rows index this layer's filters."""
        params = [self.weight] + ([self.bias] if self.bias is not None else [])
        if self.bn is not None:
            params += [p for p in (self.bn.weight, self.bn.bias) if p is not None]
        return params


def filter_groups(model: nn.Module) -> list[FilterGroup]:
    if isinstance(model, PackedNet):
        return [
            FilterGroup(name, m.weight, m.bias, None, m.act, model.seeds)
            for name, m in model.named_children()
            if isinstance(m, PackedConv)
        ]
    return [
        FilterGroup(layer.name, layer.conv.weight, layer.conv.bias, layer.bn, layer.act, 1)
        for layer in model.filter_layers()
    ]


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
