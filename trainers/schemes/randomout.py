"""RandomOut (Cohen, Lo, Ding 2016): re-draw filters whose CGN falls below tau.

As in the reference code, the check runs by default after every minibatch on
the gradient of the batch just processed, after the optimizer step; with
`check_every: epoch` it runs once per epoch, after the epoch's evaluation, on
each filter's mean CGN over the epoch. Either way tau is compared with the CGN
in the units `cgn_reduction` names, the same units the trial's "below tau"
counts use (trainers/cgn.py). A fresh layer-shaped draw is made at every
active check (per seed, from that seed's generator) and merged with
`torch.where`, so the random stream, and the result, does not depend on how
many filters died or on the pack a seed is in, and no host sync is needed to
find out. With `outgoing: zero` the consumer's weights that read a reset filter
are zeroed too, after every layer's re-draws (trainers/outgoing.py). The next
step's gradient then reaches the reborn filter through zero weights, so its CGN
is exactly 0: the next check skips it (without the skip it would be reset at
every step, forever).
"""

from __future__ import annotations

from typing import Any

import torch

from trainers.config import RandomOutScheme
from trainers.filters import where_rows, zero_optimizer_rows
from trainers.outgoing import Consumer, consumers, zero_outgoing
from trainers.schemes.base import Scheme, TrainContext


class RandomOut(Scheme):
    def __init__(self, cfg: RandomOutScheme) -> None:
        super().__init__()
        self.cfg = cfg
        self.consumers: list[Consumer] = []  # outgoing: zero only
        self.reborn: list[torch.Tensor] = []  # outgoing: zero: [K, F] per layer, reset at the last step

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        if self.cfg.outgoing == "zero":
            self.consumers = consumers(ctx.model, ctx.groups)

    def is_active(self, ctx: TrainContext) -> bool:
        """Resets are allowed in the first P fraction of epochs (late resets may damage the net)."""
        return ctx.epoch < self.cfg.active_fraction * ctx.config.epochs

    @torch.no_grad()
    def after_step(self, ctx: TrainContext, cgns: list[torch.Tensor]) -> None:
        if self.cfg.check_every != "step" or not self.is_active(ctx):
            return
        self._reset(ctx, [ctx.monitor.in_tau_units(cgn) < self.cfg.tau for cgn in cgns], step=ctx.step)

    @torch.no_grad()
    def on_epoch_end(self, ctx: TrainContext, epoch: int) -> None:
        """The per-epoch check, on the monitor's epoch means before `epoch_end` resets them; none after
        the last epoch (the trial ends there, so a reset would change nothing but its count)."""
        if self.cfg.check_every != "epoch" or not self.is_active(ctx) or epoch + 1 >= ctx.config.epochs:
            return
        self._reset(ctx, ctx.monitor.dead_filters(), step=None)

    def _reset(self, ctx: TrainContext, dead_per_layer: list[torch.Tensor], step: int | None) -> None:
        deads = []
        for i, (group, dead) in enumerate(zip(ctx.groups, dead_per_layer, strict=True)):  # dead: [K, F]
            if i < len(self.reborn):
                dead = dead & ~self.reborn[i]
            deads.append(dead)
            where_rows(group, group.weight, dead, ctx.fresh_filters(group))
            if self.cfg.reset_bias and group.bias is not None:
                where_rows(group, group.bias, dead, 0.0)
            if self.cfg.reset_optimizer_state:
                zero_optimizer_rows(ctx.optimizer, group, dead)
            ctx.monitor.record_resets(i, dead, step=step)
        for consumer, dead in zip(self.consumers, deads, strict=False):
            zero_outgoing(ctx.optimizer, consumer, dead)
        if self.consumers:
            self.reborn = deads

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | ({"reborn": self.reborn} if self.reborn else {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.reborn = list(state.get("reborn", []))
