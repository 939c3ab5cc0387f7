"""What a sweep will cost before it starts: unit-epochs x measured seconds per epoch on this device.

A rate is measured, never guessed: from the sweep's own finished trials when it has some (a stored
result's wall time over its epochs), else from a one-epoch probe of one unit per kind of unit
(scheme, model, data, batch, optimizer, pack size), trained in memory on this machine's device
and written nowhere. A probe skips RePr's drop epochs and the first epoch's one-off costs are in
it, so the estimate is a guide to the order of magnitude, stated with where each rate came from.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator import layout
from orchestrator.spec import SweepPlan
from trainers.config import TrialConfig


@dataclass(frozen=True)
class Estimate:
    unit_epochs: int  # epochs still to train, counted once per unit (a pack trains its seeds together)
    seconds: float  # sum over those unit-epochs of the measured seconds per epoch
    parallel: int  # units that run at once here
    probed: int  # kinds of unit measured by a one-epoch probe
    stored: int  # kinds of unit whose rate came from the sweep's finished trials
    device: str

    def text(self) -> str:
        if not self.unit_epochs:
            return "estimated cost: nothing left to train (every trial has a result)"
        sources = ", ".join(
            part
            for part in (
                f"{self.probed} from a one-epoch probe" if self.probed else "",
                f"{self.stored} from finished trials" if self.stored else "",
            )
            if part
        )
        return (
            f"estimated cost: {self.unit_epochs:,} unit-epochs x measured s/epoch = "
            f"{_duration(self.seconds)} "
            f"of training on {self.device}, about {_duration(self.seconds / self.parallel)} wall with "
            f"{self.parallel} at once (rates of {self.probed + self.stored} kinds of unit: {sources})"
        )


def _kind(config: TrialConfig, pack: int) -> str:
    """What decides the time of an epoch: everything but the seeds and the scheme's thresholds."""
    doc = config.model_dump(mode="json", include={"data", "model", "optim", "batch_size", "full_batch"})
    return f"{config.scheme.name}|{pack}|{doc}"


def estimate(plan: SweepPlan, sweep_dir: Path) -> Estimate:
    import torch

    from trainers.loop import pick_device

    kinds: dict[str, tuple[TrialConfig, int]] = {}
    remaining: list[tuple[str, int]] = []  # (kind, epochs) of each unit still to train
    stored: dict[str, float] = {}
    for unit in plan.units:
        first = plan.trials[unit[0]]
        kind = _kind(first, len(unit))
        kinds.setdefault(kind, (first, len(unit)))
        results = [layout.read_result(layout.trial_dir(sweep_dir, plan.trials[i].trial_key())) for i in unit]
        for result in results:
            if result and result.get("epochs_done") and result.get("wall_s"):
                stored.setdefault(kind, float(result["wall_s"]) / int(result["epochs_done"]))
        if not all(results):
            remaining.append((kind, first.total_epochs))  # IMP: epochs per round x phases

    needed = {kind for kind, _ in remaining}
    rates = {kind: stored[kind] for kind in needed if kind in stored}
    device = pick_device(plan.trials[0].device)
    for kind in sorted(needed - set(rates)):
        config, pack = kinds[kind]
        rates[kind] = _probe(config, pack, torch.device(device), max(1, math.floor(plan.spec.resources.cpu)))
    slots = max(1, math.floor((os.cpu_count() or 1) / plan.spec.resources.cpu))
    if plan.spec.max_concurrent_trials:
        slots = min(slots, plan.spec.max_concurrent_trials)
    return Estimate(
        unit_epochs=sum(epochs for _, epochs in remaining),
        seconds=sum(rates[kind] * epochs for kind, epochs in remaining),
        parallel=max(1, min(slots, len(remaining))),
        probed=len(needed - set(stored)),
        stored=len(needed & set(stored)),
        device=str(device),
    )


def _probe(config: TrialConfig, pack: int, device: object, threads: int) -> float:
    """Seconds of one training epoch of this kind of unit with a trial's threads (in memory; nothing
    is written)."""
    import torch

    from trainers.data import load_data
    from trainers.events import MemorySink
    from trainers.loop import train

    one_epoch = config.model_copy(update={"epochs": 1})  # unvalidated on purpose: RePr needs more epochs
    data = load_data(config.data, config.data_seed, device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        results = train(one_epoch, MemorySink(), seeds=list(range(pack)), pack_size=pack, data=data)
    finally:
        torch.set_num_threads(before)
    elapsed = results[0].wall_s if results and results[0].wall_s > 0 else time.perf_counter() - started
    return elapsed / one_epoch.total_epochs  # IMP trains one epoch per phase


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
