"""The aggregated tables as `lottery aggregate` prints them (rich tables): the summary per
configuration, the decision-grade comparisons, IMP's rounds and a sequential study's looks. The tables
themselves are built in orchestrator/aggregate.py and dashboards/; these functions only say them, with
accuracies and gains in percentage points and each row's setting named where rows differ in it.
"""

from __future__ import annotations

import pandas as pd
from rich.table import Table

from dashboards.decision import BEST_OF
from dashboards.sequential import interval_statement, look_cells
from dashboards.setting import hparams_text, row_labels, row_setting_text, setting_line, split_setting
from dashboards.stats import BASELINE


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
