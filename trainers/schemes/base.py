"""The callback interface every scheme implements.

The training loop is the same for every scheme; a scheme only reacts at a few
points (after backward, after the optimizer step, at epoch end, on resume).
It sees each conv layer as a `FilterGroup` of [K, F] filters (K seeds of a
pack, K = 1 alone) and edits them with masks, so nothing per step needs a host
sync and one seed's edits never touch another's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from trainers.cgn import CgnMonitor
from trainers.config import TrialConfig
from trainers.data import LoadedData
from trainers.filters import FilterGroup
from trainers.models import draw_filters


@dataclass
class TrainContext:
    """What a scheme may look at and change; built once per trial (or pack) by the loop."""

    config: TrialConfig
    model: torch.nn.Module
    groups: list[FilterGroup]
    optimizer: torch.optim.Optimizer
    monitor: CgnMonitor
    data: LoadedData | None
    generators: list[torch.Generator]  # one per seed: the scheme's own draws, seeded from that seed
    epoch: int = 0
    step: int = 0
    alive: list[bool] = field(default_factory=list)  # False once a seed's loss diverged
    seeds: list[int] = field(default_factory=list)  # the trial seeds, in pack order
    data_gen: torch.Generator | None = None  # batch order, and augmentation unless split (IMP replays it)
    augment_gen: torch.Generator | None = None  # augmentation draws, when the trial has an augment_seed
    fork_step: int | None = None  # a fate-clock child leaves its parent's streams here (trainers/fork.py)
    batch: torch.Tensor | None = None  # the inputs of the step in progress (ReDo and CBP measure on them)

    def data_gens(self) -> list[torch.Generator]:
        """The data streams a checkpoint carries and IMP replays: order, then augmentation if its own."""
        assert self.data_gen is not None
        return [self.data_gen] + ([self.augment_gen] if self.augment_gen is not None else [])

    def __post_init__(self) -> None:
        if not self.alive:
            self.alive = [True] * len(self.generators)

    @property
    def init(self) -> str | None:
        """The spec's initializer for re-drawn filters; None: each layer's own default (a model
        config without an `init` of its own)."""
        return getattr(self.config.model, "init", None)

    def fresh_filters(self, group: FilterGroup) -> torch.Tensor:
        """One initializer draw of the layer per seed, from that seed's generator: [K, F, C, k, k]."""
        device = group.weight.device
        draws = [draw_filters(group.single_shape, self.init, g, device) for g in self.generators]
        return draws[0].unsqueeze(0) if len(draws) == 1 else torch.stack(draws)


class Scheme:
    """No-op scheme: `baseline` and `batchnorm` (the model itself differs) use it as is."""

    def __init__(self) -> None:
        self.reinit_fallbacks: list[int] = []

    def prepare(self, model: torch.nn.Module, generators: list[torch.Generator]) -> None:
        """Called once on the fresh model, before the optimizer exists (edge-popup swaps what trains)."""

    def parameters(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """What the optimizer updates: the model's trainable parameters unless the scheme says otherwise."""
        return [p for p in model.parameters() if p.requires_grad]

    def setup(self, ctx: TrainContext) -> None:
        """Called once after the model and optimizer exist (and after a resume)."""
        if len(self.reinit_fallbacks) != len(ctx.generators):
            self.reinit_fallbacks = [0] * len(ctx.generators)

    def steps_to_skip(self, ctx: TrainContext, epoch: int, steps_per_epoch: int) -> int:
        """Optimizer steps at the start of epoch `epoch` the trial does not train (IMP's rewound rounds
        may start at their rewind point). An epoch skipped whole is neither trained nor evaluated nor
        recorded, so it draws no batch order either."""
        return 0

    def after_backward(self, ctx: TrainContext) -> None:
        """Gradients are ready, the optimizer has not stepped."""

    def after_step(self, ctx: TrainContext, cgns: list[torch.Tensor]) -> None:
        """The optimizer has stepped; `cgns` are this minibatch's per-layer [K, F] CGN tensors."""

    def on_epoch_end(self, ctx: TrainContext, epoch: int) -> None:
        """Epoch `epoch` (0-based) is complete and has been evaluated."""

    def epoch_metrics(self, seed_index: int) -> dict[str, float | int | bool]:
        """Extra per-epoch columns for the seed at `seed_index` (e.g. IMP's round and sparsity), as
        they stood when the epoch that just ended was evaluated."""
        return {}

    def sparsity(self, seed_index: int) -> float:
        """Share of the seed's conv/linear weights held at zero by the scheme at the end."""
        return 0.0

    def dropped_masks(self) -> list[torch.Tensor] | None:
        """Filters currently masked out, per layer [K, F] (True = dropped), or None when none are."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"reinit_fallbacks": list(self.reinit_fallbacks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reinit_fallbacks = list(state.get("reinit_fallbacks", []))
