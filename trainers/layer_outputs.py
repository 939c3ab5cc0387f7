"""Each filter layer's output in one eval-mode forward, caught by forward hooks: the single loop behind
RePr's data-driven criteria (trainers/ranking.py) and the activity scores of ReDo (trainers/outgoing.py).

A generic pack (FuncPack) runs its seeds one at a time here, because hooks under vmap would see batched
tensors; its per-seed outputs are joined along channels, as a grouped pack lays them out. Outputs are
kept by layer, not by call order: a net's forward need not follow the order its layers were registered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from trainers.filters import FilterGroup
from trainers.funcpack import FuncPack
from trainers.pack import PackedLinear

Forward = Callable[[], torch.Tensor]


def as_pack_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits as [K, B, classes]: a single model's [B, classes] is a pack of one."""
    return logits.unsqueeze(0) if logits.dim() == 2 else logits


def batch_first(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """A layer's output with the batch first: a grouped pack's linear gives [K, B, U], seed-major."""
    return out.transpose(0, 1) if isinstance(module, PackedLinear) else out


class Captured(NamedTuple):
    """One layer's output over the passes, batch first ([B, K*F, ...], seeds major), and its gradient
    when the pass back-propagated with `retain_grad` (else None)."""

    output: torch.Tensor
    grad: torch.Tensor | None


def captured_outputs(
    model: nn.Module,
    groups: list[FilterGroup],
    x: torch.Tensor,
    run: Callable[[Forward], None],
    retain_grad: bool = False,
) -> list[Captured]:
    """Per group, its output during `run(forward)`, where `forward()` returns the pass's logits as
    [K, B, classes]. `run` decides what the pass does with them (nothing, or a loss to back-propagate:
    with `retain_grad` each kept output keeps its `.grad`). The model is in eval mode during the passes
    and its mode is restored after."""
    if isinstance(model, FuncPack):
        passes: list[Forward] = [
            lambda k=k: model.seed_forward(k, x).unsqueeze(0) for k in range(model.seeds)
        ]
    else:
        passes = [lambda: as_pack_logits(model(x))]
    kept: list[list[tuple[nn.Module, torch.Tensor]]] = [[] for _ in groups]
    was_training = model.training
    model.eval()
    try:
        for forward in passes:
            calls: dict[int, tuple[nn.Module, torch.Tensor]] = {}

            def keep(module: nn.Module, out: torch.Tensor, i: int, calls: dict = calls) -> None:
                # Returns None: a hook's return value would replace the module's output.
                if i not in calls:
                    if retain_grad:
                        out.retain_grad()
                    calls[i] = (module, out)

            handles = [
                g.act.register_forward_hook(lambda m, _a, out, i=i: keep(m, out, i))
                for i, g in enumerate(groups)
            ]
            try:
                run(forward)
            finally:
                for h in handles:
                    h.remove()
            for i in range(len(groups)):
                kept[i].append(calls[i])
    finally:
        model.train(was_training)
    return [
        Captured(
            torch.cat([batch_first(m, out.detach()) for m, out in outs], dim=1),
            torch.cat([batch_first(m, out.grad) for m, out in outs], dim=1) if retain_grad else None,
        )
        for outs in kept
    ]
