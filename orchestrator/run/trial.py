"""Run one trial, or a pack of seeds of one configuration, into trial directories.

A trial directory with result.json is never trained again; an unfinished one resumes from
the newest checkpoint. A pack keeps one checkpoint for all its seeds in its own directory
(`<sweep_dir>/packs/<pack_key>/`) and writes each seed's records into that seed's own trial
directory, so aggregation, MLflow and `lottery sync` see one trial per seed either way.
Rows are keyed by epoch: a trial resumed from an older checkpoint overwrites, never duplicates.
"""

from __future__ import annotations

import hashlib
import io
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import torch

from orchestrator.layout import (
    CGN_FIGURE,
    CHECKPOINT,
    CONFIG,
    ERROR,
    FINAL_WEIGHTS,
    LAYERS,
    METRICS,
    RESULT,
    TRACE,
    TRACE_PARTS,
    Location,
    TrialStatus,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_table,
    read_checkpoint_bytes,
    read_table,
    trace_part,
    trace_parts,
    trial_status,
)
from orchestrator.run.policy import before_training
from orchestrator.storage_fault import StorageFault
from orchestrator.tracking.names import run_name
from trainers.config import TrialConfig
from trainers.data import LoadedData
from trainers.errors import DataError
from trainers.events import CgnTrace, EpochRecord, TrialResult
from trainers.loop import train

EpochHook = Callable[[EpochRecord], None]
CheckpointHook = Callable[[int, dict[str, Any]], None]


def trial_meta(config: TrialConfig, sweep: str, *, run_figure: bool = True) -> dict[str, Any]:
    """config.json: everything aggregation needs to group and pair trials without re-parsing configs,
    and whether the run's CGN figure was asked for (so tracking does not draw one either)."""
    return {
        "run_figure": run_figure,
        "trial_key": config.trial_key(),
        "config_hash": config.config_hash(),
        "pair_key": config.pair_key(),
        "reference_hash": config.reference_hash(),
        "sweep": sweep,
        "scheme": config.scheme.name,
        "hparams": config.scheme_hparams(),
        "hparam_label": config.hparam_label(),
        "seed": config.seed,
        "data_seed": config.data_seed,
        **config.source_seeds(),
        **config.lineage(),
        "model": config.model.name,
        "dataset": config.data.name,
        # A custom net's width is whatever its builder makes of its kwargs: model.filters means nothing there.
        "filters": None if config.model.name == "custom" else config.model.filters,
        "epochs": config.epochs,
        "trial": config.model_dump(mode="json"),
    }


class TrialDirSink:
    """One seed's records into its trial directory (checkpoints belong to the trial's pack: see
    PackSink, where a lone seed's pack directory is its trial directory)."""

    def __init__(
        self,
        trial_dir: Location,
        config: TrialConfig,
        sweep: str,
        *,
        run_figure: bool = True,
        status: TrialStatus | None = None,
        pack: str | None = None,
    ) -> None:
        self.dir = trial_dir
        self.config = config
        self.run_figure = run_figure
        self.pack = pack  # the key of the pack it trains in (packs/<pack>/), None when alone
        # Read once (or given by the caller, who read it): only this sink writes the result, so it knows
        # when that changes (on an object store every status check would be a request per seed per epoch).
        status = status if status is not None else trial_status(self.dir)
        self.finished = status.finished
        self.result = status.result  # the stored result, or the one on_result writes
        if not self.finished:  # a finished trial's directory is never written again (a pack mate's)
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / TRACE_PARTS).mkdir(exist_ok=True)
            atomic_write_json(self.dir / CONFIG, trial_meta(config, sweep, run_figure=run_figure))
        self._metrics = self._load_rows(METRICS)
        self._layers = self._load_rows(LAYERS)

    def _load_rows(self, name: str) -> list[dict[str, Any]]:
        path = self.dir / name
        try:
            return read_table(path).to_pylist()
        except FileNotFoundError:
            return []

    def on_epoch(self, record: EpochRecord, trace: CgnTrace) -> None:
        epoch = record.epoch
        self._metrics = [r for r in self._metrics if r["epoch"] < epoch] + [record.flat()]
        layer_rows = [{"epoch": epoch, **asdict(s)} for s in record.layers]
        self._layers = [r for r in self._layers if r["epoch"] < epoch] + layer_rows
        atomic_write_table(trace_part(self.dir, epoch), pa.table(trace.columns()))
        atomic_write_table(self.dir / METRICS, pa.Table.from_pylist(self._metrics))
        atomic_write_table(self.dir / LAYERS, pa.Table.from_pylist(self._layers))

    def on_weights(self, seed: int, state: dict[str, Any]) -> None:
        """A fate-clock child's final weights, written before its result (so a result means they exist)."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.dir / FINAL_WEIGHTS, buffer.getvalue())

    def on_result(self, result: TrialResult) -> None:
        trace = self._consolidate_trace(result.epochs_done)
        doc = result.to_dict() | {
            "trial_key": self.config.trial_key(),
            "config_hash": self.config.config_hash(),
            "scheme": self.config.scheme.name,
            "pack_key": self.pack,
            "ended_at": time.time(),  # the MLflow run ends here (and starts seed_wall_s earlier)
        }
        if trace is not None and trace.num_rows and self.run_figure:  # a net without convs has no filters
            self._draw_cgn_figure(trace, doc)
        atomic_write_json(self.dir / RESULT, doc)
        self.finished = True
        self.result = doc
        (self.dir / CHECKPOINT).unlink(missing_ok=True)
        (self.dir / ERROR).unlink(missing_ok=True)

    def on_error(self, message: str) -> None:
        (self.dir / ERROR).write_text(message)

    def _consolidate_trace(self, epochs_done: int) -> pa.Table | None:
        parts = trace_parts(self.dir)
        keep = [path for epoch, path in parts if epoch < epochs_done]
        trace = pa.concat_tables(read_table(p) for p in keep) if keep else None
        if trace is not None:
            atomic_write_table(self.dir / TRACE, trace)
        for _, path in parts:
            path.unlink()
        (self.dir / TRACE_PARTS).rmdir()
        return trace

    def _draw_cgn_figure(self, trace: pa.Table, result: dict[str, Any]) -> None:
        """The run page's per-filter CGN figure, drawn here rather than in the driver.

        The driver logs every trial in one process; drawing there (~0.3 s a trial) capped a whole
        cluster at a few trials a second and took CPU from the trials on a small machine. A drawing
        that fails costs the figure only: the driver draws it from the trace instead.
        """
        from dashboards.cgn_figure import cgn_figure_png, scheme_tau  # matplotlib once per worker process

        tau = scheme_tau(self.config.scheme_hparams())
        try:
            png = cgn_figure_png(trace.to_pandas(), run_name(trial_meta(self.config, ""), result), tau=tau)
        except Exception as exc:
            print(f"warning: {CGN_FIGURE} not drawn ({type(exc).__name__}: {exc})", file=sys.stderr)
            return
        atomic_write_bytes(self.dir / CGN_FIGURE, png)


class PackSink:
    """Routes each seed's records to its trial directory; the pack's checkpoint goes to `pack_dir`.

    For a single trial, pack_dir is the trial directory itself. Seeds that already have a
    result (e.g. diverged before a restart) are not rewritten.
    """

    def __init__(
        self,
        sinks: dict[int, TrialDirSink],
        pack_dir: Location,
        on_epoch: EpochHook | None = None,
        on_checkpoint: CheckpointHook | None = None,
    ) -> None:
        self.sinks = sinks
        self.pack_dir = pack_dir
        self._epoch_hook = on_epoch
        self._checkpoint_hook = on_checkpoint

    def _live(self, seed: int) -> TrialDirSink | None:
        sink = self.sinks[seed]
        return None if sink.finished else sink

    def on_epoch(self, record: EpochRecord, trace: CgnTrace) -> None:
        sink = self._live(record.seed)
        if sink is not None:
            sink.on_epoch(record, trace)
            if self._epoch_hook:
                self._epoch_hook(record)

    def on_checkpoint(self, epoch: int, state: dict[str, Any]) -> None:
        self.pack_dir.mkdir(parents=True, exist_ok=True)
        # Serialised in memory, then written by the file layer: torch.save on a full disk raises an
        # opaque RuntimeError, a plain write an OSError whose errno says the disk is full.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.pack_dir / CHECKPOINT, buffer.getvalue())
        if self._checkpoint_hook:
            self._checkpoint_hook(epoch, state)

    def on_weights(self, seed: int, state: dict[str, Any]) -> None:
        sink = self._live(seed)
        if sink is not None:
            sink.on_weights(seed, state)

    def on_result(self, result: TrialResult) -> None:
        sink = self._live(result.seed)
        if sink is not None:
            sink.on_result(result)

    def on_error(self, message: str) -> None:
        for seed in self.sinks:
            sink = self._live(seed)
            if sink is not None:
                sink.on_error(message)


def pack_key(configs: list[TrialConfig]) -> str:
    return hashlib.sha256("".join(c.trial_key() for c in configs).encode()).hexdigest()[:16]


def load_checkpoint(directory: Location) -> dict[str, Any] | None:
    payload = read_checkpoint_bytes(directory / CHECKPOINT)
    # Our own files, loaded without arbitrary code execution all the same.
    return None if payload is None else torch.load(payload, map_location="cpu", weights_only=True)


class DataChanged(DataError):
    """A stored result was trained on other data than the data loaded now: never reported as this trial."""


def data_fingerprint(data: LoadedData) -> str:
    """What a result records of its data ("" for generated data, which has no files)."""
    return data.fingerprint if data.files else ""


def run_trials(
    configs: list[TrialConfig],
    trial_dirs: list[Location],
    *,
    sweep: str,
    pack_dir: Location | None = None,
    data: LoadedData | None = None,
    resume: dict[str, Any] | None = None,
    on_epoch: EpochHook | None = None,
    on_checkpoint: CheckpointHook | None = None,
    run_figures: bool = True,
    statuses: list[TrialStatus] | None = None,
) -> list[dict[str, Any]]:
    """Train the seeds (one configuration) that have no result yet; returns every seed's result doc.

    `resume` (e.g. from a Ray Tune checkpoint) wins over the pack directory's own checkpoint.
    Without a checkpoint, only unfinished seeds are trained, together. `run_figures`: each seed
    draws its MLflow run's CGN figure. `statuses`: each trial directory's status, read by the caller
    (orchestrator/run/policy.py's rule applies to them here; a worker call reads each status once).
    """
    if len({c.pack_hash() for c in configs}) != 1:
        raise ValueError("a pack holds seeds of one configuration")
    if statuses is None:
        statuses = [trial_status(d) for d in trial_dirs]
    if data is not None:
        # Checked before any sink rewrites config.json: the stored trial stays as it was.
        before_training(
            trial_dirs, data_fingerprint(data), statuses=statuses, error=DataChanged, set_aside=False
        )
    pack_dir = pack_dir or trial_dirs[0]
    pack = pack_key(configs) if len(configs) > 1 else None
    sinks = {
        c.seed: TrialDirSink(d, c, sweep, run_figure=run_figures, status=s, pack=pack)
        for c, d, s in zip(configs, trial_dirs, statuses, strict=True)
    }
    state = resume if resume is not None else load_checkpoint(pack_dir)
    if state is not None:
        seeds = list(state["progress"]["seeds"])
    else:
        seeds = [c.seed for c in configs if not sinks[c.seed].finished]
    if seeds:
        sink = PackSink(sinks, pack_dir, on_epoch=on_epoch, on_checkpoint=on_checkpoint)
        try:
            train(configs[0], sink, seeds=seeds, pack_size=len(seeds), resume=state, data=data)
        except StorageFault:
            raise  # the storage's fault, not the trial's: no error.txt (which could not be written either)
        except Exception:
            sink.on_error(traceback.format_exc())
            raise
        (pack_dir / CHECKPOINT).unlink(missing_ok=True)
    return [sinks[c.seed].result or {} for c in configs]


def run_trial(
    config: TrialConfig,
    trial_dir: Location,
    *,
    sweep: str,
    data: LoadedData | None = None,
    resume: dict[str, Any] | None = None,
    on_epoch: EpochHook | None = None,
    on_checkpoint: CheckpointHook | None = None,
    status: TrialStatus | None = None,
) -> dict[str, Any]:
    """One seed alone: its trial directory holds its checkpoint."""
    return run_trials(
        [config],
        [trial_dir],
        sweep=sweep,
        data=data,
        resume=resume,
        on_epoch=on_epoch,
        on_checkpoint=on_checkpoint,
        statuses=None if status is None else [status],
    )[0]
