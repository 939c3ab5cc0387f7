"""A trial's data streams: the batch-order generator and, when split off, the augmentation one.

The seed split by source (docs/seeds.md): `order_seed` draws the batch order, `augment_seed` the
augmentation draws. Unsplit (both None), one generator seeded from data_seed serves both, as every
trial did before the split, so old trials keep their numbers. The init seed's generators (weights,
the scheme's draws) are trainers.models.derive_seeds'.
"""

from __future__ import annotations

import torch

from trainers.config import TrialConfig


def source_generators(config: TrialConfig) -> tuple[torch.Generator, torch.Generator | None]:
    """The batch-order generator and, when the trial splits it off, the augmentation generator.

    Unsplit (order_seed None), order comes from data_seed, and augmentation shares that stream: the
    numbers of every trial from before the split. The init seed's generators are trainers.models'."""
    order = config.data_seed if config.order_seed is None else config.order_seed
    data_gen = torch.Generator().manual_seed(order)
    if config.augment_seed is None:
        return data_gen, None
    return data_gen, torch.Generator().manual_seed(config.augment_seed)
