"""Training-time data augmentation, applied to each minibatch on the device.

`crop_flip` is the standard CIFAR recipe (He et al. 2016): pad 4 pixels with zeros, take a random
window of the original size, mirror it left-right with probability 1/2. The data are already
normalised when they reach the loop, so the zero padding is the training mean (per channel, or per
pixel under `data.normalize: mean_image`); torchvision's RandomCrop(padding=4) pads black pixels
before normalising instead, which differs only in the value of the padded border.

The draws come from the loop's data_seed generator, one call per epoch right after the epoch's
permutation, indexed by position in that epoch's order. So every scheme and every seed of a pack
sees the same augmented batches for one data_seed (trials stay paired), a data_seed always gives
the same batches, and `none` draws nothing (its random stream, and its results, are unchanged).
The epoch's draws are moved to the device once; each step only slices them, with no host work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAD = 4  # pixels of zero padding on each side before the random crop
_SHIFTS = 2 * PAD + 1  # crop offsets 0..2*PAD per axis


def draw_epoch(augment: str, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor | None:
    """[n, 3] int64 (row offset, column offset, flip) for the n positions of one epoch, on `device`.

    One draw of a single code per position (uniform over offsets x offsets x flip), so the three are
    independent and uniform and the generator advances by one call. None, drawing nothing, for "none".
    """
    if augment == "none":
        return None
    if augment != "crop_flip":
        raise ValueError(f"data.augment: unknown augmentation {augment!r}; choose none or crop_flip")
    code = torch.randint(0, _SHIFTS * _SHIFTS * 2, (n,), generator=generator, device=generator.device)
    draws = torch.stack([code // (2 * _SHIFTS), (code // 2) % _SHIFTS, code % 2], dim=1)
    return draws.to(device)


def crop_flip(x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Each image of x [B, C, H, W] cropped from its zero-padded self and maybe mirrored, per draws [B, 3].

    Two gathers over the padded batch (rows, then columns): no Python loop over images, no host sync.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    row0, col0, flip = draws[:, 0:1], draws[:, 1:2], draws[:, 2:3]
    rows = row0 + torch.arange(h, device=x.device)  # [B, H]
    cols = torch.arange(w, device=x.device)
    cols = col0 + torch.where(flip.bool(), w - 1 - cols, cols)  # [B, W]: a mirror reads right to left
    picked = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * PAD))
    return picked.gather(3, cols[:, None, None, :].expand(b, c, h, w))
