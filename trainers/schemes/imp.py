"""Iterative magnitude pruning with rewinding (Frankle & Carbin 2019) as an epoch callback.

A trial is a list of phases of `epochs` epochs each (`ImpScheme.phases`), so the loop stays one
loop: at the end of a phase the scheme prunes (when the next phase starts a new round), loads the
next phase's starting weights with the mask applied, and restarts the optimizer state. Round 0 is
the dense net; round r keeps (1 - rate)^r of the pruned layers' weights (exactly: round(rate * kept)
more are pruned each round, at each layer's own rate where the rates differ).

Rewinding: the whole model state after `rewind_step` optimizer steps of round 0 (0: the initial
weights) is kept and every rewound round starts from it, times the mask. Pruned weights get zero
gradient (a hook on the weight, so CGN statistics see it too) and are multiplied by the mask after
every step, so they stay exactly zero. With `round_steps: remaining` a later round trains only
round 0's steps after the rewind point (OpenLTH trains a level from its start step to the same end
step): it skips the first `rewind_step` steps of its `epochs` (whole epochs are not trained,
evaluated or recorded; the epoch holding the rewind point trains the tail of its batch order), so
epoch e of every round covers the same steps of the schedule and a resume needs no state beyond the
epoch number.

Which layers are pruned at which rate (`_groups`): each conv/linear weight in module order at its
kind's rate (scope layer) or all ranked together at `rate` (scope global); the output layer is the
last of them and must be linear when `output_layer` is not `same`: `half` prunes it alone at half
the linear rate, `exclude` keeps it whole (it still counts, as kept, in the sparsity).

The ticket control (`reinit`) must use the rewound path's masks, so it trains that path itself:
between its own rounds (fresh init times the mask) it retrains the rewound round that finds the next
mask. Each fresh-init round replays the batch order of the rewound round with the same mask (the data
generator is stashed and restored around it), so the path, and with it every mask, is bit-identical
to the rewound trial's of the same seed on the same device and pack size.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from trainers.config import ImpScheme
from trainers.errors import SchemeError
from trainers.funcpack import FuncPack
from trainers.masks import MaskedWeight, jaccard, masked_weights, prune_smallest
from trainers.pack import build_pack
from trainers.schemes.base import Scheme, TrainContext


class Imp(Scheme):
    def __init__(self, cfg: ImpScheme) -> None:
        super().__init__()
        self.cfg = cfg
        self.phases = cfg.phases()
        self.masks: list[torch.Tensor] | None = None  # per layer [K, N], True = kept; None in round 0
        self.previous: list[torch.Tensor] | None = None  # the masks of the round before
        self.rewind_state: dict[str, torch.Tensor] | None = None
        self.fresh_state: dict[str, torch.Tensor] | None = None  # the control's init (seed + offset)
        # The rewound path's data streams (order, then augmentation if split); a lone tensor in
        # checkpoints from before the split.
        self.stashed_data_gen: list[torch.Tensor] | torch.Tensor | None = None
        self.weights: list[MaskedWeight] = []
        self.groups: list[tuple[list[int], float]] = []  # layers ranked together and their rate
        self._last: list[dict[str, float | int | bool]] = []

    # -- set-up ------------------------------------------------------------------------------------

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self.weights = masked_weights(ctx.model, self.cfg.layers)
        if not self.weights:
            raise SchemeError(f"scheme.layers: the model has no {self.cfg.layers} weights to prune")
        self.groups = _groups(self.weights, self.cfg)
        for i, w in enumerate(self.weights):
            w.weight.register_hook(lambda grad, i=i: self._masked_grad(grad, i))
        if self.rewind_state is None and self.cfg.rewind_step == 0:  # a fresh start: a resume restored it
            self.rewind_state = _copy(ctx.model.state_dict())
        if self.cfg.reinit and self.fresh_state is None:
            self.fresh_state = self._fresh_init(ctx)

    def _fresh_init(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        """The initial weights a trial of seed + reinit_offset starts from (packed like this one)."""
        data, config = ctx.data, ctx.config
        assert data is not None
        # Packed as the trial's own model is (grouped or generic), so the layouts match.
        seeds = [seed + self.cfg.reinit_offset for seed in ctx.seeds]
        model = build_pack(config, seeds, data, generic=isinstance(ctx.model, FuncPack))
        device = self.weights[0].weight.device
        return {k: v.to(device) for k, v in model.state_dict().items()}

    def steps_to_skip(self, ctx: TrainContext, epoch: int, steps_per_epoch: int) -> int:
        if self.cfg.round_steps == "full":
            return 0
        phase, within = divmod(epoch, ctx.config.epochs)
        if self.phases[phase][0] == 0:  # the dense round trains all its steps
            return 0
        return max(0, self.cfg.rewind_step - within * steps_per_epoch)

    def _masked_grad(self, grad: torch.Tensor, i: int) -> torch.Tensor | None:
        return None if self.masks is None else grad * self.masks[i].view(grad.shape)

    # -- training ----------------------------------------------------------------------------------

    @torch.no_grad()
    def after_step(self, ctx: TrainContext, cgns: list[torch.Tensor]) -> None:
        if self.rewind_state is None and ctx.step + 1 == self.cfg.rewind_step:
            self.rewind_state = _copy(ctx.model.state_dict())
        if self.masks is not None:
            self._apply_masks()

    def _apply_masks(self) -> None:
        assert self.masks is not None
        for w, mask in zip(self.weights, self.masks, strict=True):
            w.per_seed(w.weight).mul_(mask)

    def on_epoch_end(self, ctx: TrainContext, epoch: int) -> None:
        per_phase = ctx.config.epochs
        phase = epoch // per_phase
        round_, fresh = self.phases[phase]
        ends = (epoch + 1) % per_phase == 0
        measured = ends and (round_ == 0 or fresh == self.cfg.reinit)
        self._record(round_, measured, len(ctx.generators))
        if not ends or phase + 1 == len(self.phases):
            return
        steps = ctx.step + 1
        if self.cfg.round_steps == "remaining" and phase == 0 and self.cfg.rewind_step >= steps:
            raise SchemeError(
                f"scheme.rewind_step: {self.cfg.rewind_step} leaves none of round 0's {steps} optimizer "
                "steps to the later rounds (round_steps: remaining); lower it or raise epochs"
            )
        if self.rewind_state is None:
            raise SchemeError(
                f"scheme.rewind_step: {self.cfg.rewind_step} is past the {steps} optimizer steps of "
                "round 0; lower it or raise epochs"
            )
        next_round, next_fresh = self.phases[phase + 1]
        if next_round > round_:
            self._prune(ctx)
        if self.cfg.reinit:
            self._replay_batches(ctx, starting_fresh=next_fresh)
        self._start_phase(ctx, self.fresh_state if next_fresh else self.rewind_state)

    @torch.no_grad()
    def _prune(self, ctx: TrainContext) -> None:
        dense = [torch.ones_like(w.per_seed(w.weight), dtype=torch.bool) for w in self.weights]
        current = self.masks or dense
        trained = [w.per_seed(w.weight) for w in self.weights]
        self.previous = current
        masks = list(current)  # a layer in no group (an excluded output layer) keeps its mask
        for layers, rate in self.groups:
            pruned = prune_smallest(
                [trained[i] for i in layers], [current[i] for i in layers], rate, "global"
            )
            for i, mask in zip(layers, pruned, strict=True):
                masks[i] = mask
        self.masks = masks

    def _replay_batches(self, ctx: TrainContext, *, starting_fresh: bool) -> None:
        """A fresh-init round sees the batches of the rewound round with its mask; the rewound path
        then continues its own stream, as in the rewound trial."""
        gens = ctx.data_gens()
        if starting_fresh:
            self.stashed_data_gen = [g.get_state() for g in gens]
        elif self.stashed_data_gen is not None:
            stashed = self.stashed_data_gen
            for gen, saved in zip(gens, stashed if isinstance(stashed, list) else [stashed], strict=True):
                gen.set_state(saved)
            self.stashed_data_gen = None

    @torch.no_grad()
    def _start_phase(self, ctx: TrainContext, state: dict[str, torch.Tensor] | None) -> None:
        assert state is not None
        ctx.model.load_state_dict(state)
        self._apply_masks()
        ctx.optimizer.state.clear()  # a fresh optimizer per round (Adam moments and step count)

    # -- what is recorded --------------------------------------------------------------------------

    def _record(self, round_: int, measured: bool, seeds: int) -> None:
        sparsity = self._sparsity()
        overlap = (
            jaccard(torch.cat(self.masks, dim=1), torch.cat(self.previous, dim=1)).tolist()
            if measured and self.masks is not None and self.previous is not None
            else [math.nan] * seeds
        )
        self._last = [
            {
                "round": round_,
                "round_end": measured,
                "sparsity": sparsity[k],
                "mask_overlap": overlap[k],
            }
            for k in range(seeds)
        ]

    def _sparsity(self) -> list[float]:
        seeds = self.weights[0].seeds
        if self.masks is None:
            return [0.0] * seeds
        kept = torch.stack([m.sum(dim=1) for m in self.masks]).sum(dim=0)
        total = sum(m.shape[1] for m in self.masks)
        return (1.0 - kept.double() / total).tolist()

    def epoch_metrics(self, seed_index: int) -> dict[str, float | int | bool]:
        return self._last[seed_index] if self._last else {}

    def sparsity(self, seed_index: int) -> float:
        return self._sparsity()[seed_index]

    # -- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {
            "masks": self.masks,
            "previous": self.previous,
            "rewind_state": self.rewind_state,
            "fresh_state": self.fresh_state,
            "stashed_data_gen": self.stashed_data_gen,
            "last": self._last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.masks = state.get("masks")
        self.previous = state.get("previous")
        self.rewind_state = state.get("rewind_state")
        self.fresh_state = state.get("fresh_state")
        self.stashed_data_gen = state.get("stashed_data_gen")
        self._last = state.get("last", [])


def _groups(weights: list[MaskedWeight], cfg: ImpScheme) -> list[tuple[list[int], float]]:
    """The layers ranked together and their rate per round: each layer alone at its kind's rate
    (scope layer) or all together at `rate` (global), the output layer (the last one) as
    `output_layer` says."""
    last = weights[-1]
    if cfg.output_layer != "same" and last.kind != "linear":
        raise SchemeError(
            f"scheme.output_layer: the last pruned layer ({last.name}) is a {last.kind} layer, not a "
            "linear output layer; set output_layer: same"
        )
    body = list(range(len(weights) if cfg.output_layer == "same" else len(weights) - 1))
    if cfg.scope == "global":
        groups = [(body, cfg.rate)] if body else []
    else:
        groups = [([i], cfg.kind_rate(weights[i].kind)) for i in body]
    output_rate = cfg.output_rate()
    if cfg.output_layer == "half" and output_rate is not None:
        groups.append(([len(weights) - 1], output_rate))
    if not groups:
        raise SchemeError(
            f"scheme.output_layer: exclude leaves no {cfg.layers} layer to prune; set output_layer: same"
        )
    return groups


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}
