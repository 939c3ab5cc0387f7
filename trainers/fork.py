"""The fate clock's fork: a child leaves its parent's data streams at a chosen step.

A child (TrialConfig.fork) is its parent up to step k = round(at x the trial's optimizer steps): the
same init seed, the same batches, the same augmentation draws, so on CPU its first k steps are the
parent's bit for bit and nothing needs to pass between the two trials (no checkpoint to share, no
order in which they must run; a child recomputes those k steps, a fraction `at` of the parent's
cost). At step k the child's batch-order and augmentation generators are re-seeded from its own
child index, and the rest of the current epoch is re-drawn from them: the positions not yet
visited are permuted anew and get new augmentation draws. Every later epoch draws from the
child's streams. Children of one parent differ only after k, which is what Frankle et al. (2020)
fork to ask: has training settled the outcome by step k?

The child's final weights are kept (`final_weights.pt`): the instability between two children,
the error barrier along the straight line between their weights, is measured from them
(trainers/instability.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from trainers.augment import draw_epoch
from trainers.config import TrialConfig
from trainers.data import LoadedData
from trainers.pack import build_pack

FORK_STREAM_TAG = 0x666F726B  # "fork": keeps a child's streams apart from any seed's own


def child_stream_seeds(config: TrialConfig) -> tuple[int, int]:
    """(batch order, augmentation) seeds of a child after its fork, from the stream it leaves and its
    index: children of one parent differ, and a child's streams are the same at every fork point."""
    assert config.fork is not None
    base = config.data_seed if config.order_seed is None else config.order_seed
    order, augment = np.random.SeedSequence([base, config.fork.child, FORK_STREAM_TAG]).generate_state(2)
    return int(order), int(augment)


def fork_step(config: TrialConfig, n_train: int, batch: int) -> int | None:
    """The optimizer step at which a child leaves its parent's streams (None: not a child)."""
    if config.fork is None:
        return None
    total = config.total_epochs * math.ceil(n_train / batch)
    return round(config.fork.at * total)


def leave_parent_streams(
    ctx, order: torch.Tensor, draws: torch.Tensor | None, start: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Re-seed the context's data generators with the child's, and re-draw the epoch's order and
    augmentation from position `start` on (the positions the epoch has not visited yet)."""
    order_seed, augment_seed = child_stream_seeds(ctx.config)
    ctx.data_gen = torch.Generator().manual_seed(order_seed)
    if ctx.augment_gen is not None:
        ctx.augment_gen = torch.Generator().manual_seed(augment_seed)
    rest = order[start:]
    shuffled = rest[torch.randperm(len(rest), generator=ctx.data_gen).to(rest.device)]
    order = torch.cat([order[:start], shuffled])
    if draws is not None:
        fresh = draw_epoch(ctx.config.data.augment, len(rest), ctx.augment_gen or ctx.data_gen, draws.device)
        draws = torch.cat([draws[:start], fresh])
    return order, draws


def seed_weights(
    model: torch.nn.Module, k: int, config: TrialConfig, seed: int, data: LoadedData
) -> dict[str, torch.Tensor]:
    """Seed k's trained state as one ordinary model's state dict, on the CPU."""
    unpack = getattr(model, "unpack", None)
    if unpack is not None:
        model = unpack(k, build_pack(config, [seed], data).to(next(model.parameters()).device))
    return {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
