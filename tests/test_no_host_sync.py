"""The training step never reads a tensor back to the host: per-step values stay on the device.

On CPU there is no real device-to-host sync to observe, so the sync points themselves are patched:
every Tensor method that copies a value to Python (item, tolist, numpy, cpu, bool/float/int) counts
calls made from the project's trainer code. Torch's own internals (e.g. Adam's step counter, a
host tensor by design) are not counted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from trialfactory import config

import trainers.loop as loop
from trainers.data import load_data
from trainers.events import MemorySink

TRAINERS = str(Path(loop.__file__).resolve().parent)
SYNC_POINTS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


class SyncCounter:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.counting = False

    def wrap(self, name: str, original):
        def patched(tensor, *args, **kwargs):
            if self.counting:
                caller = sys._getframe(1)
                if caller.f_code.co_filename.startswith(TRAINERS):
                    self.calls.append(f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return original(tensor, *args, **kwargs)

        return patched


@pytest.fixture
def syncs(monkeypatch):
    counter = SyncCounter()
    for name in SYNC_POINTS:
        monkeypatch.setattr(torch.Tensor, name, counter.wrap(name, getattr(torch.Tensor, name)))
    original_epoch = loop._train_epoch

    def counted_epoch(*args, **kwargs):
        counter.counting = True
        try:
            return original_epoch(*args, **kwargs)
        finally:
            counter.counting = False

    monkeypatch.setattr(loop, "_train_epoch", counted_epoch)
    return counter


@pytest.mark.parametrize(
    ("scheme", "pack"),
    [
        ("baseline", 1),
        ({"name": "randomout", "tau": 50.0, "reset_optimizer_state": True, "reset_bias": True}, 1),
        ({"name": "randomout", "tau": 50.0}, 3),
        ({"name": "repr", "s1": 1, "s2": 2, "n_iter": 1}, 1),  # epochs 2-3 train with masks applied
        ({"name": "repr", "s1": 1, "s2": 2, "n_iter": 1}, 3),
        ({"name": "imp", "rounds": 1, "reinit": True}, 3),  # every epoch after the first is masked
        ({"name": "edgepopup", "k": 0.3}, 3),
        ({"name": "redo", "tau": 0.5, "every": 5}, 3),
        ({"name": "cbp", "maturity": 5, "replacement_rate": 0.05}, 3),
        ({"name": "randomout", "tau": 50.0, "outgoing": "zero"}, 3),
    ],
    ids=[
        "baseline",
        "randomout",
        "randomout-pack",
        "repr",
        "repr-pack",
        "imp-pack",
        "edgepopup-pack",
        "redo-pack",
        "cbp-pack",
        "randomout-zero-pack",
    ],
)
def test_training_epochs_make_no_host_reads(syncs, scheme, pack):
    cfg = config(scheme=scheme, model__filters=4, epochs=3, trace_every=3)
    data = load_data(cfg.data, 0, torch.device("cpu"))
    sink = MemorySink()
    loop.train(cfg, sink, seeds=[1, 2, 3][:pack], pack_size=pack, data=data)
    assert len(sink.epochs) == cfg.total_epochs * pack
    assert syncs.calls == []


def test_the_counter_sees_a_host_read_in_trainer_code(syncs):
    """Guard against a silently broken patch: the per-epoch summary does read back, and is seen."""
    syncs.counting = True
    from trainers.cgn import CgnMonitor
    from trainers.filters import filter_groups
    from trainers.loop import build_pack

    cfg = config(model__filters=2)
    data = load_data(cfg.data, 0, torch.device("cpu"))
    monitor = CgnMonitor(filter_groups(build_pack(cfg, [1], data)), tau=1.0, trace_every=0)
    monitor.epoch_end(0, [[0], [0]], [[0.0], [0.0]])
    assert any(call.startswith("cpu at cgn.py") for call in syncs.calls)
