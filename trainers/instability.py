"""Instability between two fate-clock children: the error barrier on the straight line between them.

Frankle et al. (2020), "Linear mode connectivity and the lottery ticket hypothesis", §2: train two
copies of a network forked at step k with different data order, evaluate the test error of
(1 - a) w1 + a w2 at evenly spaced a, and call the maximum error along the path minus the mean of
the two ends the instability. Near 0, the two copies found one linearly connected basin: the
outcome was fixed by step k; large, the data order after k still decides. Every floating-point
tensor of the state dict is interpolated (BatchNorm's running statistics included); integer
buffers (BatchNorm's batch count) are taken from the first child.
"""

from __future__ import annotations

import numpy as np
import torch

from trainers.config import TrialConfig
from trainers.data import LoadedData
from trainers.loop import evaluate
from trainers.pack import build_pack

POINTS = 11  # a = 0, 0.1, ..., 1, as in Frankle et al. (2020)


def path_errors(
    config: TrialConfig,
    first: dict[str, torch.Tensor],
    second: dict[str, torch.Tensor],
    data: LoadedData,
    points: int = POINTS,
) -> list[float]:
    """Test error (a fraction) at each of `points` evenly spaced points from `first` to `second`."""
    model = build_pack(config, [config.seed], data).to(data.x_test.device)
    errors = []
    for a in np.linspace(0.0, 1.0, points):
        mixed = {
            name: torch.lerp(first[name], second[name], float(a))
            if first[name].is_floating_point()
            else first[name]
            for name in first
        }
        model.load_state_dict(mixed)
        _, correct = evaluate(model, data.x_test, data.y_test)
        errors.append(1.0 - float(correct[0]) / len(data.y_test))
    return errors


def instability(errors: list[float]) -> float:
    """Maximum error along the path minus the mean error of its two ends (>= 0 up to noise)."""
    return max(errors) - (errors[0] + errors[-1]) / 2
