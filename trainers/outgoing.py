"""A filter's outgoing weights, and the reset that gives a reborn filter no influence at first.

RandomOut re-draws a filter's incoming weights and keeps the trained weights downstream of it, so a
reborn filter can push the logits far out at once. ReDo and continual backprop (and RandomOut with
`outgoing: zero`) also zero the weights that read the filter's channel, so the filter starts with no
effect on the output and earns one by training.

A filter's consumer is the layer that reads its output channel: the next conv (its input-channel
slice `weight[:, f]`), or for the last conv the first linear layer after the flatten (flatten is
channel-major, so channel f is columns f*H*W .. (f+1)*H*W). That is unambiguous only in a plain
conv/flatten/linear stack: `ZERO_OUTGOING_MODELS` (trainers/config.py) names the nets where it is
established, in every form they train in (one model, a grouped-conv `PackedNet`, a generic
`FuncPack`); other nets are refused before training.

Every consumer is seen as a [K, O, F, P] view of its weight (K seeds, O outputs of one seed, F the
producer's filters, P the kernel positions of a conv or the H*W columns per channel of a linear), so
one masked write serves every form with no host sync.

Hidden linear units (the outputs of every linear layer but the last: crater_cnn's `hidden`) are reset
unit-wise as the papers treat fully connected layers: `hidden_units` sees each as a `FilterGroup` whose
"filters" are its output units (incoming row weight[u], bias[u]) and whose consumer is the next linear
layer (column u, P = 1), so the same reset, zeroing and scoring code serves filters and units.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from trainers.cgn import CgnMonitor
from trainers.config import ZERO_OUTGOING_MODELS
from trainers.filters import FilterGroup, optimizer_row_states, where_rows, zero_optimizer_rows
from trainers.funcpack import FuncPack
from trainers.layer_outputs import batch_first, captured_outputs
from trainers.models import ConvUnit
from trainers.pack import PackedConv, PackedFlatten, PackedLinear


@dataclass
class Consumer:
    """The weight that reads one filter layer's output channels."""

    weight: torch.Tensor
    seeds: int
    filters: int
    linear: bool  # a linear layer after the flatten, else a conv

    @property
    def positions(self) -> int:
        """P: a conv's kernel positions, or a linear's H*W columns per channel."""
        w = self.weight
        return w.shape[-1] // self.filters if self.linear else w.shape[-1] * w.shape[-2]

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """[K, O, F, P] view of the weight or of any tensor laid out like it (optimizer state): a
        [O, F, k, k] or [O, F*H*W] weight (K = 1), a grouped pack's [K*O, F, k, k], a batched
        [K, O, F*H*W] or a stacked [K, O, F, k, k]."""
        return tensor.view(self.seeds, -1, self.filters, self.positions)


def consumers(model: nn.Module, groups: list[FilterGroup]) -> list[Consumer]:
    """Each filter layer's consumer, in `groups` order; ValueError (one line) where it is not known."""
    root = model.stack if isinstance(model, FuncPack) else model
    children = list(root.named_children())
    found: dict[str, Consumer] = {}
    for index, (name, module) in enumerate(children):
        if not isinstance(module, ConvUnit | PackedConv):
            continue
        group = next((g for g in groups if g.name == name), None)
        rest = [m for _, m in children[index + 1 :]]
        if group is None or not rest:
            break
        nxt, after = rest[0], (rest[1] if len(rest) > 1 else None)
        if isinstance(nxt, ConvUnit | PackedConv):
            weight = nxt.conv.weight if isinstance(nxt, ConvUnit) else nxt.weight
            found[name] = Consumer(weight, group.seeds, group.filters, linear=False)
        elif isinstance(nxt, nn.Flatten | PackedFlatten) and isinstance(after, nn.Linear | PackedLinear):
            found[name] = Consumer(after.weight, group.seeds, group.filters, linear=True)
    missing = [g.name for g in groups if g.name not in found]
    if missing:
        raise ValueError(
            f"scheme: the layer that reads filter layer {missing[0]!r} is not known; zeroing outgoing "
            f"weights needs a conv/flatten/linear stack ({', '.join(ZERO_OUTGOING_MODELS)})"
        )
    return [found[g.name] for g in groups]


def hidden_units(model: nn.Module) -> list[tuple[FilterGroup, Consumer]]:
    """Each hidden linear layer of a conv/flatten/linear stack (one model, a grouped or a generic pack)
    as a group of [K, U] units with the next linear layer as its consumer. Parameter-free modules
    between the two (an activation) are the units' output: hooks go on the last of them, else on the
    linear itself (crater_cnn's hidden layer has no nonlinearity: its output is the linear's)."""
    generic = isinstance(model, FuncPack)
    root = model.stack if generic else model
    code = dict(model.template.named_children()) if generic else dict(root.named_children())
    seeds = getattr(model, "seeds", 1)
    children = list(root.named_children())
    linear = [i for i, (_, m) in enumerate(children) if isinstance(m, nn.Linear | PackedLinear)]
    found = []
    for a, b in zip(linear, linear[1:], strict=False):
        name, layer = children[a]
        between = children[a + 1 : b]
        if any(next(m.parameters(), None) is not None for _, m in between):
            continue  # not a plain linear stack: the units' consumer is not known
        out = code[between[-1][0] if between else name]
        stacked = generic or isinstance(layer, PackedLinear)
        group = FilterGroup(name, layer.weight, layer.bias, None, out, seeds, stacked=stacked)
        found.append((group, Consumer(children[b][1].weight, seeds, group.filters, linear=True)))
    return found


@torch.no_grad()
def zero_outgoing(optimizer: torch.optim.Optimizer, consumer: Consumer, mask: torch.Tensor) -> None:
    """Zero the consumer's weights that read the (seed, filter) channels in `mask` [K, F], and restart
    their optimizer state as a fresh optimizer's (SGD momentum zero; Adam moments and step count)."""
    m = mask[:, None, :, None]
    consumer.view(consumer.weight).masked_fill_(m, 0.0)
    reset_elements = getattr(optimizer, "reset_elements", None)
    if reset_elements is not None:
        full = m.expand(consumer.view(consumer.weight).shape).reshape(consumer.weight.shape)
        reset_elements(consumer.weight, full)
        return
    for state in optimizer_row_states(optimizer, consumer.weight):
        consumer.view(state).masked_fill_(m, 0.0)


@torch.no_grad()
def reset_incoming(
    optimizer: torch.optim.Optimizer, group: FilterGroup, mask: torch.Tensor, fresh: torch.Tensor
) -> None:
    """Reborn filters as at initialisation: weights from `fresh` ([K, F, ...], the layer's initializer),
    bias zero, BatchNorm scale 1, shift 0 and running statistics reset, optimizer state restarted."""
    where_rows(group, group.weight, mask, fresh)
    if group.bias is not None:
        where_rows(group, group.bias, mask, 0.0)
    if group.bn is not None:
        if group.bn.weight is not None:
            where_rows(group, group.bn.weight, mask, 1.0)
        if group.bn.bias is not None:
            where_rows(group, group.bn.bias, mask, 0.0)
        if group.bn.running_mean is not None:
            where_rows(group, group.bn.running_mean, mask, 0.0)
            where_rows(group, group.bn.running_var, mask, 1.0)
    zero_optimizer_rows(optimizer, group, mask)


@torch.no_grad()
def channel_activity(model: nn.Module, groups: list[FilterGroup], x: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the mean |output| over the batch of every (seed, channel, position): [K, F, H*W]
    ([K, U, 1] for a group of hidden units), from one forward without gradients in eval mode on `x`
    (the step's batch)."""
    captured = captured_outputs(model, groups, x, lambda forward: forward())
    return [_mean_abs(g, out) for g, (out, _) in zip(groups, captured, strict=True)]


def _mean_abs(group: FilterGroup, out: torch.Tensor) -> torch.Tensor:
    """[K, F, H*W]: a batch-first layer output's mean |value| over the batch, per seed and channel."""
    return out.abs().mean(dim=0).reshape(group.seeds, group.filters, -1)


class TrainingOutputs:
    """Each layer's output in the latest training forward, for a scheme that scores filters every step
    (CBP) without a forward of its own: forward hooks on the layers' output modules keep a reference
    (no copy, no host sync; eval-mode forwards are ignored). A generic pack's hooks would see vmap's
    batched tensors, so there `measure` runs the seeds once more on the batch (call it before the
    optimizer step: the same weights as the training forward)."""

    def __init__(self, model: nn.Module, groups: list[FilterGroup]) -> None:
        self.groups = groups
        self.generic = isinstance(model, FuncPack)
        self.latest: list[torch.Tensor | None] = [None] * len(groups)
        if not self.generic:
            for i, group in enumerate(groups):
                group.act.register_forward_hook(lambda m, _a, out, i=i: self._keep(m, i, out))

    def _keep(self, module: nn.Module, i: int, out: torch.Tensor) -> None:
        if module.training:
            self.latest[i] = batch_first(module, out.detach())

    @torch.no_grad()
    def measure(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """Per layer [K, F, H*W]: mean |output| over the batch of the latest training forward."""
        if self.generic or any(o is None for o in self.latest):
            return channel_activity(model, self.groups, x)
        return [_mean_abs(g, o) for g, o in zip(self.groups, self.latest, strict=True)]


@dataclass
class ResetLayers:
    """What ReDo and CBP score and reset: the conv filter groups (the monitor's layers, in its order),
    then, with `units: all`, the hidden linear layers' units; each with its consumer."""

    groups: list[FilterGroup]
    consumers: list[Consumer]
    filter_layers: int  # the first this many are conv layers; the rest hidden units

    @classmethod
    def of(cls, model: nn.Module, groups: list[FilterGroup], units: str) -> ResetLayers:
        hidden = hidden_units(model) if units == "all" else []
        return cls(
            groups + [g for g, _ in hidden], consumers(model, groups) + [c for _, c in hidden], len(groups)
        )

    @torch.no_grad()
    def reset(
        self,
        optimizer: torch.optim.Optimizer,
        monitor: CgnMonitor,
        fresh: Callable[[FilterGroup], torch.Tensor],
        masks: list[torch.Tensor],
        step: int,
    ) -> None:
        """Reset the [K, F] `masks` of every layer: all incoming rows first, then all outgoing weights
        (as the reference: a reborn filter of the next layer reads nothing from a reset one either).
        Filter resets go to the monitor's layer counts, unit resets to its per-seed unit count; both
        add up to the trial's `total_resets`. `fresh` draws every layer whatever the masks say, so a
        seed's random stream does not depend on its pack."""
        for group, mask in zip(self.groups, masks, strict=True):
            reset_incoming(optimizer, group, mask, fresh(group))
        for i, (consumer, mask) in enumerate(zip(self.consumers, masks, strict=True)):
            zero_outgoing(optimizer, consumer, mask)
            if i < self.filter_layers:
                monitor.record_resets(i, mask, step=step)
            else:
                monitor.record_unit_resets(mask)
