"""RePr (Prakash et al. 2019, Algorithm 1) as an epoch callback.

Schedule in epochs: train S1, drop the worst p of all ranked filters (global
ranking), train the sub-network S2, re-introduce the dropped filters
orthogonal to the kept ones and to their own old values; repeat N times, then
train the full net to the end.

While dropped, a filter is masked in the forward pass by holding its weight,
bias, BatchNorm beta and BatchNorm running mean at zero (so its output is
exactly zero, with or without BN, in train and in eval mode), and its optimizer
state is frozen at its value at the drop. Both are
restored with `torch.where` after every step, so "dropped filters do not
change during S2" holds exactly and no host sync is needed. On
re-introduction the paper's advice is followed: Adam moments (and SGD
momentum) of those filters are zeroed, BatchNorm affine parameters and running
statistics reset. The known bugs of public ports (unmasked biases, no-op
`.uniform_()` on indexed views, an always-empty null space) are avoided here
and covered by tests.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

import torch

from trainers.config import ReprScheme
from trainers.filters import optimizer_row_states, where_rows, zero_optimizer_rows
from trainers.models import draw_filters
from trainers.ranking import global_drop_masks, score_filters
from trainers.reinit import orthogonal_rows
from trainers.schemes.base import Scheme, TrainContext


class RePr(Scheme):
    def __init__(self, cfg: ReprScheme) -> None:
        super().__init__()
        self.cfg = cfg
        self.drop: list[torch.Tensor] | None = None  # per layer [K, F], True = dropped
        self.old_rows: list[torch.Tensor] = []  # per layer [K, F, D]: weights at the drop
        self.frozen_state: list[list[torch.Tensor]] = []  # per layer, optimizer state at the drop

    def drop_epochs(self) -> set[int]:
        """Epoch counts (completed) after which filters are dropped."""
        c = self.cfg.s1 + self.cfg.s2
        return {i * c + self.cfg.s1 for i in range(self.cfg.n_iter)}

    def reintroduce_epochs(self) -> set[int]:
        c = self.cfg.s1 + self.cfg.s2
        return {(i + 1) * c for i in range(self.cfg.n_iter)}

    def eligible(self, ctx: TrainContext) -> list[bool]:
        """Layers whose filters may be dropped: all but the first (unless include_first_layer) and
        those an `exclude_layers` glob names."""
        excluded = [any(fnmatchcase(g.name, p) for p in self.cfg.exclude_layers) for g in ctx.groups]
        return [(self.cfg.include_first_layer or i > 0) and not excluded[i] for i in range(len(ctx.groups))]

    def dropped_masks(self) -> list[torch.Tensor] | None:
        return self.drop

    def on_epoch_end(self, ctx: TrainContext, epoch: int) -> None:
        done = epoch + 1
        if done in self.reintroduce_epochs() and self.drop is not None:
            self._reintroduce(ctx)
        if done in self.drop_epochs() and self.drop is None:
            self._drop(ctx)

    @torch.no_grad()
    def _drop(self, ctx: TrainContext) -> None:
        with torch.enable_grad():
            scores = score_filters(
                self.cfg.metric, ctx.model, ctx.groups, ctx.data, ctx.monitor.epoch_mean(), ctx.generators
            )
        eligible = self.eligible(ctx)
        per_seed = [
            global_drop_masks(
                [s[k] for s in scores],
                eligible,
                self.cfg.drop_fraction,
                of_all=self.cfg.drop_fraction_of == "all",
            )
            if ctx.alive[k]
            else None
            for k in range(len(ctx.generators))
        ]
        self.drop = [
            torch.stack(
                [
                    m[i] if m is not None else torch.zeros_like(scores[i][k], dtype=torch.bool)
                    for k, m in enumerate(per_seed)
                ]
            )
            for i in range(len(ctx.groups))
        ]
        self.old_rows = [g.rows(g.weight).detach().clone() for g in ctx.groups]
        self.frozen_state = [
            [s.clone() for p in g.params() for s in optimizer_row_states(ctx.optimizer, p)]
            for g in ctx.groups
        ]
        for i, mask in enumerate(self.drop):
            ctx.monitor.active[i] = ~mask
        self._apply_mask(ctx)

    @torch.no_grad()
    def _apply_mask(self, ctx: TrainContext) -> None:
        assert self.drop is not None
        for group, mask, frozen in zip(ctx.groups, self.drop, self.frozen_state, strict=True):
            # The BN running mean too: in eval mode BN outputs (0 - running_mean) / sqrt(var + eps) + beta,
            # which is zero only when the mean is (with zero weight and bias, a train-mode batch's is).
            bn = group.bn
            held = [group.weight, group.bias, bn.bias if bn is not None else None]
            held += [bn.running_mean] if bn is not None and bn.running_mean is not None else []
            for t in held:
                if t is not None:
                    where_rows(group, t, mask, 0.0)
            states = [s for p in group.params() for s in optimizer_row_states(ctx.optimizer, p)]
            # Adam creates its state lazily at the first step: nothing to freeze before that.
            if len(states) == len(frozen):
                for state, saved in zip(states, frozen, strict=True):
                    where_rows(group, state, mask, saved)

    def after_backward(self, ctx: TrainContext) -> None:
        if self.drop is None:
            return
        for group, mask in zip(ctx.groups, self.drop, strict=True):
            for p in group.params():
                if p.grad is not None:
                    where_rows(group, p.grad, mask, 0.0)

    def after_step(self, ctx: TrainContext, cgns: list[torch.Tensor]) -> None:
        if self.drop is not None:
            self._apply_mask(ctx)

    @torch.no_grad()
    def _reintroduce(self, ctx: TrainContext) -> None:
        assert self.drop is not None
        init = ctx.init
        for i, (group, mask, old) in enumerate(zip(ctx.groups, self.drop, self.old_rows, strict=True)):
            if not bool(mask.any()):
                continue
            rows = group.rows(group.weight)
            new_rows = rows.clone()
            for k in range(group.seeds):
                m = mask[k]
                if not ctx.alive[k] or not bool(m.any()):
                    continue
                # Drawn only for seeds that dropped here: each seed's stream matches its single-seed run.
                fresh = draw_filters(group.single_shape, init, ctx.generators[k], rows.device).flatten(1)[m]
                placed, fallbacks = orthogonal_rows(rows[k][~m], old[k][m], fresh, ctx.generators[k])
                new_rows[k][m] = placed
                self.reinit_fallbacks[k] += fallbacks
            rows.copy_(new_rows)
            if group.bias is not None:
                where_rows(group, group.bias, mask, 0.0)
            if group.bn is not None:
                where_rows(group, group.bn.weight, mask, 1.0)
                where_rows(group, group.bn.bias, mask, 0.0)
                where_rows(group, group.bn.running_mean, mask, 0.0)
                where_rows(group, group.bn.running_var, mask, 1.0)
            if self.cfg.reset_optimizer_state:
                zero_optimizer_rows(ctx.optimizer, group, mask)
            ctx.monitor.record_resets(i, mask)
            ctx.monitor.active[i] = torch.ones_like(mask)
        self.drop, self.old_rows, self.frozen_state = None, [], []

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {
            "drop": self.drop,
            "old_rows": self.old_rows,
            "frozen_state": self.frozen_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.drop = state.get("drop")
        self.old_rows = state.get("old_rows", [])
        self.frozen_state = state.get("frozen_state", [])

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        names = [g.name for g in ctx.groups]
        for pattern in self.cfg.exclude_layers:
            if not any(fnmatchcase(name, pattern) for name in names):
                raise ValueError(
                    f"scheme.exclude_layers: {pattern!r} matches no conv layer; layers: {', '.join(names)}"
                )
        if self.drop is not None:
            for i, mask in enumerate(self.drop):
                ctx.monitor.active[i] = ~mask
