"""A small convolutional net of your own design, for `model: {name: custom, builder: "net.py:build"}`.

The builder is called as build(in_channels=C, num_classes=K, image_size=S, **model.kwargs) and
returns any torch.nn.Module mapping N x C x S x S images to N x K logits. Its filters are the output
channels of every nn.Conv2d, named by module path (e.g. `blocks.0.dw`), wherever they sit.
"""

from __future__ import annotations

from torch import nn


class DepthwiseSeparable(nn.Module):
    """A depthwise 3x3 conv (one filter per channel) then a pointwise 1x1 conv, as in MobileNet."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.pw = nn.Conv2d(channels, out_channels, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.pw(self.act(self.dw(x))))


class Net(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(
            DepthwiseSeparable(width, 2 * width), DepthwiseSeparable(2 * width, 2 * width)
        )
        self.heads = nn.ModuleDict({"pool": nn.AdaptiveAvgPool2d(1), "fc": nn.Linear(2 * width, num_classes)})

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.heads["fc"](self.heads["pool"](x).flatten(1))


def build(*, in_channels: int, num_classes: int, image_size: int, width: int = 8) -> nn.Module:
    """image_size is not needed here: global pooling takes any size."""
    return Net(in_channels, num_classes, width)
