"""What a training run emits, and the sink protocol that receives it.

Trainers never import Ray or MLflow: they push plain records into a sink the
caller provides. The orchestrator's sink writes the trial directory first and
MLflow second; tests use `MemorySink`.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class LayerEpochStats:
    """Per conv layer, one epoch. CGN in summed-loss units (see trainers/cgn.py)."""

    layer: str
    n_filters: int
    cgn_mean: float  # mean over steps and filters
    cgn_min: float  # min over steps and filters
    below_tau: int  # (step, filter) checks with CGN < tau: what RandomOut resets, or would
    resets: int  # filters re-initialized this epoch (RandomOut resets, RePr re-introductions)
    dropped: int  # filters masked out at the end of the epoch (RePr)
    ortho_sum: float  # sum over filters of RePr's O_l^f at the end of the epoch
    # Filters whose mean CGN over the epoch is below tau, in the trial's units (CgnMonitor.dead_filters):
    # RandomOut's per-epoch rule. A trial's dead filters are its last epoch's (orchestrator/aggregate.py).
    dead: int = 0


@dataclass(frozen=True)
class EpochColumn:
    """One column of metrics.parquet: its type in the aggregated epochs table, and how MLflow gets it."""

    dtype: str  # pandas dtype in the aggregated epochs table (orchestrator/aggregate.py)
    per_epoch: bool = True  # an MLflow metric per epoch (step = epoch)
    per_round: str | None = None  # IMP: an MLflow metric per round (step = round) under this name


# Every column an epoch row can hold (EpochRecord.flat, then a scheme's own), declared once: the epochs
# table's types and the MLflow metrics of each run (orchestrator/tracking/runs.py) derive from it.
EPOCH_COLUMNS: dict[str, EpochColumn] = {
    "epoch": EpochColumn("Int64", per_epoch=False),  # the step of every per-epoch metric
    "steps": EpochColumn("Int64", per_epoch=False),
    "train_loss": EpochColumn("float64"),
    "train_acc": EpochColumn("float64"),
    "test_loss": EpochColumn("float64"),
    "test_acc": EpochColumn("float64", per_round="round_test_acc"),
    "wall_s": EpochColumn("float64"),
    "cgn_mean": EpochColumn("float64"),
    "cgn_min": EpochColumn("float64"),
    "below_tau": EpochColumn("Int64"),
    "dead": EpochColumn("Int64"),
    "resets": EpochColumn("Int64"),
    "dropped": EpochColumn("Int64"),
    "ortho_sum": EpochColumn("float64"),
    # IMP (trainers/schemes/imp.py): the round an epoch trains, its sparsity; round_end marks a round's
    # last epoch that counts for the trial, with the mask's Jaccard overlap with the round before.
    "round": EpochColumn("Int64", per_epoch=False),
    "round_end": EpochColumn("boolean", per_epoch=False),
    "sparsity": EpochColumn("float64", per_round="round_sparsity"),
    "mask_overlap": EpochColumn("float64", per_epoch=False, per_round="round_mask_overlap"),
}


@dataclass(frozen=True)
class EpochRecord:
    seed: int
    epoch: int  # 0-based, completed
    steps: int  # optimizer steps so far in the trial
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    wall_s: float  # wall time of this epoch (training + evaluation)
    layers: tuple[LayerEpochStats, ...]
    # The scheme's own columns (IMP: round, round_end, sparsity, mask_overlap).
    extra: dict[str, float | int | bool] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        """One wide row: totals over layers plus a column per layer and statistic, and the scheme's."""
        row: dict[str, Any] = {k: v for k, v in asdict(self).items() if k not in ("layers", "extra")}
        n = sum(s.n_filters for s in self.layers)
        row["cgn_mean"] = sum(s.cgn_mean * s.n_filters for s in self.layers) / max(n, 1)
        row["cgn_min"] = min((s.cgn_min for s in self.layers), default=float("nan"))
        for key in ("below_tau", "dead", "resets", "dropped"):
            row[key] = sum(getattr(s, key) for s in self.layers)
        row["ortho_sum"] = sum(s.ortho_sum for s in self.layers)
        return row | self.extra


@dataclass(frozen=True)
class CgnTrace:
    """Per-filter CGN rows for one epoch, columnar (epoch, step, layer, filter, cgn, reset).

    step = -1 marks the per-epoch mean row of a filter; other rows are every-K-step samples.
    reset = how many times the filter was re-initialized in that epoch (or at that step).
    """

    epoch: np.ndarray
    step: np.ndarray
    layer: np.ndarray
    filter: np.ndarray
    cgn: np.ndarray
    reset: np.ndarray

    def columns(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("epoch", "step", "layer", "filter", "cgn", "reset")}


# Where a result field goes besides result.json, declared on the field (TrialResult below): TABLE, a column
# of the aggregated trial table (dashboards.stats.TRIAL_COLUMNS gives its type); METRIC, an MLflow metric
# of the trial's run under that name; TUNE, averaged over a unit's seeds in what Tune sees of the unit.
TABLE, METRIC, TUNE = "table", "metric", "tune"


def _goes(*roles: str, metric: str | None = None) -> dict[str, Any]:
    return dict.fromkeys(roles, True) | ({METRIC: metric} if metric else {})


RESULT_FORMAT = 3  # result.json's on-disk version: a field added or changed is a new version and upgrade step


@dataclass(frozen=True)
class TrialResult:
    seed: int
    epochs_done: int = field(metadata=_goes(TABLE, TUNE, metric="epochs_done"))
    final_test_acc: float = field(metadata=_goes(TABLE, TUNE, metric="final_test_acc"))
    final_train_acc: float = field(metadata=_goes(TABLE, metric="final_train_acc"))
    best_test_acc: float = field(metadata=_goes(TABLE, TUNE, metric="best_test_acc"))
    final_test_loss: float
    # accuracy of the best constant predictor on the test split (majority-class share)
    chance: float = field(metadata=_goes(TABLE))
    failure_margin: float = field(metadata=_goes(TABLE))
    # final_test_acc <= chance + failure_margin, or diverged
    failed: bool = field(metadata=_goes(TABLE, TUNE, metric="failed"))
    diverged: bool = field(metadata=_goes(TABLE, TUNE))  # a non-finite training loss stopped the run
    total_resets: int = field(metadata=_goes(TABLE, TUNE, metric="total_resets"))
    # RePr re-inits that fell back to the initializer (null space too small)
    reinit_fallbacks: int = field(metadata=_goes(metric="reinit_fallbacks"))
    wall_s: float = field(metadata=_goes(TABLE))  # wall time of the whole pack this seed trained in
    # seeds trained at once with this one (1 = alone)
    pack_size: int = field(default=1, metadata=_goes(TABLE))
    # This seed's share of its pack's time (wall_s / pack_size): the time that compares schemes, since a
    # pack's wall time depends on how many seeds shared it. Computed from the two above when not given.
    seed_wall_s: float | None = field(default=None, metadata=_goes(TABLE, metric="seed_wall_s"))
    # share of conv/linear weights held at zero at the end (IMP, edge-popup)
    sparsity: float = field(default=0.0, metadata=_goes(TABLE, metric="final_sparsity"))
    failure_rule: str = field(default="", metadata=_goes(TABLE))
    # Provenance outside the trial key that still changes exact numbers (summation order, kernels).
    device: str = ""  # e.g. "cpu", "cuda:0"
    threads: int = 0  # torch intra-op threads of the process that trained it
    # What it was trained on (trainers/data.py): the hash of `data_files` ("" for generated data).
    data_fingerprint: str = ""
    data_files: dict[str, Any] = field(default_factory=dict)
    # What net it was: `model.builder` for a custom net (else the model name), the SHA-256 of the
    # builder's source file ("" for built-ins) and one seed's parameter count.
    builder: str = ""
    builder_sha256: str = ""
    parameters: int = 0
    # Which test examples the final model gets right, one bit each (trainers/correctness.py); "" when
    # the seed diverged. The aggregation computes each arm's test-set floor from it.
    test_correct: str = field(default="", metadata=_goes(TABLE))

    def __post_init__(self) -> None:
        if self.seed_wall_s is None:
            object.__setattr__(self, "seed_wall_s", self.wall_s / max(1, self.pack_size))

    def to_dict(self) -> dict[str, Any]:
        """The fields of result.json, stamped with its on-disk format (older files are brought up to it
        on read: orchestrator/formats.py, whose upgrade steps a test holds this number to)."""
        return asdict(self) | {"format": RESULT_FORMAT}


def result_fields(role: str) -> tuple[str, ...]:
    """The TrialResult fields declared for `role` (TABLE, METRIC or TUNE), in the class's order."""
    return tuple(f.name for f in fields(TrialResult) if role in f.metadata)


# result field -> the MLflow metric it is logged as
RESULT_METRICS: dict[str, str] = {
    f.name: f.metadata[METRIC] for f in fields(TrialResult) if METRIC in f.metadata
}


def failure_rule_text(margin: float, chance: float | None = None) -> str:
    """The rule as a sentence, stored with every result and printed on every figure."""
    level = "majority-class accuracy" if chance is None else f"majority-class accuracy {chance:.3f}"
    return f"failed if final test accuracy <= {level} + {margin:g} (or the loss diverged)"


class Sink(Protocol):
    def on_epoch(self, record: EpochRecord, trace: CgnTrace) -> None: ...

    def on_checkpoint(self, epoch: int, state: dict[str, Any]) -> None: ...

    def on_result(self, result: TrialResult) -> None: ...


class MemorySink:
    """Keeps everything in lists: for tests and for in-process callers."""

    def __init__(self, keep_checkpoints: bool = False) -> None:
        self.epochs: list[EpochRecord] = []
        self.traces: list[CgnTrace] = []
        self.results: list[TrialResult] = []
        self.checkpoints: list[tuple[int, dict[str, Any]]] = []
        self.weights: dict[int, dict[str, Any]] = {}  # seed -> final state dict (fate-clock children)
        self._keep_checkpoints = keep_checkpoints

    def on_epoch(self, record: EpochRecord, trace: CgnTrace) -> None:
        self.epochs.append(record)
        self.traces.append(trace)

    def on_checkpoint(self, epoch: int, state: dict[str, Any]) -> None:
        if self._keep_checkpoints:
            self.checkpoints.append((epoch, copy.deepcopy(state)))

    def on_weights(self, seed: int, state: dict[str, Any]) -> None:
        self.weights[seed] = state

    def on_result(self, result: TrialResult) -> None:
        self.results.append(result)
