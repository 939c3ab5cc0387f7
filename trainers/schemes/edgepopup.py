"""Edge-popup (Ramanujan et al. 2020): a supermask over frozen random weights.

Every conv and linear layer keeps its random weights W0 (drawn once per seed, from the seed's own
scheme generator) and gets a score S of the same shape. The forward pass uses W0 * m, with m the
top `k` fraction of |S| in the layer (k = fraction KEPT); the backward pass is straight-through:
dL/dS = dL/dW_eff * W0 * sign(S), as `GetSubnet` in allenai/hidden-networks.

The layer's weight parameter holds W_eff = W0 * m, so the model, packs, CGN and checkpoints need
nothing new: after backward the scheme turns the weight's gradient into the scores' gradient (and
drops the weight's), the loop's optimizer steps the scores (`parameters`), and after the step
W_eff is recomputed. Biases and BatchNorm shifts are frozen at their initial zeros.

Weights (`weights`), with fan_in and the ReLU gain as in hidden-networks: `kaiming_normal`
N(0, 2 / fan_in); `signed_constant` sign of that same draw times sqrt(2 / fan_in). Scores start
as U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5), as there).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from trainers.config import EdgePopupScheme
from trainers.masks import MaskedWeight, masked_weights, top_fraction
from trainers.schemes.base import Scheme, TrainContext


class EdgePopup(Scheme):
    def __init__(self, cfg: EdgePopupScheme) -> None:
        super().__init__()
        self.cfg = cfg
        self.weights: list[MaskedWeight] = []
        self.frozen: list[torch.Tensor] = []  # W0 per layer, in the weight's layout
        self.scores: list[torch.Tensor] = []  # leaves the optimizer trains

    @torch.no_grad()
    def prepare(self, model: torch.nn.Module, generators: list[torch.Generator]) -> None:
        self.weights = masked_weights(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for w in self.weights:
            w.weight.requires_grad_(True)  # for dL/dW_eff only; its own gradient is dropped
            std = math.sqrt(2.0 / w.fan_in)
            drawn, scores = [], []
            for g in generators:  # per seed, so a seed draws the same in a pack as alone
                normal = torch.randn(w.single_shape, generator=g, device=g.device) * std
                drawn.append(normal.sign() * std if self.cfg.weights == "signed_constant" else normal)
                bound = 1.0 / math.sqrt(w.fan_in)
                scores.append(torch.rand(w.single_shape, generator=g, device=g.device) * 2 * bound - bound)
            device = w.weight.device
            self.frozen.append(w.stacked_like(drawn).to(device))
            self.scores.append(w.stacked_like(scores).to(device).requires_grad_(True))
        self._refresh()

    def parameters(self, model: torch.nn.Module) -> list[torch.Tensor]:
        return self.scores

    def masks(self) -> list[torch.Tensor]:
        """Per layer [K, N], True = kept: the top k of |score| per seed."""
        pairs = zip(self.weights, self.scores, strict=True)
        return [top_fraction(w.per_seed(s), self.cfg.k) for w, s in pairs]

    @torch.no_grad()
    def _refresh(self) -> None:
        for w, w0, mask in zip(self.weights, self.frozen, self.masks(), strict=True):
            w.weight.copy_(w0 * mask.view(w.weight.shape))

    @torch.no_grad()
    def after_backward(self, ctx: TrainContext) -> None:
        for w, w0, s in zip(self.weights, self.frozen, self.scores, strict=True):
            grad = w.weight.grad
            s.grad = None if grad is None else grad * w0 * s.sign()
            w.weight.grad = None  # the weights never move

    def after_step(self, ctx: TrainContext, cgns: list[torch.Tensor]) -> None:
        self._refresh()

    def sparsity(self, seed_index: int) -> float:
        kept = sum(int(m[seed_index].sum()) for m in self.masks())
        return 1.0 - kept / sum(m.shape[1] for m in self.masks())

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"frozen": self.frozen, "scores": [s.detach() for s in self.scores]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        # In place: the optimizer holds these very tensors.
        for mine, saved in zip(self.frozen + self.scores, state["frozen"] + state["scores"], strict=True):
            mine.copy_(saved)
        self._refresh()
