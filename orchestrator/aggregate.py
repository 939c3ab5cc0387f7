"""Turn a sweep directory into three tables: trials, epochs and the per-config summary.

The planned list (`trials.json`) is the spine: a planned trial with no directory is
`pending`, one with a directory but no result is `incomplete` (or `errored` when it left an
`error.txt`), and one whose files are unreadable or whose result fails its schema is `damaged`
(with the file and the problem in `problem`), so a crash or a damaged file can never shrink or
shift n unnoticed. Directories that are not in the plan
are kept too. Reading is one pass of stdlib JSON into lists, one DataFrame at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dashboards.decision import DECISION_COLUMNS, decide
from dashboards.fate import empty_fate
from dashboards.rounds import ROUND_COLUMNS, round_summary
from dashboards.sequential import looks_frame
from dashboards.sources import empty_variance, variance_table
from dashboards.stats import TRIAL_COLUMNS, summarise, trials_frame, with_dead_filters
from orchestrator import layout
from orchestrator.errors import UserError
from orchestrator.fate import fate_tables
from trainers.config import FORK_FIELDS, SOURCE_SEEDS
from trainers.events import EPOCH_COLUMNS, TABLE, failure_rule_text, result_fields

# metrics.parquet columns (one row per completed epoch), plus the trial columns we attach.
METRIC_COLUMNS: dict[str, str] = {name: column.dtype for name, column in EPOCH_COLUMNS.items()}
_EPOCH_IDENTITY = ("trial_key", "config_hash", "scheme", "hparam_label", "filters", "seed", "status")
EPOCH_COLUMNS: dict[str, str] = {
    **{c: TRIAL_COLUMNS[c] for c in _EPOCH_IDENTITY},
    **METRIC_COLUMNS,
}
_CONFIG_FIELDS = (
    "config_hash",
    "pair_key",
    "sweep",
    "scheme",
    "hparam_label",
    "seed",
    *SOURCE_SEEDS,
    *FORK_FIELDS,
)
_CONFIG_FIELDS += ("model", "dataset")  # config.json's fields that its trial's row takes as they are
_RESULT_FIELDS = result_fields(TABLE)  # what a finished trial's result.json gives its row


@dataclass(frozen=True)
class AggregateResult:
    trials: pd.DataFrame  # TRIAL_COLUMNS
    epochs: pd.DataFrame  # EPOCH_COLUMNS
    summary: pd.DataFrame  # dashboards.stats.SUMMARY_COLUMNS
    rounds: pd.DataFrame  # dashboards.rounds.ROUND_COLUMNS (IMP trials only; empty otherwise)
    # A sequential study's looks (dashboards.sequential.LOOK_COLUMNS); empty for a fixed design.
    looks: pd.DataFrame = field(default_factory=lambda: looks_frame([]))
    # Decision-grade comparisons per configuration (dashboards.decision.DECISION_COLUMNS).
    decision: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame({c: pd.Series(dtype=d) for c, d in DECISION_COLUMNS.items()})
    )
    # Variance by source per arm that splits its seeds (dashboards.variance.VARIANCE_COLUMNS); else empty.
    variance: pd.DataFrame = field(default_factory=empty_variance)
    # A forked sweep's fate-clock children (TRIAL_COLUMNS; not in `trials`) and their table (FATE_COLUMNS).
    children: pd.DataFrame = field(default_factory=lambda: _typed_trials([]))
    fate: pd.DataFrame = field(default_factory=empty_fate)


def _planned(sweep_dir: layout.Location, on_disk: set[str]) -> list[dict[str, Any]]:
    """The plan from trials.json, followed by any trial directory the plan does not list."""
    plan: list[dict[str, Any]] = layout.read_plan(sweep_dir) if layout.plan_file(sweep_dir).exists() else []
    listed = {p["trial_key"] for p in plan}
    return plan + [{"trial_key": k} for k in sorted(on_disk - listed)]


def setting_of(trial: dict[str, Any]) -> dict[str, Any]:
    """What fixes a trial's result besides scheme, width and seed, in reading order (from config.json's
    `trial`). tau is the threshold the trial used: RandomOut's own, else the below-tau counting one."""
    optim, model, data = trial.get("optim", {}), trial.get("model", {}), trial.get("data", {})
    scheme = trial.get("scheme", {})
    values = {
        "lr": optim.get("lr"),
        "optimizer": optim.get("name"),
        "momentum": optim.get("momentum") if optim.get("name") == "sgd" else None,
        "weight_decay": optim.get("weight_decay"),
        "epochs": trial.get("epochs"),
        "batch": "full" if trial.get("full_batch") else trial.get("batch_size"),
        "init": model.get("init"),
        "input_scale": data.get("normalize"),
        "augment": data.get("augment"),
        # ReDo's tau is an activation-score threshold, not a CGN one: only RandomOut's replaces the trial's.
        "tau": scheme.get("tau", trial.get("tau")) if scheme.get("name") == "randomout" else trial.get("tau"),
    }
    # A custom builder's or loader's kwargs are the user's own axes (a width, a depth): a grid over
    # them must show in the table, or its rows read as copies of one another.
    for part, chosen in (("model", model), ("data", data)):
        values |= {f"{part}.{k}": v for k, v in sorted(chosen.get("kwargs", {}).items())}
    return {k: v for k, v in values.items() if v is not None}


def _trial_row(
    planned: dict[str, Any], trial_dir: layout.Location | None, defaults: dict[str, Any]
) -> dict[str, Any]:

    row: dict[str, Any] = {**defaults, **planned}
    if trial_dir is None:
        row["status"] = "pending"
        return row
    status = layout.trial_status(trial_dir)
    if status.damaged:  # named with its path, counted on its own, out of every statistic
        row["status"], row["problem"] = "damaged", status.problem
        with contextlib.suppress(OSError, ValueError, AttributeError):  # its config may be the damage
            config = layout.read_json(trial_dir / layout.CONFIG)
            row.update({k: config[k] for k in ("config_hash", "pair_key", "scheme", "seed") if k in config})
            row["hparam_label"], row["filters"] = config.get("hparam_label", ""), config.get("filters")
        return row
    if (trial_dir / layout.CONFIG).exists():
        config = layout.read_json(trial_dir / layout.CONFIG)
        for key in _CONFIG_FIELDS:
            row[key] = config.get(key, row.get(key))
        row["filters"] = config.get("filters")
        row["reference_hash"] = config.get("reference_hash")
        row["hparams"] = json.dumps(config.get("hparams", {}), sort_keys=True)
        row["setting"] = json.dumps(setting_of(config.get("trial", {})))
    if status.result is not None:
        row.update({k: status.result[k] for k in _RESULT_FIELDS})  # None where not recorded: NaN
        row["status"] = "finished"
        return row
    row["status"] = "errored" if status.errored else "incomplete"
    with contextlib.suppress(FileNotFoundError):  # how far it got; the footer alone is cheap to read
        row["epochs_done"] = layout.parquet_rows(trial_dir / layout.METRICS)
    return row


def _read_optional(path: layout.Location) -> Any:
    """A JSON file, or None: one read, not a check and a read (each is a request on an object store)."""
    try:
        return layout.read_json(path)
    except FileNotFoundError:
        return None


_typed_trials = trials_frame  # rows to TRIAL_COLUMNS (dashboards/stats.py owns the table)


def load_trials(sweep_dir: layout.Location | str) -> pd.DataFrame:
    """One row per planned (or found) trial with its status and final result (TRIAL_COLUMNS)."""
    sweep_dir = layout.location(sweep_dir)
    spec = layout.read_spec(sweep_dir)
    on_disk = layout.trial_dirs_present(sweep_dir)
    margin = float(spec["failure_margin"])
    defaults = {
        "sweep": spec["name"],
        "failure_margin": margin,
        "failure_rule": failure_rule_text(margin),  # the rule that applies until a result states its own
        "hparam_label": "",
    }
    rows = [
        _trial_row(
            p, layout.trial_dir(sweep_dir, p["trial_key"]) if p["trial_key"] in on_disk else None, defaults
        )
        for p in _planned(sweep_dir, on_disk)
    ]
    frame = _typed_trials(rows)
    if frame["trial_key"].duplicated().any():
        raise ValueError(f"{sweep_dir}: {layout.PLAN} lists a trial_key more than once")
    return frame


def load_epochs(sweep_dir: layout.Location | str, trials: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every trial's metrics.parquet stacked, with the trial's identity columns (EPOCH_COLUMNS).

    Files are read with pyarrow and concatenated once; identity columns are broadcast by row
    counts rather than added per file.
    """
    sweep_dir = layout.location(sweep_dir)
    trials = load_trials(sweep_dir) if trials is None else trials
    tables, owners = [], []
    for i, (key, status) in enumerate(zip(trials["trial_key"], trials["status"], strict=True)):
        if status in ("pending", "damaged"):
            continue
        try:
            table = layout.read_table(layout.trial_dir(sweep_dir, str(key)) / layout.METRICS)
        except FileNotFoundError:
            continue
        tables.append(table.select([c for c in METRIC_COLUMNS if c in table.column_names]))
        owners.append(np.full(table.num_rows, i))
    if not tables:
        return pd.DataFrame({c: pd.Series(dtype=d) for c, d in EPOCH_COLUMNS.items()})
    metrics = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    owner = np.concatenate(owners)
    ident = trials.iloc[owner][list(_EPOCH_IDENTITY)].reset_index(drop=True)
    frame = pd.concat([ident, metrics.reset_index(drop=True)], axis=1)
    return frame.reindex(columns=list(EPOCH_COLUMNS)).astype(EPOCH_COLUMNS)


def aggregate(sweep_dir: layout.Location | str) -> AggregateResult:
    """Load, summarise and write `<sweep_dir>/aggregate/{trials,epochs,summary}.parquet` (in the sweep
    directory wherever it lives: on an object store the tables go to the same store)."""
    sweep_dir = layout.location(sweep_dir)
    trials, children, fate = fate_tables(sweep_dir, load_trials(sweep_dir))
    epochs = load_epochs(sweep_dir, trials)
    trials = with_dead_filters(trials, epochs)
    result = AggregateResult(
        trials=trials,
        epochs=epochs,
        summary=summarise(trials),
        rounds=round_summary(trials, epochs),
        looks=sequential_looks(sweep_dir, trials),
        decision=decide(trials),
        variance=variance_table(trials),
        children=children,
        fate=fate,
    )
    layout.aggregate_dir(sweep_dir).mkdir(exist_ok=True)
    for table in fields(AggregateResult):
        frame = getattr(result, table.name)
        layout.atomic_write(
            layout.aggregate_table(sweep_dir, table.name), lambda tmp, f=frame: f.to_parquet(tmp, index=False)
        )
    return result


def sequential_looks(sweep_dir: layout.Location, trials: pd.DataFrame) -> pd.DataFrame:
    """A sequential study's looks, replayed from its trials with the recorded rule (else empty)."""
    from orchestrator.sequential import replay
    from orchestrator.spec_seeds import Sequential

    spec = layout.read_spec(sweep_dir)
    if not spec.get("sequential"):
        return looks_frame([])
    return replay(Sequential.model_validate(spec["sequential"]), spec["seeds"], trials).looks


def read_aggregate(sweep_dir: layout.Location) -> AggregateResult:
    """The tables `aggregate` wrote (what the report is built from); one clear error if there are none."""
    paths = {table.name: layout.aggregate_table(sweep_dir, table.name) for table in fields(AggregateResult)}
    if not paths["rounds"].exists():  # aggregated before IMP rounds were tabulated
        paths.pop("rounds")
    for optional in ("looks", "variance", "children", "fate"):  # aggregated before these existed: empty
        if not paths[optional].exists():
            paths.pop(optional)
    derived = {}
    if not paths["decision"].exists():  # aggregated before decision tables: derived from the trials
        paths.pop("decision")
        derived["decision"] = decide
    missing = [path.name for path in paths.values() if not path.exists()]
    if missing:
        raise UserError(
            f"{layout.aggregate_dir(sweep_dir)} lacks {missing}: run `lottery aggregate {sweep_dir}` first"
        )
    tables = {name: _read_frame(path) for name, path in paths.items()}
    tables.setdefault("rounds", pd.DataFrame({c: pd.Series(dtype=d) for c, d in ROUND_COLUMNS.items()}))
    tables.setdefault("variance", empty_variance())
    tables.setdefault("children", _typed_trials([]))
    tables.setdefault("fate", empty_fate())
    tables.update({name: derive(tables["trials"]) for name, derive in derived.items()})
    return AggregateResult(**tables)


def trials_fingerprint(trials: pd.DataFrame) -> str:
    """What a summary was made from: each trial's key, status, failed flag and final accuracy, hashed.
    The parent run keeps it (`summary.fingerprint`), so a summary the sweep has moved on from (more
    trials finished, one trained again) is told apart from a current one."""
    rows = sorted(
        json.dumps([str(k), str(s), bool(f), None if pd.isna(a) else round(float(a), 6)])
        for k, s, f, a in zip(
            trials["trial_key"], trials["status"], trials["failed"], trials["final_test_acc"], strict=True
        )
    )
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def damaged_lines(trials: pd.DataFrame) -> list[str]:
    """One line per damaged trial: its file and the problem; what `lottery aggregate` prints."""
    damaged = trials[trials["status"] == "damaged"]
    return [
        f"damaged, left out of every statistic: {problem} (the next `lottery sweep` trains it again)"
        for problem in damaged["problem"]
    ]


def _read_frame(path: layout.Location) -> pd.DataFrame:
    source, filesystem = layout.parquet_source(path)
    return pd.read_parquet(source, filesystem=filesystem)
