"""Small trial configs for tests: digits, a tiny crater_cnn, Adam; `a__b=v` sets nested fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from orchestrator import layout
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


def stored_result(**fields: Any) -> dict[str, Any]:
    """A result.json that passes the result schema, without provenance fields (device, threads):
    a hand-written result short of the schema would be set aside as damaged instead."""
    base = {
        "epochs_done": 3,
        "final_test_acc": 0.9,
        "final_train_acc": 0.9,
        "best_test_acc": 0.9,
        "failed": False,
        "diverged": False,
        "total_resets": 0,
        "reinit_fallbacks": 0,
        "chance": 0.5,
        "failure_margin": 0.05,
        "failure_rule": "failed if final test accuracy <= 0.55",
        "wall_s": 3.0,
    }
    return base | fields


def store_finished(trial_dir: Path, result: dict[str, Any]) -> None:
    """A finished trial directory as `layout.trial_status` reads one: config.json, metrics.parquet (a row
    per epoch done) and result.json; a result.json alone is a damaged trial (its record is missing)."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    layout.atomic_write_json(trial_dir / layout.CONFIG, {"trial_key": trial_dir.name})
    epochs = pa.table({"epoch": list(range(int(result["epochs_done"])))})
    layout.atomic_write_table(trial_dir / layout.METRICS, epochs)
    layout.atomic_write_json(trial_dir / layout.RESULT, result)
