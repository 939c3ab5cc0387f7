"""ReDo (Sokar, Agarwal, Castro, Evci, "The dormant neuron phenomenon in deep reinforcement learning",
ICML 2023): recycle dormant filters.

Every `every` optimizer steps (at step indices > 0 divisible by it, as the reference's
`is_update_iter`), each filter's score is its mean |output| over the step's batch and positions,
normalised by the layer's average: s_i = a_i / (mean_k a_k + 1e-9) (the reference's
`estimate_neuron_score`). A filter with s_i <= tau is dormant: its incoming weights are re-drawn from
the layer's initializer (bias zero), the consumer's weights that read it are zeroed, and the optimizer
state of both restarts (trainers/outgoing.py). With `units: all` (the default is `filters`) the hidden
linear layers' units are recycled alike, as the paper does for dense layers: a_i is unit i's mean
|output| over the batch, normalised by its layer's mean; a dormant unit's incoming row is re-drawn, its
bias zeroed and the next linear layer's column u zeroed. Scores are per seed ([K, F]), so a pack's seeds
are checked and reset independently with masks, and the draws are made every check whatever the masks
say, so each seed's random stream does not depend on its pack.
"""

from __future__ import annotations

import torch

from trainers.config import RedoScheme
from trainers.outgoing import ResetLayers, channel_activity
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
        self.layers = ResetLayers([], [], 0)

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self.layers = ResetLayers.of(ctx.model, ctx.groups, self.cfg.units)

    @torch.no_grad()
    def after_step(self, ctx: TrainContext, cgns: list[torch.Tensor]) -> None:
        if ctx.step == 0 or ctx.step % self.cfg.every or ctx.batch is None:
            return
        activity = channel_activity(ctx.model, self.layers.groups, ctx.batch)
        masks = [dormant(a.mean(dim=-1), self.cfg.tau) for a in activity]
        self.layers.reset(ctx.optimizer, ctx.monitor, ctx.fresh_filters, masks, ctx.step)
