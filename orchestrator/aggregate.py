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
from rich.table import Table

from dashboards.decision import BEST_OF, DECISION_COLUMNS, decide
from dashboards.fate import empty_fate
from dashboards.rounds import ROUND_COLUMNS, round_summary
from dashboards.sequential import interval_statement, look_cells, looks_frame
from dashboards.setting import hparams_text, row_labels, row_setting_text, setting_line, split_setting
from dashboards.sources import empty_variance, variance_table
from dashboards.stats import BASELINE, TRIAL_COLUMNS, summarise, trials_frame, with_dead_filters
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


def _pct(x: float, digits: int = 1) -> str:
    return "-" if pd.isna(x) else f"{100 * x:.{digits}f}"


def sequential_statement(looks: pd.DataFrame) -> str | None:
    """One line on how a sequential study stopped, its rule and the interval method; None if fixed."""
    if looks.empty:
        return None
    last = looks[looks["look"] == looks["look"].max()]
    look, seeds = int(last["look"].iloc[0]), int(last["seeds"].iloc[0])
    how = "the rule held" if bool(last["met"].all()) else "the rule did not hold (max seeds, or not finished)"
    return (
        f"Sequential study (seeds added in batches, looked at after each): stopped after look {look}, "
        f"{seeds} seeds per configuration; {how}: {last['rule'].iloc[0]}. "
        f"{interval_statement(last['statistic'])}; the fixed-n Wilson intervals and Wilcoxon p of the "
        "summary do not account for the optional stopping."
    )


def format_looks_table(looks: pd.DataFrame) -> Table:
    """The last look of a sequential study, per arm, with its interval (interval_statement says which)."""
    last = looks[looks["look"] == looks["look"].max()]
    table = Table(title="Sequential study: last look (95% interval, in %)")
    names = ("scheme", "hparams", "statistic", "n", "estimate", "interval", "met", "verdict")
    _add_columns(table, names, text=("scheme", "hparams", "statistic", "verdict"))
    for r in last.itertuples(index=False):
        table.add_row(str(r.scheme), str(r.hparam_label or ""), str(r.statistic), *look_cells(r, _pct))
    return table


def _add_columns(table: Table, names: list[str] | tuple[str, ...], text: tuple[str, ...]) -> None:
    """Columns named `names`: those in `text` left-aligned, the numbers right-aligned."""
    for name in names:
        table.add_column(name, justify="left" if name in text else "right")


def format_summary_table(summary: pd.DataFrame) -> Table:
    """The summary as a rich table for the CLI; accuracies and gains in percentage points.

    The caption states the setting every row shares; what differs between rows gets a column,
    and each row lists every scheme hyperparameter, defaults included.
    """
    _, varying = split_setting(summary["setting"])
    table = Table(
        title="Seeds per configuration (failure rate with Wilson 95% CI)",
        caption=(
            f"setting: {setting_line(summary)}. Failures by kind: diverged (loss not finite), collapsed (at "
            "or below the majority-class accuracy), low (above it, within the margin); rescued/harmed: "
            "seed pairs where only the reference failed / only this arm failed (p: exact McNemar); dead "
            "filters: per trial, those whose mean CGN over the last epoch is below tau (median/max, and "
            "trials with one)."
        ),
        caption_justify="left",
    )
    columns = ["scheme", "hparams", *(["setting"] if varying else []), "filters", "n", "failed"]
    columns += ["diverged / collapsed / low", "fail % [95% CI]", "mean %", "median %", "min %", "std %"]
    columns += ["gain pts (median)", "better/tied/worse", "rescued/harmed", "Wilcoxon p (n, method)"]
    columns += ["dead filters med/max (trials)"]
    _add_columns(table, columns, text=("scheme", "hparams", "setting"))
    for r in summary.itertuples(index=False):
        pending = r.n_planned - r.n
        fail = f"{_pct(r.failure_rate)} [{_pct(r.failure_ci_low)}, {_pct(r.failure_ci_high)}]"
        is_base = r.scheme == BASELINE
        test = "-" if pd.isna(r.wilcoxon_p) else f"{r.wilcoxon_p:.3g} (n={r.wilcoxon_n}, {r.wilcoxon_method})"
        table.add_row(
            str(r.scheme),
            hparams_text(r.hparams),
            *([row_setting_text(r.setting, varying)] if varying else []),
            "-" if pd.isna(r.filters) else str(r.filters),
            f"{r.n}"
            + (f" (+{pending} not finished" if pending else "")
            + (f", {r.n_damaged} damaged" if pending and r.n_damaged else "")
            + (")" if pending else ""),
            f"{r.n_failed}",
            f"{r.n_diverged}/{r.n_collapsed}/{r.n_low}",
            fail if r.n else "-",
            _pct(r.acc_mean, 2),
            _pct(r.acc_median, 2),
            _pct(r.acc_min, 2),
            _pct(r.acc_std, 2),
            "baseline" if is_base else _pct(r.gain_median, 2),
            "-" if is_base or not r.n_pairs else f"{r.n_better}/{r.n_tied}/{r.n_worse}",
            "-" if is_base else f"{r.n_rescued}/{r.n_harmed}" + _mcnemar(r.rescue_harm_p),
            "-" if is_base else test,
            "-" if pd.isna(r.dead_median) else f"{r.dead_median:g}/{r.dead_max:g} ({r.n_dead})",
        )
    return table


def _mcnemar(p: float) -> str:
    return "" if pd.isna(p) else f" (p={p:.2g})"


def _interval(value: float, low: float, high: float, percent: bool) -> str:
    if pd.isna(value):
        return "-"
    text = (lambda v: _pct(v, 1)) if percent else (lambda v: f"{v:.2f}")
    return f"{text(value)} [{text(low)}, {text(high)}]" if pd.notna(low) else text(value)


def format_decision_table(decision: pd.DataFrame, summary: pd.DataFrame) -> Table:
    """IQM with its stratified bootstrap CI, P(improvement) with its CI, and best-of-N inflation; rows
    labelled as the summary's (`summary` gives what varies between them)."""
    labels = row_labels(summary)
    labelled = any(labels.values())
    table = Table(
        title="Decision-grade comparisons (interquartile mean and P(arm > reference), bootstrap 95% CI)",
        caption=(
            "P(improvement): share of seed pairs the arm wins (a tie counts 1/2), or P(X > Y) over all "
            "couples when seeds do not pair. Best of N: expected best of N seeds minus the median, "
            "in points (what reporting the best seed adds). Test-set floor: the accuracy SD the finite test "
            "set alone would give, from the seeds' per-example correctness (sqrt(sum p_i(1-p_i)) / n)."
        ),
        caption_justify="left",
    )
    best = [f"best of {n} +pts" for n in BEST_OF]
    columns = ["scheme", "hparams", *(["setting"] if labelled else []), "n", "IQM % [95% CI]", "vs"]
    columns += ["P(improvement) [95% CI]", "pairs", *best, "SD % (test-set floor)"]
    _add_columns(table, columns, text=("scheme", "hparams", "setting", "vs"))
    for r in decision.itertuples(index=False):
        paired = "-" if not r.improve_n else f"{r.improve_n} {'paired' if r.improve_paired else 'unpaired'}"
        table.add_row(
            str(r.scheme),
            "" if pd.isna(r.hparam_label) else str(r.hparam_label),
            *([labels.get(str(r.config_hash), "")] if labelled else []),
            str(r.n),
            _interval(r.iqm, r.iqm_ci_low, r.iqm_ci_high, percent=True),
            r.reference or "-",
            _interval(r.p_improve, r.p_improve_ci_low, r.p_improve_ci_high, percent=False),
            paired,
            *("-" if pd.isna(v) else _pct(v, 2) for v in (getattr(r, f"best_of_{n}") for n in BEST_OF)),
            f"{_pct(r.acc_sd, 2)} ({_pct(r.test_floor_sd, 2)})",
        )
    return table


def format_rounds_table(rounds: pd.DataFrame) -> Table:
    """IMP per round: sparsity, accuracy and the paired gain over the reference arm, in points."""
    table = Table(title="IMP rounds (test accuracy at each round's end; gain paired by seed and round)")
    names = ("scheme", "hparams", "round", "n", "sparsity %", "median %", "IQR %", "vs", "pairs")
    names += ("gain pts (median)", "improved %", "Wilcoxon p")
    _add_columns(table, names, text=("scheme", "hparams", "vs"))
    for r in rounds.itertuples(index=False):
        table.add_row(
            str(r.scheme),
            str(r.hparam_label or ""),
            str(r.round),
            str(r.n),
            _pct(r.sparsity),
            _pct(r.acc_median, 2),
            _pct(r.acc_iqr, 2),
            str(r.reference or "-"),
            str(r.n_pairs),
            _pct(r.gain_median, 2),
            _pct(r.share_improved, 0),
            "-" if pd.isna(r.wilcoxon_p) else f"{r.wilcoxon_p:.3g}",
        )
    return table
