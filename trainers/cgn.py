"""Per-filter gradient norms (CGN) and their per-epoch summaries.

CGN(k) = sum over filter k's weights of |dL/dw| for one minibatch (RandomOut §2).
The reference code (MXNet, SoftmaxOutput) back-propagates the loss *summed*
over the minibatch, while we train on the mean loss. The gradient of the sum is
exactly B times the gradient of the mean on the same batch, so we report
CGN = B * sum|dL_mean/dw|: tau values from the paper and the reference code
carry over unchanged. Reports and traces always hold these units; a trial whose
threshold is meant for the CGN of the mean loss (RandomOut's `cgn_reduction:
mean`) compares CGN / B with tau, in its counts and in its resets alike
(`in_tau_units`).

Everything per step stays on the device as [K, F] tensors (K seeds of a
pack); `epoch_end` makes the one host copy per epoch.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from trainers.events import CgnTrace, LayerEpochStats
from trainers.filters import FilterGroup


def filter_cgn(group: FilterGroup, batch_size: int) -> torch.Tensor:
    """CGN of every (seed, filter) of one conv layer, in summed-loss units; shape [K, F]."""
    grad = group.weight.grad
    if grad is None:
        return torch.zeros(group.seeds, group.filters, device=group.weight.device)
    return group.rows(grad).abs().sum(dim=-1) * batch_size


class CgnMonitor:
    """Accumulates CGN statistics over an epoch without leaving the device."""

    def __init__(
        self,
        groups: list[FilterGroup],
        tau: float,
        trace_every: int,
        *,
        seeds: int | None = None,
        reduction: Literal["sum", "mean"] = "sum",
    ) -> None:
        """`seeds` (the pack's) is needed only when there are no groups: a net without nn.Conv2d
        (baseline only) has no filters, so its per-layer record and trace are empty. `reduction`: the
        units tau is compared in (TrialConfig.count_reduction)."""
        self.groups = groups
        self.tau = tau
        self.reduction = reduction
        self.batch_size = 1  # of the minibatch observed last: what `in_tau_units` divides by
        self.trace_every = trace_every
        self._device = groups[0].weight.device if groups else torch.device("cpu")
        self.seeds = groups[0].seeds if groups else (seeds or 1)
        self.active = [self._full(g, True) for g in groups]
        self._reset_accumulators()

    def _full(self, group: FilterGroup, value: bool | float | int) -> torch.Tensor:
        dtype = {bool: torch.bool, float: torch.float32, int: torch.long}[type(value)]
        return torch.full((group.seeds, group.filters), value, dtype=dtype, device=self._device)

    def _reset_accumulators(self) -> None:
        k = self.seeds
        self._sum = [self._full(g, 0.0) for g in self.groups]
        self._min = [torch.full((k,), float("inf"), device=self._device) for _ in self.groups]
        self._below = [torch.zeros(k, dtype=torch.long, device=self._device) for _ in self.groups]
        # Mean-loss CGN summed over the epoch's steps (only kept when tau is in those units) and the
        # filters active at every step of it (a RePr-dropped filter's zero CGN is not "dead").
        self._tau_sum = [self._full(g, 0.0) for g in self.groups] if self.reduction == "mean" else self._sum
        self._whole = [a.clone() for a in self.active]
        self._resets = [self._full(g, 0) for g in self.groups]
        self._unit_resets = torch.zeros(k, dtype=torch.long, device=self._device)
        self._samples: list[tuple[int, list[torch.Tensor], list[torch.Tensor]]] = []
        self._steps = 0

    def observe(self, step: int, batch_size: int) -> list[torch.Tensor]:
        """Record this minibatch's CGN (call after backward); returns per-layer [K, F] tensors."""
        cgns = [filter_cgn(group, batch_size) for group in self.groups]
        self.batch_size = batch_size
        for i, cgn in enumerate(cgns):
            self._sum[i] += cgn
            checked = self.in_tau_units(cgn)
            if self._tau_sum is not self._sum:
                self._tau_sum[i] += checked
            active = self.active[i]
            self._whole[i] &= active
            # Dropped (masked) filters have zero gradient by construction: not "dead", so not counted.
            masked = torch.where(active, cgn, torch.inf).amin(dim=1)
            self._min[i] = torch.minimum(self._min[i], masked)
            self._below[i] += ((checked < self.tau) & active).sum(dim=1)
        self._steps += 1
        if self.trace_every and step % self.trace_every == 0:
            self._samples.append((step, [c.clone() for c in cgns], []))
        return cgns

    def epoch_mean(self) -> list[torch.Tensor]:
        """Mean CGN per (seed, filter) over the epoch so far (RePr's `cgn` criterion)."""
        steps = max(self._steps, 1)
        return [s / steps for s in self._sum]

    def in_tau_units(self, cgn: torch.Tensor) -> torch.Tensor:
        """The last observed minibatch's CGN (summed-loss units) in the units tau is compared in."""
        return cgn / self.batch_size if self.reduction == "mean" else cgn

    def dead_filters(self) -> list[torch.Tensor]:
        """Per layer [K, F]: filters whose mean CGN over the epoch so far is below tau, in tau's units,
        among those active at every step of it (none before the first step). RandomOut's per-epoch
        check resets these; `LayerEpochStats.dead` counts them."""
        steps = max(self._steps, 1)
        seen = self._steps > 0
        return [(s / steps < self.tau) & w & seen for s, w in zip(self._tau_sum, self._whole, strict=True)]

    def record_resets(self, layer_index: int, mask: torch.Tensor, step: int | None = None) -> None:
        self._resets[layer_index] += mask.long()
        if step is not None and self._samples and self._samples[-1][0] == step:
            self._samples[-1][2].append(mask.long())

    def record_unit_resets(self, mask: torch.Tensor) -> None:
        """Resets of hidden linear units (ReDo, CBP), [K, U]: not filters, so no layer row or trace
        has them; they count in the seed's resets of the epoch that `epoch_end` returns (the trial's
        `total_resets`)."""
        self._unit_resets += mask.sum(dim=1)

    def epoch_end(
        self, epoch: int, dropped: list[list[int]], ortho_sums: list[list[float]]
    ) -> list[tuple[tuple[LayerEpochStats, ...], CgnTrace, int]]:
        """One host copy per epoch; per seed: layer summaries, the per-filter trace, resets done
        (filters and hidden units: what `total_resets` adds up).

        dropped and ortho_sums are indexed [layer][seed].
        """
        means = [m.cpu().numpy() for m in self.epoch_mean()]
        dead = [d.sum(dim=1).cpu().numpy() for d in self.dead_filters()]
        mins = [m.cpu().numpy() for m in self._min]
        below = [b.cpu().numpy() for b in self._below]
        resets = [r.cpu().numpy() for r in self._resets]
        unit_resets = self._unit_resets.cpu().numpy()
        samples = [
            (step, [c.cpu().numpy() for c in cgns], [m.cpu().numpy() for m in masks])
            for step, cgns, masks in self._samples
        ]
        out = []
        for k in range(self.seeds):
            stats = tuple(
                LayerEpochStats(
                    layer=group.name,
                    n_filters=group.filters,
                    cgn_mean=float(means[i][k].mean()),
                    cgn_min=float(mins[i][k]) if np.isfinite(mins[i][k]) else float("nan"),
                    below_tau=int(below[i][k]),
                    dead=int(dead[i][k]),
                    resets=int(resets[i][k].sum()),
                    dropped=dropped[i][k],
                    ortho_sum=ortho_sums[i][k],
                )
                for i, group in enumerate(self.groups)
            )
            trace = self._trace(epoch, k, means, resets, samples)
            out.append((stats, trace, int(sum(r[k].sum() for r in resets)) + int(unit_resets[k])))
        self._reset_accumulators()
        return out

    def _trace(self, epoch: int, k: int, means, resets, samples) -> CgnTrace:
        parts: dict[str, list[np.ndarray]] = {c: [] for c in ("step", "layer", "filter", "cgn", "reset")}

        def add(step: int, i: int, cgn: np.ndarray, reset: np.ndarray) -> None:
            f = len(cgn)
            parts["step"].append(np.full(f, step, dtype=np.int64))
            parts["layer"].append(np.full(f, self.groups[i].name, dtype=object))
            parts["filter"].append(np.arange(f, dtype=np.int32))
            parts["cgn"].append(cgn.astype(np.float32))
            parts["reset"].append(reset.astype(np.int32))

        for i in range(len(self.groups)):
            add(-1, i, means[i][k], resets[i][k])
        for step, cgns, masks in samples:
            for i, cgn in enumerate(cgns):
                reset = masks[i][k] if i < len(masks) else np.zeros(cgn.shape[1], dtype=np.int32)
                add(step, i, cgn[k], reset)
        dtypes = {"step": np.int64, "layer": object, "filter": np.int32, "cgn": np.float32, "reset": np.int32}
        columns = {c: np.concatenate(v) if v else np.zeros(0, dtype=dtypes[c]) for c, v in parts.items()}
        return CgnTrace(epoch=np.full(len(columns["cgn"]), epoch, dtype=np.int32), **columns)
