"""The RandomOut paper's figures, drawn from the aggregated tables only.

Each builder takes the `trials` / `epochs` tables (see dashboards.stats / orchestrator.aggregate)
and returns a `Rendered`: either a matplotlib Figure with a caption that states n, the failure
rule and the interval shown, or the reason the figure could not be drawn. Figures are plain
`Figure` objects (Agg canvas, no pyplot state), so building a report never opens a window.

Seed pairing only makes sense within one context (model, dataset, width: a `pair_key`), so the
per-seed and per-epoch figures show the context with the most finished trials and say so.
"""

from __future__ import annotations

import itertools
import json
import textwrap
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dashboards.stats import BASELINE, paired_gains

IQR_BAND = "line = median over seeds, band = interquartile range (25th-75th percentile)"


@dataclass(frozen=True)
class Rendered:
    name: str  # file stem, e.g. "fig4_seed_scatter"
    title: str
    caption: str = ""  # states n, the failure rule and the interval shown
    figure: Figure | None = None
    skipped: str = ""  # why `figure` is None


def arm_label(scheme: object, hparam_label: object) -> str:
    """'randomout tau=1e-08 P=1': the scheme and its hyperparameters, the unit a figure compares."""
    return f"{scheme} {'' if pd.isna(hparam_label) else hparam_label}".strip()


def _finished(trials: pd.DataFrame) -> pd.DataFrame:
    done = trials[trials["status"] == "finished"].copy()
    done["arm"] = [arm_label(s, h) for s, h in zip(done["scheme"], done["hparam_label"], strict=True)]
    return done


def failure_rule(trials: pd.DataFrame) -> str:
    rules = trials.loc[trials["status"] == "finished", "failure_rule"].dropna().unique()
    rules = rules if len(rules) else trials["failure_rule"].dropna().unique()
    return "; ".join(sorted(map(str, rules))) or "failure rule not recorded"


def _context(done: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The finished trials of the pair_key with the most finished trials, and a description."""
    counts = done["pair_key"].value_counts(sort=True)
    ctx = done[done["pair_key"] == counts.index[0]]
    first = ctx.iloc[0]
    text = f"context {first['model']}, {first['dataset']}, {first['filters']} filters per layer"
    if len(counts) > 1:
        text += f" (the largest of {len(counts)} contexts in this sweep)"
    return ctx, text


def _new_figure(title: str, subtitle: str, size: tuple[float, float] = (9.0, 5.0)) -> tuple[Figure, Axes]:
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg whatever the process-wide backend is
    fig.suptitle(title, fontsize=12, fontweight="bold")
    ax = fig.add_subplot()
    ax.set_title(textwrap.fill(subtitle, 120), fontsize=7.5, loc="left")
    ax.grid(alpha=0.3)
    return fig, ax


def _legend(ax: Axes, n_entries: int) -> None:
    ax.legend(fontsize=7, ncols=1 if n_entries <= 8 else 2, loc="best", framealpha=0.85)


def _n_range(counts: pd.Series) -> str:
    lo, hi = int(counts.min()), int(counts.max())
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def seed_scatter(trials: pd.DataFrame, summary: pd.DataFrame) -> Rendered:
    """Fig. 4: final accuracy of every seed, seeds sorted by the baseline's accuracy."""
    name, title = "fig4_seed_scatter", "Final test accuracy per seed (RandomOut Fig. 4)"
    done = _finished(trials)
    done = done[np.isfinite(done["final_test_acc"])]
    if done.empty:
        return Rendered(name, title, skipped="no finished trial has a final test accuracy")
    ctx, ctx_text = _context(done)
    wide = ctx.pivot_table(index="seed", columns="config_hash", values="final_test_acc")
    base = ctx.loc[ctx["scheme"] == BASELINE, "config_hash"].unique()
    order_by = wide[base[0]] if len(base) else wide.mean(axis=1)
    wide = wide.loc[order_by.sort_values(na_position="last").index, ctx["config_hash"].unique()]
    rows = summary.set_index("config_hash")
    sorted_by = "the baseline's accuracy" if len(base) else "the mean accuracy over arms (no baseline arm)"
    caption = (
        f"{ctx_text}. Each marker is one finished seed (raw values, no interval); x = seeds sorted by "
        f"{sorted_by}. Legend: n finished seeds per arm, failures k/n with the Wilson 95% CI. "
        f"Dotted line = chance, dashed = failure threshold. Failure rule: {failure_rule(trials)}."
    )
    fig, ax = _new_figure(title, caption)
    x = np.arange(len(wide))
    markers = "os^Dv<>pPX*h"
    for i, config in enumerate(wide.columns):
        r = rows.loc[config]
        label = (
            f"{arm_label(r.scheme, r.hparam_label)} (n={r.n}, failed {r.n_failed}/{r.n}, "
            f"CI {100 * r.failure_ci_low:.0f}-{100 * r.failure_ci_high:.0f}%)"
        )
        ax.plot(x, 100 * wide[config], markers[i % len(markers)], ms=5, alpha=0.8, label=label)
    chance = float(ctx["chance"].median())
    ax.axhline(100 * chance, color="grey", ls=":", lw=1)
    ax.axhline(100 * (chance + float(ctx["failure_margin"].median())), color="grey", ls="--", lw=1)
    ax.set_xticks(x, [str(s) for s in wide.index] if len(x) <= 40 else [""] * len(x), fontsize=6)
    ax.set_xlabel("seed (sorted)")
    ax.set_ylabel("final test accuracy (%)")
    _legend(ax, len(wide.columns))
    return Rendered(name, title, caption, fig)


def _tau_p(trials: pd.DataFrame) -> pd.DataFrame:
    ro = trials[trials["scheme"] == "randomout"]
    hp = [json.loads(h) if isinstance(h, str) else {} for h in ro["hparams"]]
    return pd.DataFrame(
        {
            "trial_key": ro["trial_key"].to_numpy(),
            "tau": [h.get("tau", np.nan) for h in hp],
            "P": [h.get("active_fraction", np.nan) for h in hp],
        }
    )


def _t_half_width(values: pd.Series) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    return float(scipy.stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n))


def tau_p_heatmap(trials: pd.DataFrame) -> Rendered:
    """Fig. 5: mean paired gain over the baseline for every (tau, P) cell of RandomOut."""
    name, title = "fig5_tau_p_heatmap", "Mean paired gain of RandomOut over baseline, tau x P (Fig. 5)"
    grid = _tau_p(trials).dropna()
    if grid.empty or (grid["tau"].nunique() < 2 and grid["P"].nunique() < 2):
        return Rendered(name, title, skipped="needs RandomOut trials with at least 2 tau or 2 P values")
    cells = paired_gains(trials).merge(grid, on="trial_key")
    if cells.empty:
        return Rendered(name, title, skipped="no RandomOut trial has a finished same-seed baseline")
    stats = cells.groupby(["tau", "P"])["gain"].agg(mean="mean", count="count", half=_t_half_width)
    taus, ps = sorted(grid["tau"].unique(), reverse=True), sorted(grid["P"].unique())
    mean = stats["mean"].unstack("P").reindex(index=taus, columns=ps) * 100
    n_contexts = trials.loc[trials["trial_key"].isin(cells["trial_key"]), "pair_key"].nunique()
    caption = (
        f"Cell = mean over seeds of (RandomOut - baseline) final test accuracy, same seed and context, in "
        f"points; n = {_n_range(stats['count'])} pairs per cell, pooled over {n_contexts} context(s); "
        f"± = 95% t-interval half-width of the mean. Failed trials keep their accuracy. "
        f"Failure rule: {failure_rule(trials)}."
    )
    fig, ax = _new_figure(title, caption, size=(1.6 * len(ps) + 4.0, 0.9 * len(taus) + 2.5))
    limit = float(np.nanmax(np.abs(mean.to_numpy()))) or 1.0
    image = ax.imshow(mean.to_numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for (i, tau), (j, p) in itertools.product(enumerate(taus), enumerate(ps)):
        if (tau, p) in stats.index:
            s = stats.loc[(tau, p)]
            text = f"{100 * s['mean']:+.2f}\n±{100 * s['half']:.2f}\nn={int(s['count'])}"
            dark = abs(100 * s["mean"]) > 0.6 * limit
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(len(ps)), [f"{p:g}" for p in ps])
    ax.set_yticks(range(len(taus)), [f"{t:g}" for t in taus])
    ax.set_xlabel("P (fraction of epochs with resets active)")
    ax.set_ylabel("tau (CGN threshold)")
    ax.grid(False)
    fig.colorbar(image, ax=ax, label="mean gain (points)")
    return Rendered(name, title, caption, fig)


def _quartiles(frame: pd.DataFrame, by: list[str], column: str) -> pd.DataFrame:
    grouped = frame.groupby(by, sort=False)[column]
    return pd.DataFrame(
        {
            "median": grouped.median(),
            "q25": grouped.quantile(0.25),
            "q75": grouped.quantile(0.75),
            "n": grouped.count(),
        }
    )


def accuracy_vs_filters(trials: pd.DataFrame) -> Rendered:
    """Fig. 6: final accuracy against filters per layer, one line per arm."""
    name, title = "fig6_accuracy_vs_filters", "Final test accuracy vs filters per layer (Fig. 6)"
    done = _finished(trials)
    done = done[np.isfinite(done["final_test_acc"])]
    if done["filters"].nunique() < 2:
        return Rendered(name, title, skipped="the number of filters does not vary in this sweep")
    q = _quartiles(done, ["arm", "filters"], "final_test_acc")
    caption = (
        f"{IQR_BAND}, of the final test accuracy of finished trials; n = {_n_range(q['n'])} seeds per point; "
        f"failed trials included. Failure rule: {failure_rule(trials)}."
    )
    fig, ax = _new_figure(title, caption)
    for arm, g in q.groupby(level="arm", sort=False):
        g = g.sort_index()
        w = g.index.get_level_values("filters").astype(float)
        (line,) = ax.plot(w, 100 * g["median"], "o-", ms=3, label=f"{arm} (n={_n_range(g['n'])})")
        ax.fill_between(w, 100 * g["q25"], 100 * g["q75"], color=line.get_color(), alpha=0.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("filters per layer")
    ax.set_ylabel("final test accuracy (%)")
    _legend(ax, q.index.get_level_values("arm").nunique())
    return Rendered(name, title, caption, fig)


def _epoch_figure(
    trials: pd.DataFrame,
    epochs: pd.DataFrame,
    column: str,
    name: str,
    title: str,
    ylabel: str,
    yscale: str,
) -> Rendered:
    """Median over seeds with IQR band of one per-epoch metric, one line per arm, main context."""
    done = _finished(trials)
    if done.empty or epochs.empty:
        return Rendered(name, title, skipped="no per-epoch metrics of finished trials")
    ctx, ctx_text = _context(done)
    rows = epochs[epochs["trial_key"].isin(ctx["trial_key"])].copy()
    rows[column] = rows[column].astype(float)
    rows = rows[np.isfinite(rows[column]) & ((rows[column] > 0) if yscale == "log" else True)]
    if column == "ortho_sum":  # only arms that compute the metric (RePr) record non-zero values
        rows = rows[rows.groupby("config_hash")[column].transform(lambda v: (v != 0).any())]
    if rows.empty:
        return Rendered(name, title, skipped=f"no finite {column} values recorded in the {ctx_text}")
    rows["arm"] = [arm_label(s, h) for s, h in zip(rows["scheme"], rows["hparam_label"], strict=True)]
    q = _quartiles(rows, ["arm", "epoch"], column)
    caption = (
        f"{ctx_text}; finished trials only. {IQR_BAND}; n = {_n_range(q['n'])} seeds per point. "
        f"Failure rule: {failure_rule(trials)}."
    )
    fig, ax = _new_figure(title, caption)
    for arm, g in q.groupby(level="arm", sort=False):
        g = g.sort_index()
        e = g.index.get_level_values("epoch").astype(float)
        (line,) = ax.plot(e, g["median"], "-", lw=1.5, label=f"{arm} (n={_n_range(g['n'])})")
        ax.fill_between(e, g["q25"], g["q75"], color=line.get_color(), alpha=0.15)
    if yscale == "symlog":
        ax.set_yscale("symlog", linthresh=1)
    else:
        ax.set_yscale(yscale)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    _legend(ax, q.index.get_level_values("arm").nunique())
    return Rendered(name, title, caption, fig)


def cgn_over_epochs(trials: pd.DataFrame, epochs: pd.DataFrame) -> Rendered:
    """Fig. 7: mean convolutional gradient norm (CGN) per epoch, log scale."""
    title = "Mean CGN over training (Fig. 7)"
    return _epoch_figure(trials, epochs, "cgn_mean", "fig7_cgn", title, "mean CGN per filter", "log")


def below_tau_over_epochs(trials: pd.DataFrame, epochs: pd.DataFrame) -> Rendered:
    """Fig. 8: (step, filter) checks with CGN below tau per epoch: what RandomOut resets, or would."""
    title = "Filters below tau per epoch (Fig. 8)"
    ylabel = "filter checks with CGN < tau"
    return _epoch_figure(trials, epochs, "below_tau", "fig8_below_tau", title, ylabel, "symlog")


def ortho_over_epochs(trials: pd.DataFrame, epochs: pd.DataFrame) -> Rendered:
    """RePr's summed Ortho score per epoch: how much filter overlap the ranking sees."""
    title = "RePr Ortho sum over training"
    return _epoch_figure(
        trials, epochs, "ortho_sum", "repr_ortho", title, "sum over filters of $O_l^f$", "linear"
    )


def all_figures(trials: pd.DataFrame, epochs: pd.DataFrame, summary: pd.DataFrame) -> list[Rendered]:
    """Every figure of the report, in reading order; absent data gives a `skipped` entry."""
    return [
        seed_scatter(trials, summary),
        tau_p_heatmap(trials),
        accuracy_vs_filters(trials),
        cgn_over_epochs(trials, epochs),
        below_tau_over_epochs(trials, epochs),
        ortho_over_epochs(trials, epochs),
    ]
