"""Your own data, for `data: {name: custom, loader: "data.py:load"}`.

The loader is called as load(**data.kwargs) and returns (train_x, train_y, test_x, test_y): float or
uint8 tensors N x C x H x W and int64 labels 0..K-1. The tool then applies data.image_size,
val_fraction, normalize and augment (seeded by data_seed) exactly as to its built-in sets, and records
the SHA-256 of these tensors as the data's fingerprint.

This one uses scikit-learn's bundled 8x8 handwritten digits (no download), scaled to 0..255 uint8,
with a fixed split: the first `train` images train, the rest test.
"""

from __future__ import annotations

import torch


def load(*, train: int = 1347) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images * (255 / 16)).round().to(torch.uint8)[:, None]  # N x 1 x 8 x 8
    y = torch.from_numpy(digits.target).long()
    return x[:train], y[:train], x[train:], y[train:]
