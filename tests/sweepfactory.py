"""Write fake sweep directories in the on-disk trial contract, from synthetic numbers.

Shared by tests and benchmarks: a `FakeTrial` says what should be on disk for one trial
(its status and final accuracy); `write_sweep` writes spec.json, trials.json and each trial
directory (config.json, metrics.parquet, layers.parquet, result.json or error.txt) exactly as
the producers do, so the aggregation is exercised on files, not on in-memory shortcuts.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainers.events import failure_rule_text

MODEL, DATASET = "crater_cnn", "synthetic"
LAYERS = ("conv1", "conv2")


@dataclass(frozen=True)
class FakeTrial:
    scheme: str
    seed: int
    final_test_acc: float
    hparams: dict[str, float] = field(default_factory=dict)
    filters: int = 8
    status: str = "finished"  # finished | errored | incomplete | pending
    diverged: bool = False
    epochs: int = 4


def _digest(obj: Any, size: int = 12) -> str:
    return hashlib.md5(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:size]


def hparam_label(hparams: dict[str, float]) -> str:
    short = {"active_fraction": "P"}
    return " ".join(f"{short.get(k, k)}={v:g}" for k, v in hparams.items())


def identity(t: FakeTrial) -> dict[str, Any]:
    """trial_key / config_hash / pair_key as the contract defines them."""
    context = {"model": MODEL, "dataset": DATASET, "filters": t.filters, "epochs": t.epochs}
    pair_key = _digest(context)
    config_hash = _digest({**context, "scheme": t.scheme, "hparams": t.hparams})
    return {
        "trial_key": _digest({"config_hash": config_hash, "seed": t.seed}),
        "config_hash": config_hash,
        "pair_key": pair_key,
        "scheme": t.scheme,
        "hparam_label": hparam_label(t.hparams),
        "seed": t.seed,
    }


def _metrics(t: FakeTrial, epochs: int) -> pa.Table:
    """Plausible curves: accuracy rising to its final value, CGN decaying, resets early (RandomOut)."""
    e = np.arange(epochs)
    acc = t.final_test_acc * (e + 1) / t.epochs
    cgn = 1e-3 * np.exp(-0.5 * e) * (3.0 if t.scheme == "randomout" else 1.0)
    rescued = t.scheme in ("randomout", "batchnorm")  # fewer dead filters after the first epoch
    below = np.maximum(0, 40 - 12 * e) * (1 + t.seed % 3) // np.where(rescued & (e > 0), 4, 1)
    resets = below if t.scheme == "randomout" else np.zeros_like(below)
    ortho = 0.5 + 0.1 * e if t.scheme == "repr" else np.zeros(epochs)
    return pa.table(
        {
            "seed": np.full(epochs, t.seed, dtype=np.int64),
            "epoch": e.astype(np.int64),
            "steps": (e + 1) * 10,
            "train_loss": 2.0 - acc,
            "train_acc": np.minimum(1.0, acc + 0.05),
            "test_loss": 2.1 - acc,
            "test_acc": acc,
            "wall_s": np.full(epochs, 0.5),
            "cgn_mean": cgn,
            "cgn_min": cgn / 100,
            "below_tau": below.astype(np.int64),
            "dead": (e < 2).astype(np.int64),  # conv1's filter 0 (see _trace)
            "resets": resets.astype(np.int64),
            "dropped": np.zeros(epochs, dtype=np.int64),
            "ortho_sum": ortho,
        }
    )


def _layers(metrics: pa.Table, filters: int) -> pa.Table:
    n = metrics.num_rows
    return pa.table(
        {
            "epoch": np.repeat(metrics["epoch"].to_numpy(), len(LAYERS)),
            "layer": list(LAYERS) * n,
            "n_filters": np.full(n * len(LAYERS), filters, dtype=np.int64),
            **{
                c: np.repeat(metrics[c].to_numpy(), len(LAYERS))
                for c in ("cgn_mean", "cgn_min", "below_tau", "resets", "dropped", "ortho_sum")
            },
        }
    )


def _trace(metrics: pa.Table, filters: int) -> pa.Table:
    """Per-filter epoch means (step -1): filter 0 of conv1 dies (CGN 0) unless reset, then revives."""
    epochs = metrics["epoch"].to_numpy()
    resets = metrics["resets"].to_numpy()
    rows: dict[str, list] = {k: [] for k in ("epoch", "step", "layer", "filter", "cgn", "reset")}
    for e, r in zip(epochs, resets, strict=True):
        for layer in LAYERS:
            for f in range(filters):
                dead = layer == LAYERS[0] and f == 0 and e < 2
                rows["epoch"].append(int(e))
                rows["step"].append(-1)
                rows["layer"].append(layer)
                rows["filter"].append(f)
                rows["cgn"].append(0.0 if dead else 1e-3 * (1 + f) * math.exp(-0.5 * e))
                rows["reset"].append(int(dead and r > 0))
    return pa.table(rows)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj))


def write_trial(trial_dir: Path, t: FakeTrial, sweep: str, margin: float, chance: float) -> None:
    """One trial directory; nothing at all for a pending trial."""
    if t.status == "pending":
        return
    ident = identity(t)
    trial_dir.mkdir(parents=True)
    config = {
        **{k: ident[k] for k in ("trial_key", "config_hash", "pair_key")},
        "sweep": sweep,
        "scheme": t.scheme,
        "hparams": t.hparams,
        "hparam_label": ident["hparam_label"],
        "seed": t.seed,
        "data_seed": 0,
        "model": MODEL,
        "dataset": DATASET,
        "filters": t.filters,
        "epochs": t.epochs,
        "trial": {
            "scheme": {"name": t.scheme, **t.hparams},
            "model": {"name": MODEL, "filters": t.filters, "init": "uniform0.01"},
            "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0},
            "data": {"name": DATASET, "normalize": "standard", "augment": "none"},
            "epochs": t.epochs,
            "batch_size": 64,
            "full_batch": False,
            "tau": 1e-8,
        },
    }
    _write_json(trial_dir / "config.json", config)
    epochs = t.epochs if t.status == "finished" else t.epochs // 2
    metrics = _metrics(t, epochs)
    pq.write_table(metrics, trial_dir / "metrics.parquet")
    pq.write_table(_layers(metrics, t.filters), trial_dir / "layers.parquet")
    pq.write_table(_trace(metrics, t.filters), trial_dir / "cgn_trace.parquet")
    if t.status == "errored":
        (trial_dir / "error.txt").write_text("RuntimeError: synthetic failure\n")
    if t.status != "finished":
        return
    acc = float("nan") if t.diverged else t.final_test_acc
    result = {
        "seed": t.seed,
        "epochs_done": t.epochs,
        "final_test_acc": acc,
        "final_train_acc": acc,
        "best_test_acc": acc,
        "final_test_loss": float("nan") if t.diverged else 2.1 - acc,
        "chance": chance,
        "failure_margin": margin,
        "failed": t.diverged or acc <= chance + margin,
        "diverged": t.diverged,
        "total_resets": int(metrics["resets"].to_numpy().sum()),
        "reinit_fallbacks": 0,
        "wall_s": 0.5 * t.epochs,
        "ended_at": 1_700_000_000.0 + 10 * t.seed,
        "failure_rule": failure_rule_text(margin, chance),
    }
    _write_json(trial_dir / "result.json", result)


def write_sweep(
    storage: Path,
    name: str,
    trials: Sequence[FakeTrial],
    failure_margin: float = 0.05,
    chance: float = 0.1,
) -> Path:
    """Write `<storage>/<name>/` with spec.json, trials.json and a directory per non-pending trial."""
    sweep_dir = Path(storage) / name
    (sweep_dir / "trials").mkdir(parents=True)
    _write_json(sweep_dir / "spec.json", {"name": name, "failure_margin": failure_margin})
    plan = [identity(t) for t in trials]
    _write_json(sweep_dir / "trials.json", plan)
    for t, p in zip(trials, plan, strict=True):
        write_trial(sweep_dir / "trials" / p["trial_key"], t, name, failure_margin, chance)
    return sweep_dir


def lottery_trials(
    arms: Iterable[tuple[str, dict[str, float]]],
    seeds: Iterable[int],
    filters: Iterable[int] = (8,),
    fail_rate: float = 0.25,
    rng_seed: int = 0,
) -> list[FakeTrial]:
    """A seed lottery: the baseline fails on some seeds, other arms rescue most of them.

    Accuracy per (filters, seed) is shared across arms (so pairing by seed matters); each
    non-baseline arm adds a gain that grows with tau's smallness and P.
    """
    arms, seeds, filters = list(arms), list(seeds), list(filters)
    rng = np.random.default_rng(rng_seed)
    out = []
    for width in filters:
        skill = 0.55 + 0.2 * (1 - math.exp(-width / 4)) + rng.normal(0, 0.02, len(seeds))
        unlucky = rng.random(len(seeds)) < fail_rate
        for scheme, hparams in arms:
            lift = 0.0 if scheme == "baseline" else 0.01 + 0.002 * -math.log10(hparams.get("tau", 1e-4))
            lift *= hparams.get("active_fraction", 1.0)
            for i, seed in enumerate(seeds):
                failed = unlucky[i] and (scheme == "baseline" or rng.random() < 0.2)
                acc = 0.1 + rng.uniform(0, 0.03) if failed else skill[i] + lift + rng.normal(0, 0.005)
                out.append(FakeTrial(scheme, seed, float(np.clip(acc, 0, 1)), dict(hparams), width))
    return out
