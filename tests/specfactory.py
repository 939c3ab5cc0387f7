"""Tiny sweep specs for tests and benchmarks: one place for the base they train and the fields they share.

`spec_doc` gives a spec as a dict (seeds 0 and 1, one baseline arm on `BASE`), `write_spec` writes it as
`<directory>/<name>.yaml`; every other field is passed as a keyword and replaces the default whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# Digits, a 2-filter crater_cnn with a 16-wide hidden layer, Adam, on the CPU: a trial trains in seconds.
BASE: dict[str, Any] = {
    "data": {"name": "digits"},
    "model": {"name": "crater_cnn", "filters": 2, "hidden_fc": 16},
    "optim": {"name": "adam", "lr": 0.002},
    "epochs": 3,
    "device": "cpu",
}
# For specs that are planned, never trained: 200 generated samples, nothing to download.
PLANNED_BASE: dict[str, Any] = {
    "data": {"name": "synthetic", "synthetic_samples": 200},
    "model": {"name": "crater_cnn", "filters": 2, "hidden_fc": 16},
    "epochs": 2,
    "device": "cpu",
}
BASELINE = [{"name": "baseline"}]
# The baseline and RandomOut with a tau that resets filters in a few epochs: both arms of a comparison.
TWO_ARMS = [{"name": "baseline"}, {"name": "randomout", "params": {"tau": 1e-6}}]


def spec_doc(name: str, **fields: Any) -> dict[str, Any]:
    """A sweep spec named `name`: `BASE`, seeds 0 and 1, the baseline arm; `fields` replace or add fields."""
    return {"name": name, "base": BASE, "seeds": [0, 1], "schemes": BASELINE} | fields


def write_spec(directory: Path, name: str, **fields: Any) -> Path:
    """`spec_doc(name, **fields)` written as `<directory>/<name>.yaml`."""
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec_doc(name, **fields)))
    return path
