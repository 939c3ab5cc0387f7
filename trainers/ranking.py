"""Filter ranking criteria for RePr. Convention: a higher score is dropped first.

Ortho is the paper's (eqs. 1-2): rows L2-normalised, P = |W^ W^T - I|,
O_f = sum(P[f]) / J. The others are the ablation criteria of RePr Fig. 3;
data-driven ones use the held-out split when there is one, else a fixed
slice of the training set, always in eval mode and in a fixed order.
Scores are [K, F] per layer: seeds of a pack are ranked independently.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from trainers.filters import FilterGroup
from trainers.layer_outputs import as_pack_logits, captured_outputs

RANK_SAMPLES = 1024  # examples used by data-driven criteria when no held-out split exists


def ortho_scores(weight: torch.Tensor) -> torch.Tensor:
    """O_l^f for every filter; weight is [J, C, k, k] (one seed) or [K, J, D] (a pack) -> [J] or [K, J]."""
    w = weight.detach().double()
    w = w.flatten(1).unsqueeze(0) if w.dim() == 4 else w
    w_hat = F.normalize(w, dim=-1)
    eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    overlap = (w_hat @ w_hat.transpose(1, 2) - eye).abs()
    scores = (overlap.sum(dim=-1) / w.shape[1]).float()
    return scores[0] if weight.dim() == 4 else scores


def pack_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits as [K, B, classes] whether the model is one seed or a pack."""
    return as_pack_logits(model(x))


def pack_loss(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over seeds of each seed's mean loss (each seed gets exactly its own gradient), and [K] sums."""
    k, b, c = logits.shape
    per_sample = F.cross_entropy(logits.reshape(k * b, c), y.repeat(k), reduction="none").view(k, b)
    per_seed = per_sample.sum(dim=1)
    return per_seed.sum() / b, per_seed


def _rank_batch(data) -> tuple[torch.Tensor, torch.Tensor]:
    if len(data.y_val):
        return data.x_val, data.y_val
    return data.x_train[:RANK_SAMPLES], data.y_train[:RANK_SAMPLES]


def _activation_stats(
    model: torch.nn.Module, groups: list[FilterGroup], x: torch.Tensor, y: torch.Tensor, with_grad: bool
) -> list[dict[str, torch.Tensor]]:
    """Per (seed, channel) mean activation, zero fraction and Taylor |a * dL/da| from forward hooks."""

    def run(forward) -> None:
        with torch.set_grad_enabled(with_grad):
            loss, _ = pack_loss(forward(), y)
            if with_grad:
                loss.backward()

    captured = captured_outputs(model, groups, x, run, retain_grad=with_grad)
    stats = []
    for group, (out, grad) in zip(groups, captured, strict=True):
        a = out.reshape(out.shape[0], group.seeds, group.filters, -1)  # [B, K, F, HW]
        entry = {"mean": a.mean(dim=(0, 3)), "apoz": (a == 0).float().mean(dim=(0, 3))}
        if grad is not None:
            entry["taylor"] = (a * grad.reshape(a.shape)).mean(dim=3).abs().mean(dim=0)
        stats.append(entry)
    if with_grad:
        model.zero_grad(set_to_none=True)
    return stats


@torch.no_grad()
def _accuracy_and_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[2, K]: accuracy and mean loss per seed."""
    logits = pack_logits(model, x)
    _, per_seed = pack_loss(logits, y)
    return torch.stack([(logits.argmax(-1) == y).float().mean(dim=1), per_seed / len(y)])


@torch.no_grad()
def oracle_scores(model: torch.nn.Module, groups: list[FilterGroup], x, y) -> list[torch.Tensor]:
    """Accuracy drop when a filter alone is zeroed; the smallest drop goes first (loss breaks ties).

    In a pack, filter f is zeroed in every seed at once: seeds do not interact, so each seed's
    accuracy is exactly its own single-filter ablation.
    """
    was_training = model.training
    model.eval()
    base = _accuracy_and_loss(model, x, y)
    scores = []
    for group in groups:
        tensors = [group.rows(t) for t in (group.weight, group.bias) if t is not None]
        if group.bn is not None and group.bn.bias is not None:
            tensors.append(group.rows(group.bn.bias))
        layer_scores = torch.empty(group.seeds, group.filters, device=group.weight.device)
        for f in range(group.filters):
            saved = [t[:, f].clone() for t in tensors]
            for t in tensors:
                t[:, f] = 0
            acc, loss = _accuracy_and_loss(model, x, y)
            layer_scores[:, f] = -((base[0] - acc) + 1e-6 * (loss - base[1]))
            for t, s in zip(tensors, saved, strict=True):
                t[:, f] = s
        scores.append(layer_scores)
    model.train(was_training)
    return scores


def score_filters(
    metric: str,
    model: torch.nn.Module,
    groups: list[FilterGroup],
    data,
    epoch_cgn: list[torch.Tensor],
    generators: list[torch.Generator],
) -> list[torch.Tensor]:
    """Per-layer [K, F] scores (higher = drop first) for the chosen RePr criterion."""
    device = groups[0].weight.device

    def random_scores() -> list[torch.Tensor]:
        # Layer by layer from each seed's own generator: the same draws as that seed alone.
        return [
            torch.stack([torch.rand(g.filters, generator=gen, device=gen.device) for gen in generators]).to(
                device
            )
            for g in groups
        ]

    simple: dict[str, Callable[[], list[torch.Tensor]]] = {
        "ortho": lambda: [ortho_scores(g.rows(g.weight)) for g in groups],
        "weight": lambda: [-g.rows(g.weight).detach().norm(dim=-1) for g in groups],
        "cgn": lambda: [-c for c in epoch_cgn],
        "random": random_scores,
    }
    if metric in simple:
        return simple[metric]()
    x, y = _rank_batch(data)
    if metric == "oracle":
        return oracle_scores(model, groups, x, y)
    stats = _activation_stats(model, groups, x, y, with_grad=metric == "taylor")
    if metric == "activation":
        return [-s["mean"] for s in stats]
    if metric == "apoz":
        return [s["apoz"] for s in stats]
    if metric == "taylor":
        return [-s["taylor"] for s in stats]
    raise ValueError(f"scheme.metric: unknown ranking metric {metric!r}")


def global_drop_masks(
    scores: list[torch.Tensor], eligible: list[bool], fraction: float, *, of_all: bool = False
) -> list[torch.Tensor]:
    """Drop the top-scored filters of one seed, ranked globally over the eligible layers.

    How many: `fraction` of the eligible filters, or with `of_all` of every filter, the excluded
    first layer included (C3(32) at p = 0.3: 19 of the 64 eligible, or 29 of all 96; either way only
    eligible filters are dropped). scores are per-layer [F] tensors of one seed; every layer keeps at
    least one filter.
    """
    device = scores[0].device
    masks = [torch.zeros(len(s), dtype=torch.bool, device=device) for s in scores]
    pool = [(i, s) for i, (s, ok) in enumerate(zip(scores, eligible, strict=True)) if ok]
    if not pool:
        return masks
    flat = torch.cat([s for _, s in pool])
    owner = torch.cat([torch.full((len(s),), i) for i, s in pool]).tolist()
    index = torch.cat([torch.arange(len(s)) for _, s in pool]).tolist()
    n_drop = int(round(fraction * (sum(len(s) for s in scores) if of_all else len(flat))))
    order = torch.sort(flat, descending=True, stable=True).indices.tolist()
    left = {i: len(s) for i, s in pool}
    for k in order:
        if n_drop == 0:
            break
        i = owner[k]
        if left[i] > 1:
            masks[i][index[k]] = True
            left[i] -= 1
            n_drop -= 1
    return masks
