"""The durable record of one trial: a directory written before anything reaches MLflow.

Layout (`<sweep_dir>/trials/<trial_key>/`):
  config.json        resolved trial config plus its identities (trial_key, config_hash, pair_key)
  metrics.parquet    one row per completed epoch (EpochRecord.flat)
  layers.parquet     one row per (epoch, conv layer)
  cgn_trace.parquet  per-filter CGN: epoch, step, layer, filter, cgn, reset (step -1 = epoch mean)
  result.json        written last: its presence means the trial finished
  error.txt          the last error, when a try failed
  checkpoint.pt      latest epoch checkpoint (removed once result.json exists)

Every file is written to a temporary name and renamed, so a kill at any point
leaves either the old or the new version, never a torn file. Rows are keyed by
epoch: a trial resumed from an older checkpoint overwrites, never duplicates.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from trainers.config import TrialConfig
from trainers.events import CgnTrace, EpochRecord, TrialResult

CONFIG, METRICS, LAYERS, TRACE, RESULT, ERROR, CHECKPOINT = (
    "config.json",
    "metrics.parquet",
    "layers.parquet",
    "cgn_trace.parquet",
    "result.json",
    "error.txt",
    "checkpoint.pt",
)
TRACE_PARTS = "trace_parts"


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def atomic_write_json(path: Path, doc: Any) -> None:
    atomic_write_bytes(path, json.dumps(doc, indent=2, sort_keys=True, default=str).encode())


def atomic_write_table(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def trial_meta(config: TrialConfig, sweep: str) -> dict[str, Any]:
    """config.json: everything aggregation needs to group and pair trials without re-parsing configs."""
    return {
        "trial_key": config.trial_key(),
        "config_hash": config.config_hash(),
        "pair_key": config.pair_key(),
        "sweep": sweep,
        "scheme": config.scheme.name,
        "hparams": config.scheme_hparams(),
        "hparam_label": config.hparam_label(),
        "seed": config.seed,
        "data_seed": config.data_seed,
        "model": config.model.name,
        "dataset": config.data.name,
        "filters": config.model.filters,
        "epochs": config.epochs,
        "trial": config.model_dump(mode="json"),
    }


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_result(trial_dir: Path) -> dict[str, Any] | None:
    path = trial_dir / RESULT
    return read_json(path) if path.exists() else None


class TrialDirSink:
    """One seed's records into its trial directory (checkpoints belong to the trial's pack:
    see orchestrator/run/trial.py, where a lone seed's pack directory is its trial directory)."""

    def __init__(self, trial_dir: Path, config: TrialConfig, sweep: str) -> None:
        self.dir = trial_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / TRACE_PARTS).mkdir(exist_ok=True)
        self.config = config
        atomic_write_json(self.dir / CONFIG, trial_meta(config, sweep))
        self._metrics = self._load_rows(METRICS)
        self._layers = self._load_rows(LAYERS)

    def _load_rows(self, name: str) -> list[dict[str, Any]]:
        path = self.dir / name
        return pq.read_table(path).to_pylist() if path.exists() else []

    def on_epoch(self, record: EpochRecord, trace: CgnTrace) -> None:
        epoch = record.epoch
        self._metrics = [r for r in self._metrics if r["epoch"] < epoch] + [record.flat()]
        layer_rows = [{"epoch": epoch, **asdict(s)} for s in record.layers]
        self._layers = [r for r in self._layers if r["epoch"] < epoch] + layer_rows
        atomic_write_table(self.dir / TRACE_PARTS / f"epoch={epoch:05d}.parquet", pa.table(trace.columns()))
        atomic_write_table(self.dir / METRICS, pa.Table.from_pylist(self._metrics))
        atomic_write_table(self.dir / LAYERS, pa.Table.from_pylist(self._layers))

    def on_result(self, result: TrialResult) -> None:
        self._consolidate_trace(result.epochs_done)
        doc = result.to_dict() | {
            "trial_key": self.config.trial_key(),
            "config_hash": self.config.config_hash(),
            "scheme": self.config.scheme.name,
        }
        atomic_write_json(self.dir / RESULT, doc)
        (self.dir / CHECKPOINT).unlink(missing_ok=True)
        (self.dir / ERROR).unlink(missing_ok=True)

    def on_error(self, message: str) -> None:
        (self.dir / ERROR).write_text(message)

    def _consolidate_trace(self, epochs_done: int) -> None:
        parts = sorted((self.dir / TRACE_PARTS).glob("epoch=*.parquet"))
        keep = [p for p in parts if int(p.stem.split("=")[1]) < epochs_done]
        if keep:
            atomic_write_table(self.dir / TRACE, pa.concat_tables(pq.read_table(p) for p in keep))
        for p in parts:
            p.unlink()
        (self.dir / TRACE_PARTS).rmdir()


def read_metrics(trial_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(trial_dir / METRICS)
