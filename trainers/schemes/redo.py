"""ReDo (Sokar, Agarwal, Castro, Evci, "The dormant neuron phenomenon in deep reinforcement learning",
ICML 2023): recycle dormant filters.

Every `every` optimizer steps (at step indices > 0 divisible by it, as the reference's
`is_update_iter`), each filter's score is its mean |output| over the step's batch and positions,
normalised by the layer's average: s_i = a_i / (mean_k a_k + 1e-9) (the reference's
`estimate_neuron_score`). A filter with s_i <= tau is dormant: its incoming weights are re-drawn from
the layer's initializer (bias zero), the consumer's weights that read it are zeroed, and the optimizer
state of both restarts (trainers/outgoing.py). Scores are per seed ([K, F]), so a pack's seeds are
checked and reset independently with masks, and the draws are made every check whatever the masks
say, so each seed's random stream does not depend on its pack.
"""

from __future__ import annotations

import torch

from trainers.config import RedoScheme
from trainers.outgoing import Consumer, channel_activity, consumers, reset_incoming, zero_outgoing
from trainers.schemes.base import Scheme, TrainContext

SCORE_EPS = 1e-9  # the reference's guard against a layer whose every output is zero


def dormant(activity: torch.Tensor, tau: float) -> torch.Tensor:
    """[K, F] mean |output| per filter -> the dormant mask s_i <= tau, each seed normalised alone."""
    score = activity / (activity.mean(dim=1, keepdim=True) + SCORE_EPS)
    return score <= tau


class Redo(Scheme):
    def __init__(self, cfg: RedoScheme) -> None:
        super().__init__()
        self.cfg = cfg
        self.consumers: list[Consumer] = []

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self.consumers = consumers(ctx.model, ctx.groups)

    @torch.no_grad()
    def after_step(self, ctx: TrainContext, cgns: list[torch.Tensor]) -> None:
        if ctx.step == 0 or ctx.step % self.cfg.every or ctx.batch is None:
            return
        activity = channel_activity(ctx.model, ctx.groups, ctx.batch)
        masks = [dormant(a.mean(dim=-1), self.cfg.tau) for a in activity]
        # All incoming resets first, then all outgoing zeros (as the reference): a reborn filter of the
        # next layer reads nothing from a dormant filter either.
        for group, mask in zip(ctx.groups, masks, strict=True):
            reset_incoming(ctx.optimizer, group, mask, ctx.fresh_filters(group))
        for i, (consumer, mask) in enumerate(zip(self.consumers, masks, strict=True)):
            zero_outgoing(ctx.optimizer, consumer, mask)
            ctx.monitor.record_resets(i, mask, step=ctx.step)
