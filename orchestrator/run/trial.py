"""Run one trial, or a pack of seeds of one configuration, into trial directories.

A trial directory with result.json is never trained again; an unfinished one resumes from
the newest checkpoint. A pack keeps one checkpoint for all its seeds in its own directory
(`<sweep_dir>/packs/<pack_key>/`) and writes each seed's records into that seed's own trial
directory, so aggregation, MLflow and `lottery sync` see one trial per seed either way.
"""

from __future__ import annotations

import hashlib
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from orchestrator.layout import CHECKPOINT, TrialDirSink, read_result
from trainers.config import TrialConfig
from trainers.data import LoadedData
from trainers.events import CgnTrace, EpochRecord, TrialResult
from trainers.loop import train

EpochHook = Callable[[EpochRecord], None]
CheckpointHook = Callable[[int, dict[str, Any]], None]


class PackSink:
    """Routes each seed's records to its trial directory; the pack's checkpoint goes to `pack_dir`.

    For a single trial, pack_dir is the trial directory itself. Seeds that already have a
    result (e.g. diverged before a restart) are not rewritten.
    """

    def __init__(
        self,
        sinks: dict[int, TrialDirSink],
        pack_dir: Path,
        on_epoch: EpochHook | None = None,
        on_checkpoint: CheckpointHook | None = None,
    ) -> None:
        self.sinks = sinks
        self.pack_dir = pack_dir
        self._epoch_hook = on_epoch
        self._checkpoint_hook = on_checkpoint

    def _live(self, seed: int) -> TrialDirSink | None:
        sink = self.sinks[seed]
        return None if read_result(sink.dir) is not None else sink

    def on_epoch(self, record: EpochRecord, trace: CgnTrace) -> None:
        sink = self._live(record.seed)
        if sink is not None:
            sink.on_epoch(record, trace)
            if self._epoch_hook:
                self._epoch_hook(record)

    def on_checkpoint(self, epoch: int, state: dict[str, Any]) -> None:
        self.pack_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.pack_dir / f".{CHECKPOINT}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.pack_dir / CHECKPOINT)
        if self._checkpoint_hook:
            self._checkpoint_hook(epoch, state)

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


def load_checkpoint(directory: Path) -> dict[str, Any] | None:
    path = directory / CHECKPOINT
    # Our own files, loaded without arbitrary code execution all the same.
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def run_trials(
    configs: list[TrialConfig],
    trial_dirs: list[Path],
    *,
    sweep: str,
    pack_dir: Path | None = None,
    data: LoadedData | None = None,
    resume: dict[str, Any] | None = None,
    on_epoch: EpochHook | None = None,
    on_checkpoint: CheckpointHook | None = None,
) -> list[dict[str, Any]]:
    """Train the seeds (one configuration) that have no result yet; returns every seed's result doc.

    `resume` (e.g. from a Ray Tune checkpoint) wins over the pack directory's own checkpoint.
    Without a checkpoint, only unfinished seeds are trained, together.
    """
    if len({c.config_hash() for c in configs}) != 1:
        raise ValueError("a pack holds seeds of one configuration")
    pack_dir = pack_dir or trial_dirs[0]
    sinks = {c.seed: TrialDirSink(d, c, sweep) for c, d in zip(configs, trial_dirs, strict=True)}
    state = resume if resume is not None else load_checkpoint(pack_dir)
    if state is not None:
        seeds = list(state["progress"]["seeds"])
    else:
        seeds = [c.seed for c, d in zip(configs, trial_dirs, strict=True) if read_result(d) is None]
    if seeds:
        sink = PackSink(sinks, pack_dir, on_epoch=on_epoch, on_checkpoint=on_checkpoint)
        try:
            train(configs[0], sink, seeds=seeds, pack_size=len(seeds), resume=state, data=data)
        except Exception:
            sink.on_error(traceback.format_exc())
            raise
        (pack_dir / CHECKPOINT).unlink(missing_ok=True)
    return [read_result(d) or {} for d in trial_dirs]


def run_trial(
    config: TrialConfig,
    trial_dir: Path,
    *,
    sweep: str,
    data: LoadedData | None = None,
    resume: dict[str, Any] | None = None,
    on_epoch: EpochHook | None = None,
    on_checkpoint: CheckpointHook | None = None,
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
    )[0]
