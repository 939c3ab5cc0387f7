"""Continual backprop (Dohare, Hernandez-Garcia, Lan, Rahman, Mahmood, Sutton, "Loss of plasticity in
deep continual learning", Nature 2024; reference shibhansh/loss-of-plasticity, lop/algos/convGnT.py,
generate-and-test with `util_type='contribution'`).

After every optimizer step, per filter i of each conv layer (per seed of a pack, all [K, F] tensors):
  age_i += 1
  u_i <- eta u_i + (1 - eta) c_i, c_i = mean over the consumer's outputs (and kernel positions) of
         |w_out| times the filter's mean |output| over the batch (a linear consumer after the flatten:
         per position, then averaged over positions), as the reference computes it
  eligible: age_i > m;  acc += rho * (number eligible);  n = floor(acc);  acc -= n
  the n eligible filters of lowest bias-corrected utility u_i / (1 - eta^age_i) are replaced:
  incoming re-drawn from the layer's initializer (bias zero), outgoing zeroed, optimizer state of both
  restarted, u_i = age_i = 0.
The reference's mean over outgoing weights differs from a sum only by a per-layer constant, which ranks
filters alike. As in the reference, the filters' outputs are those of the step's training forward
(kept by hooks; a generic pack runs its seeds once more on the batch before the step) and the
outgoing weights those after the step. The count
accumulates as the reference's cbp_conv (rho times the eligible count; convGnT uses rho times the
layer width). Ties in utility go to the lower filter index.

With `units: all` (the default is `filters`) each hidden linear layer's units are replaced alike, per
unit, as the reference's lop/algos/gnt.py does for linear layers: c_i = |h_i| (mean over the batch of
the unit's output) times the mean |w_out| of the next linear layer's column i; a replaced unit's
incoming row is re-drawn, its bias zeroed and the next layer's column i zeroed. Each layer (conv or
linear) keeps its own utilities, ages and accumulated count. Unlike gnt.py, the count accumulates (its
`accumulate=True`) and the next layer's bias does not take over the replaced unit's mean contribution
(docs/schemes.md).
"""

from __future__ import annotations

from typing import Any

import torch

from trainers.config import CbpScheme
from trainers.outgoing import Consumer, ResetLayers, TrainingOutputs
from trainers.schemes.base import Scheme, TrainContext


def contribution(consumer: Consumer, activity: torch.Tensor) -> torch.Tensor:
    """This step's contribution c_i [K, F] from the consumer's weights and `activity` [K, F, H*W]."""
    weight = consumer.view(consumer.weight).abs()  # [K, O, F, P]
    if consumer.linear:
        return (weight.mean(dim=1) * activity).mean(dim=-1)
    return weight.mean(dim=(1, 3)) * activity.mean(dim=-1)


def lowest(score: torch.Tensor, eligible: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[K, F] mask of the `count[k]` eligible filters of lowest score in each seed k (no host sync)."""
    key = torch.where(eligible, score, torch.inf)
    order = key.argsort(dim=1, stable=True)
    positions = torch.arange(key.shape[1], device=key.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return (rank < count.unsqueeze(1)) & eligible


class Cbp(Scheme):
    def __init__(self, cfg: CbpScheme) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = ResetLayers([], [], 0)
        self.util: list[torch.Tensor] = []
        self.ages: list[torch.Tensor] = []
        self.accumulated: list[torch.Tensor] = []
        self.outputs: TrainingOutputs | None = None
        self.activity: list[torch.Tensor] = []

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self.layers = ResetLayers.of(ctx.model, ctx.groups, self.cfg.units)
        self.outputs = TrainingOutputs(ctx.model, self.layers.groups)
        if not self.util:
            groups = self.layers.groups
            device = groups[0].weight.device if groups else torch.device("cpu")
            shapes = [(g.seeds, g.filters) for g in groups]
            self.util = [torch.zeros(s, device=device) for s in shapes]
            self.ages = [torch.zeros(s, device=device) for s in shapes]
            self.accumulated = [torch.zeros(s[0], dtype=torch.float64, device=device) for s in shapes]
        elif len(self.util) != len(self.layers.groups):
            # A checkpoint written before hidden units were scored: resuming it would mix two schemes.
            raise ValueError(
                f"scheme: cbp checkpoint holds utilities of {len(self.util)} layers, the trial scores "
                f"{len(self.layers.groups)}; train the trial again from the start (delete its checkpoint)"
            )

    def replacements(self, i: int, activity: torch.Tensor) -> torch.Tensor:
        """Update layer i's ages, utility and accumulated count; return the [K, F] filters to replace."""
        cfg = self.cfg
        self.ages[i] += 1
        self.util[i].mul_(cfg.decay).add_(
            contribution(self.layers.consumers[i], activity), alpha=1 - cfg.decay
        )
        corrected = self.util[i] / (1 - torch.pow(cfg.decay, self.ages[i]))
        eligible = self.ages[i] > cfg.maturity
        self.accumulated[i] += cfg.replacement_rate * eligible.sum(dim=1)
        count = self.accumulated[i].floor()
        self.accumulated[i] -= count
        replace = lowest(corrected, eligible, count.long())
        self.util[i].masked_fill_(replace, 0.0)
        self.ages[i].masked_fill_(replace, 0.0)
        return replace

    def after_backward(self, ctx: TrainContext) -> None:
        if self.outputs is not None and ctx.batch is not None and self.layers.groups:
            self.activity = self.outputs.measure(ctx.model, ctx.batch)

    @torch.no_grad()
    def after_step(self, ctx: TrainContext, cgns: list[torch.Tensor]) -> None:
        if not self.activity:
            return
        masks = [self.replacements(i, a) for i, a in enumerate(self.activity)]
        self.activity = []
        self.layers.reset(ctx.optimizer, ctx.monitor, ctx.fresh_filters, masks, ctx.step)

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"util": self.util, "ages": self.ages, "accumulated": self.accumulated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.util = list(state.get("util", []))
        self.ages = list(state.get("ages", []))
        self.accumulated = list(state.get("accumulated", []))
