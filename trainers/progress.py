"""Everything besides model and optimizer that a checkpoint carries: per-seed running totals, the
epoch and step counts, and the generators' states, so a resumed trial ends where the uninterrupted one
does (tests/test_trainers.py, tests/test_fidelity.py)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class SeedProgress:
    """One seed's running totals inside a pack: a new per-seed quantity is one field here."""

    seed: int
    epochs_done: int = 0
    best_test_acc: float = 0.0
    total_resets: int = 0
    train_acc: float = math.nan  # of the last epoch
    test_acc: float = math.nan
    test_loss: float = math.nan
    diverged: bool = False


@dataclass
class Progress:
    """Everything besides model/optimizer/scheme that a checkpoint must carry."""

    seeds: list[SeedProgress]
    epoch: int = 0  # epochs completed
    steps: int = 0
    wall_s: float = 0.0

    @classmethod
    def start(cls, seeds: list[int]) -> Progress:
        return cls([SeedProgress(seed) for seed in seeds])

    def seed_list(self) -> list[int]:
        return [s.seed for s in self.seeds]

    def state(self) -> dict[str, Any]:
        """Plain lists and numbers, so a checkpoint loads with torch.load(weights_only=True)."""
        return {
            "seeds": self.seed_list(),
            "epoch": self.epoch,
            "steps": self.steps,
            "wall_s": self.wall_s,
            "per_seed": [asdict(s) for s in self.seeds],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        if "per_seed" in state:
            seeds = [SeedProgress(**s) for s in state["per_seed"]]
        else:  # checkpoints written before per-seed records: parallel lists
            seeds = [
                SeedProgress(
                    seed,
                    state["epochs_done"][k],
                    state["best_test_acc"][k],
                    state["total_resets"][k],
                    *state["last"][k],
                    state["diverged"][k],
                )
                for k, seed in enumerate(state["seeds"])
            ]
        return cls(seeds, state["epoch"], state["steps"], state["wall_s"])


def snapshot(model, optimizer, scheme, data_gens, scheme_gens, progress: Progress) -> dict[str, Any]:
    """References to live state: a sink that keeps it must serialize or copy it at once."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheme": scheme.state_dict(),
        "data_gen": data_gens[0].get_state(),
        **({"augment_gen": data_gens[1].get_state()} if len(data_gens) > 1 else {}),
        "scheme_gens": [g.get_state() for g in scheme_gens],
        "progress": progress.state(),
    }


def restore(state, model, optimizer, scheme, data_gens, scheme_gens) -> Progress:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheme.load_state_dict(state["scheme"])
    data_gens[0].set_state(state["data_gen"])
    if len(data_gens) > 1:
        data_gens[1].set_state(state["augment_gen"])
    for gen, saved in zip(scheme_gens, state["scheme_gens"], strict=True):
        gen.set_state(saved)
    return Progress.from_state(state["progress"])
