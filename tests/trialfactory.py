"""Small trial configs for tests: digits, a tiny crater_cnn, Adam; `a__b=v` sets nested fields."""

from __future__ import annotations

from trainers.config import TrialConfig


def config(**overrides) -> TrialConfig:
    doc = {
        "data": {"name": "digits"},
        "model": {"name": "crater_cnn", "filters": 4, "hidden_fc": 32, "init": "xavier"},
        "optim": {"name": "adam", "lr": 0.003},
        "epochs": 3,
        "batch_size": 64,
        "seed": 3,
    }
    for key, value in overrides.items():
        node = doc
        *path, last = key.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return TrialConfig.model_validate(doc)
