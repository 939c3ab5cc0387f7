"""The RandomOut paper's figures, drawn from the aggregated tables only.

Each builder takes the `trials` / `epochs` tables (see dashboards.stats / orchestrator.aggregate)
and returns a `Rendered`: either a matplotlib Figure with a caption that states n, the failure
rule and the interval shown, or the reason the figure could not be drawn. Figures are plain
`Figure` objects (Agg canvas, no pyplot state), so building a report never opens a window.

Seed pairing only makes sense within one context (model, dataset, width: a `pair_key`), so the
per-seed and per-epoch figures draw one panel per context (grid point), up to MAX_PANELS, and
say how many there are. Figures of a scheme the sweep does not have are left out altogether.

Longer than the ~450 lines a module usually gets, on purpose: every figure states the same things in
its caption (n, the failure rule, the interval) through the one set of panel and caption helpers here,
and `all_figures` is the one list of what a report draws; split by figure, those rules would have
several owners.
"""

from __future__ import annotations

import itertools
import json
import textwrap
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dashboards.decision import failure_profile
from dashboards.stats import BASELINE, paired_gains, wilson_interval

IQR_BAND = "line = median over seeds, band = interquartile range (25th-75th percentile)"
MAX_PANELS = 12  # grid points drawn per figure; the caption names what was left out


@dataclass(frozen=True)
class Rendered:
    name: str  # file stem, e.g. "fig4_seed_scatter"
    title: str
    caption: str = ""  # states n, the failure rule and the interval shown
    figure: Figure | None = None
    skipped: str = ""  # why `figure` is None


def alt_text(fig: Figure) -> str:
    """What a figure draws, read back from its artists: per axes, each series and its interval bars.

    The report uses it as the image's alt text, so a reader without the picture (or a test in a
    browser) learns the panels, the series and which ones carry intervals.
    """
    parts = []
    for ax in fig.get_axes():
        if not ax.get_ylabel():
            continue  # a colorbar
        series = []
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        in_bars = {id(c.lines[0]) for c in bars}
        for c in bars:
            series.append(f"{c.get_label()}: {len(c.lines[0].get_xdata())} points with interval bars")
        for line in ax.get_lines():
            if id(line) not in in_bars and not line.get_label().startswith("_"):
                series.append(f"{line.get_label()}: line")
        where = f" [{ax.get_title()}]" if ax.get_title() else ""
        parts.append(f"panel {ax.get_ylabel()}{where}: " + "; ".join(series or ["no labelled series"]))
    return " | ".join(parts)


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


NO_ACCURACY = "no finished trial has a final test accuracy"


def _with_accuracy(trials: pd.DataFrame) -> pd.DataFrame:
    """The finished trials with a finite final accuracy (a diverged one has none)."""
    done = _finished(trials)
    return done[np.isfinite(done["final_test_acc"])]


def _context(done: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The finished trials of the pair_key with the most finished trials, and a description."""
    counts = done["pair_key"].value_counts(sort=True)
    ctx = done[done["pair_key"] == counts.index[0]]
    first = ctx.iloc[0]
    text = f"context {first['model']}, {first['dataset']}, {first['filters']} filters per layer"
    if len(counts) > 1:
        text += f" (the largest of {len(counts)} contexts in this sweep)"
    return ctx, text


def _context_title(trial: pd.Series) -> str:
    """Model, data and width; a custom net's width is its builder's kwargs (e.g. `model.width=4`)."""
    parts = [str(trial["model"]), str(trial["dataset"])]
    if not pd.isna(trial["filters"]):
        parts.append(f"{trial['filters']} filters")
    setting = trial.get("setting")
    setting = json.loads(setting) if isinstance(setting, str) else {}
    own = {k: v for k, v in setting.items() if k.startswith(("model.", "data."))}
    return ", ".join(parts + [f"{k}={v}" for k, v in own.items()])


def _contexts(done: pd.DataFrame) -> tuple[list[tuple[pd.DataFrame, str]], str]:
    """One (trials, title) per context, ordered by width; and a sentence for the caption."""
    groups = []
    for _, ctx in done.groupby("pair_key", sort=False):
        first = ctx.iloc[0]
        groups.append((first["filters"], ctx, _context_title(first)))
    groups.sort(key=lambda g: (pd.isna(g[0]), g[0] if not pd.isna(g[0]) else 0))
    text = f"one panel per context ({len(groups)} in this sweep)"
    if len(groups) > MAX_PANELS:
        text += f"; the first {MAX_PANELS} by width are drawn"
    return [(ctx, title) for _, ctx, title in groups[:MAX_PANELS]], text


def _panels(
    title: str, n: int, rows_per_panel: int = 1, panel_size: tuple[float, float] = (4.6, 3.2)
) -> tuple[Figure, list[list[Axes]]]:
    """A figure of n panels (each `rows_per_panel` stacked axes sharing x), its title on top.

    The caption is page text only (the report's figcaption), not drawn into the image as well: one
    copy, which wraps with the page instead of being cut at the image's edge.
    """
    cols = min(n, 3)
    grid_rows = -(-n // cols)
    width = max(9.0, panel_size[0] * cols)
    body_h = panel_size[1] * grid_rows * (1 if rows_per_panel == 1 else 1.4)
    fig = Figure(figsize=(width, body_h + 0.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(textwrap.fill(title, int(9 * width)), fontsize=12, fontweight="bold")
    outer = fig.add_gridspec(grid_rows, cols)
    panels = []
    for i in range(n):
        inner = outer[i // cols, i % cols].subgridspec(rows_per_panel, 1, hspace=0.05)
        axes: list[Axes] = []
        for j in range(rows_per_panel):
            ax = fig.add_subplot(inner[j], sharex=axes[0] if axes else None)
            ax.grid(alpha=0.3)
            axes.append(ax)
        panels.append(axes)
    return fig, panels


def _new_figure(title: str, size: tuple[float, float] = (9.0, 5.0)) -> tuple[Figure, Axes]:
    """One axes under a title wrapped to the figure's width (the caption is page text: see `_panels`)."""
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg whatever the process-wide backend is
    fig.suptitle(textwrap.fill(title, int(9 * size[0])), fontsize=12, fontweight="bold")
    ax = fig.add_subplot()
    ax.grid(alpha=0.3)
    return fig, ax


def _legend(ax: Axes, n_entries: int) -> None:
    ax.legend(fontsize=7.5, ncols=1 if n_entries <= 8 else 2, loc="best", framealpha=0.85)


def _n_range(counts: pd.Series) -> str:
    lo, hi = int(counts.min()), int(counts.max())
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def seed_scatter(trials: pd.DataFrame, summary: pd.DataFrame) -> Rendered:
    """Fig. 4: final accuracy of every seed, seeds sorted by the baseline's accuracy, per context."""
    name, title = "fig4_seed_scatter", "Final test accuracy per seed (RandomOut Fig. 4)"
    done = _with_accuracy(trials)
    if done.empty:
        return Rendered(name, title, skipped=NO_ACCURACY)
    contexts, ctx_text = _contexts(done)
    caption = (
        f"{ctx_text}. Each marker is one finished seed (raw values, no interval); x = seeds sorted by "
        "the baseline's accuracy (by the mean over arms where a context has no baseline). Legend: n "
        "finished seeds per arm, failures k/n with the Wilson 95% CI. Dotted line = chance, dashed = "
        f"failure threshold. Failure rule: {failure_rule(trials)}."
    )
    fig, panels = _panels(title, len(contexts))
    rows = summary.set_index("config_hash")
    markers = "os^Dv<>pPX*h"
    for (ctx, ctx_title), (ax,) in zip(contexts, panels, strict=True):
        wide = ctx.pivot_table(index="seed", columns="config_hash", values="final_test_acc")
        base = ctx.loc[ctx["scheme"] == BASELINE, "config_hash"].unique()
        order_by = wide[base[0]] if len(base) else wide.mean(axis=1)
        wide = wide.loc[order_by.sort_values(na_position="last").index, ctx["config_hash"].unique()]
        x = np.arange(len(wide))
        for i, config in enumerate(wide.columns):
            r = rows.loc[config]
            label = (
                f"{arm_label(r.scheme, r.hparam_label)} (n={r.n}, failed {r.n_failed}/{r.n}, "
                f"CI {100 * r.failure_ci_low:.0f}-{100 * r.failure_ci_high:.0f}%)"
            )
            ax.plot(x, 100 * wide[config], markers[i % len(markers)], ms=4, alpha=0.8, label=label)
        chance = float(ctx["chance"].median())
        ax.axhline(100 * chance, color="grey", ls=":", lw=1)
        ax.axhline(100 * (chance + float(ctx["failure_margin"].median())), color="grey", ls="--", lw=1)
        ax.set_xticks(x, [str(s) for s in wide.index] if len(x) <= 20 else [""] * len(x), fontsize=7.5)
        ax.set_title(ctx_title, fontsize=8)
        ax.set_xlabel("seed (sorted)", fontsize=7.5)
        ax.set_ylabel("final test accuracy (%)", fontsize=7.5)
        ax.legend(fontsize=7.5, loc="lower right", framealpha=0.85)
    return Rendered(name, title, caption, fig)


def failure_profiles(trials: pd.DataFrame) -> Rendered:
    """Share of seeds above each accuracy, per arm and context, with pointwise Wilson bands: the whole
    seed distribution at once (rliable's performance profile), where the failure rate is one point."""
    name, title = "failure_profile", "Share of seeds above each final accuracy (failure profile)"
    done = _with_accuracy(trials)
    if done.empty:
        return Rendered(name, title, skipped=NO_ACCURACY)
    contexts, ctx_text = _contexts(done)
    caption = (
        f"{ctx_text}. A line per arm: the share of its finished seeds whose final test accuracy is above "
        "x (n per arm in the legend); band = pointwise Wilson 95% CI of that share. Dashed line = "
        "failure threshold: where a line meets it is 1 - the failure rate. "
        f"Failure rule: {failure_rule(trials)}."
    )
    fig, panels = _panels(title, len(contexts))
    grid = np.linspace(0.0, 1.0, 201)
    for (ctx, ctx_title), (ax,) in zip(contexts, panels, strict=True):
        for _, arm in ctx.groupby("config_hash", sort=False):
            acc = arm["final_test_acc"].to_numpy(float)
            profile = failure_profile(acc, grid)
            first = arm.iloc[0]
            line = ax.step(
                100 * grid,
                100 * profile["share_above"],
                where="post",
                lw=1.5,
                label=f"{arm_label(first['scheme'], first['hparam_label'])} (n={acc.size})",
            )[0]
            ax.fill_between(
                100 * grid,
                100 * profile["ci_low"],
                100 * profile["ci_high"],
                step="post",
                color=line.get_color(),
                alpha=0.15,
                lw=0,
            )
        threshold = float(ctx["chance"].median()) + float(ctx["failure_margin"].median())
        ax.axvline(100 * threshold, color="grey", ls="--", lw=1)
        ax.set_ylim(0, 100)
        ax.set_title(ctx_title, fontsize=8)
        ax.set_xlabel("final test accuracy x (%)", fontsize=7.5)
        ax.set_ylabel("seeds above x (%)", fontsize=7.5)
        _legend(ax, ctx["config_hash"].nunique())
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
        f"± = 95% t-interval half-width of the mean. Only a cell whose interval excludes 0 is coloured "
        f"(blue = gain, red = loss); a cell whose interval includes 0 (or has one pair) is grey and reads "
        f"as no effect shown. Failed trials keep their accuracy. Failure rule: {failure_rule(trials)}."
    )
    fig, ax = _new_figure(title, size=(1.6 * len(ps) + 4.5, 0.9 * len(taus) + 2.5))
    half = stats["half"].unstack("P").reindex(index=taus, columns=ps) * 100
    shown = mean.where(half.notna() & (mean.abs() > half))  # the interval excludes 0: an effect
    limit = float(np.nanmax(np.abs(mean.to_numpy()))) or 1.0
    cmap = colormaps["RdBu"].with_extremes(bad="0.88")
    image = ax.imshow(
        np.ma.masked_invalid(shown.to_numpy()), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto"
    )
    for (i, tau), (j, p) in itertools.product(enumerate(taus), enumerate(ps)):
        if (tau, p) in stats.index:
            s = stats.loc[(tau, p)]
            text = f"{100 * s['mean']:+.2f}\n±{100 * s['half']:.2f}\nn={int(s['count'])}"
            value = shown.iloc[i, j]
            dark = not pd.isna(value) and abs(value) > 0.6 * limit
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(ps)), [f"{p:g}" for p in ps])
    ax.set_yticks(range(len(taus)), [f"{t:g}" for t in taus])
    ax.set_xlabel("P (fraction of epochs with resets active)")
    ax.set_ylabel("tau (CGN threshold)")
    ax.grid(False)
    fig.colorbar(image, ax=ax, label="mean gain (points), where its 95% interval excludes 0")
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
    """Fig. 6: final accuracy and failure rate against filters per layer, one series per arm.

    Mean with a 95% t-interval, the median as a second marker and every seed as a dot, on the
    full accuracy range, so dead seeds stay in view; below, the failure rate with Wilson bars.
    """
    name, title = (
        "fig6_accuracy_vs_filters",
        "Final test accuracy and failure rate vs filters per layer (Fig. 6)",
    )
    done = _finished(trials)
    if done["filters"].nunique() < 2:
        return Rendered(name, title, skipped="the number of filters does not vary in this sweep")
    acc = done[np.isfinite(done["final_test_acc"])]
    n_acc = acc.groupby(["arm", "filters"])["final_test_acc"].count()
    caption = (
        "Top: circle = mean final test accuracy of finished trials with its 95% t-interval (bars, cut at "
        "0 and 100 %), "
        "x = median, dots = every seed (failed ones included, jittered sideways); "
        f"n = {_n_range(n_acc)} seeds per point. Bottom: failure rate with the Wilson 95% interval, "
        f"n = finished trials per point. Failure rule: {failure_rule(trials)}."
    )
    fig, [[top, bottom]] = _panels(title, 1, rows_per_panel=2, panel_size=(9.0, 4.0))
    arms = list(dict.fromkeys(done["arm"]))
    widths = sorted(done["filters"].dropna().unique())
    step = min(np.diff(widths)) if len(widths) > 1 else 1.0
    offsets = np.linspace(-0.15, 0.15, len(arms)) * step if len(arms) > 1 else [0.0]
    rng = np.random.default_rng(0)  # jitter only; the same picture every build
    for arm, offset in zip(arms, offsets, strict=True):
        g = acc[acc["arm"] == arm]
        stats = g.groupby("filters")["final_test_acc"].agg(["mean", "median", "count", _t_half_width])
        w = stats.index.to_numpy(dtype=float) + offset
        centre, half = 100 * stats["mean"], 100 * stats["_t_half_width"].fillna(0)
        # An accuracy lies in 0-100 %: the t-interval is cut there rather than drawn past the axis.
        below, above = centre - (centre - half).clip(lower=0), (centre + half).clip(upper=100) - centre
        bars = top.errorbar(
            w,
            centre,
            yerr=[below.to_numpy(), above.to_numpy()],
            fmt="o-",
            ms=4,
            capsize=3,
            label=f"{arm} (n={_n_range(stats['count'])})",
        )
        color = bars.lines[0].get_color()
        top.plot(w, 100 * stats["median"], "x", color=color, ms=6)
        x = g["filters"].to_numpy(dtype=float) + offset + rng.uniform(-0.04, 0.04, len(g)) * step
        top.plot(x, 100 * g["final_test_acc"], ".", color=color, ms=3, alpha=0.35)
        f = done[done["arm"] == arm].groupby("filters")["failed"].agg(["sum", "count"])
        ci = np.array([wilson_interval(int(k), int(n)) for k, n in zip(f["sum"], f["count"], strict=True)])
        rate = f["sum"] / f["count"]
        bottom.errorbar(
            f.index.to_numpy(dtype=float) + offset,
            100 * rate,
            yerr=[100 * (rate - ci[:, 0]), 100 * (ci[:, 1] - rate)],
            fmt="s-",
            ms=4,
            capsize=3,
            color=color,
            label=f"{arm} failure rate",
        )
    top.set_ylim(0, 100)
    top.set_ylabel("final test accuracy (%)")
    top.legend(fontsize=7.5, loc="lower right", framealpha=0.85)
    top.tick_params(labelbottom=False)
    bottom.set_ylim(-2, 102)
    bottom.set_ylabel("failed (%)")
    bottom.set_xlabel("filters per layer")
    bottom.set_xticks(widths)
    return Rendered(name, title, caption, fig)


def _epoch_rows(trials: pd.DataFrame, epochs: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per-epoch rows of finished trials with a finite `column`, labelled by arm and failure."""
    done = _finished(trials)
    rows = epochs[epochs["trial_key"].isin(done["trial_key"])].copy()
    rows[column] = rows[column].astype(float)
    rows = rows[np.isfinite(rows[column])]
    info = done.set_index("trial_key")
    rows["arm"] = [arm_label(s, h) for s, h in zip(rows["scheme"], rows["hparam_label"], strict=True)]
    rows["failed"] = info.loc[rows["trial_key"], "failed"].to_numpy(dtype=bool)
    rows["pair_key"] = info.loc[rows["trial_key"], "pair_key"].to_numpy()
    rows["model"] = info.loc[rows["trial_key"], "model"].to_numpy()
    rows["dataset"] = info.loc[rows["trial_key"], "dataset"].to_numpy()
    return rows


def _band(ax: Axes, rows: pd.DataFrame, column: str, label: str, color: object = None) -> object:
    q = _quartiles(rows, ["epoch"], column).sort_index()
    e = q.index.to_numpy(dtype=float)
    (line,) = ax.plot(e, q["median"], "-", lw=1.5, color=color, label=f"{label} (n={_n_range(q['n'])})")
    ax.fill_between(e, q["q25"], q["q75"], color=line.get_color(), alpha=0.15)
    return line.get_color()


def _epoch_figure(
    trials: pd.DataFrame, epochs: pd.DataFrame, column: str, name: str, title: str, ylabel: str, kind: str
) -> Rendered:
    """One panel per context of a per-epoch metric, one series per arm (finished trials only).

    kind: "band" = median and IQR; "cgn" = the same on a symlog axis that keeps CGN 0 (dead
    seeds) in view and counts them; "below" = mean over seeds above, share of seeds with any
    filter below tau beneath; "accuracy" = median and IQR of non-failed seeds, failed seeds drawn
    one by one.
    """
    if epochs.empty or _finished(trials).empty:
        return Rendered(name, title, skipped="no per-epoch metrics of finished trials")
    rows = _epoch_rows(trials, epochs, column)
    if column == "ortho_sum":  # only arms that compute the metric (RePr) record non-zero values
        rows = rows[rows.groupby("config_hash")[column].transform(lambda v: (v != 0).any())]
    if rows.empty:
        return Rendered(name, title, skipped=f"no finite {column} values recorded")
    contexts, ctx_text = _contexts(rows.drop_duplicates("trial_key").assign(filters=lambda f: f["filters"]))
    keys = [ctx["pair_key"].iloc[0] for ctx, _ in contexts]
    how = {
        "band": IQR_BAND,
        "cgn": f"{IQR_BAND}; symmetric-log axis (linear below the smallest positive value), so a CGN of 0 "
        "is drawn at 0, not dropped",
        "below": "upper axis = mean over seeds of (step, filter) checks with CGN < tau; lower axis = share "
        "of seeds with at least one filter below tau in that epoch",
        "accuracy": "line = median over non-failed seeds, band = their interquartile range; thin dashed "
        "lines = each failed seed",
    }[kind]
    caption = f"{ctx_text}; finished trials only. {how}."
    if kind == "cgn":
        dead = rows.loc[rows[column] <= 0, "trial_key"].unique()
        caption += (
            f" {len(dead)} of {rows['trial_key'].nunique()} seeds reach a mean CGN of 0 (dead) in some epoch."
        )
    caption += f" Failure rule: {failure_rule(trials)}."
    fig, panels = _panels(title, len(keys), rows_per_panel=2 if kind == "below" else 1)
    colors = {arm: f"C{i}" for i, arm in enumerate(dict.fromkeys(rows["arm"]))}
    for key, (_, ctx_title), axes in zip(keys, contexts, panels, strict=True):
        ctx = rows[rows["pair_key"] == key]
        ax = axes[0]
        for arm, g in ctx.groupby("arm", sort=False):
            color = colors[arm]
            if kind == "below":
                per_epoch = g.groupby("epoch")[column]
                e = np.array(sorted(g["epoch"].unique()), dtype=float)
                n = _n_range(per_epoch.count())
                ax.plot(e, per_epoch.mean().sort_index(), "-", color=color, label=f"{arm} (n={n})")
                share = per_epoch.apply(lambda v: float((v > 0).mean())).sort_index()
                axes[1].plot(e, 100 * share, "o-", ms=3, color=color)
            elif kind == "accuracy":
                ok, bad = g[~g["failed"]], g[g["failed"]]
                if not ok.empty:
                    _band(ax, ok.assign(**{column: 100 * ok[column]}), column, f"{arm} non-failed", color)
                for i, (_, seed) in enumerate(bad.groupby("trial_key")):
                    seed = seed.sort_values("epoch")
                    label = f"{arm} failed ({bad['trial_key'].nunique()})" if i == 0 else None
                    ax.plot(
                        seed["epoch"], 100 * seed[column], "--", lw=0.8, alpha=0.6, color=color, label=label
                    )
            else:
                _band(ax, g, column, arm, color)
        if kind == "cgn":
            positive = ctx.loc[ctx[column] > 0, column]
            ax.set_yscale("symlog", linthresh=float(positive.min()) if len(positive) else 1e-12)
        if kind == "below":
            ax.set_yscale("symlog", linthresh=1)
            axes[1].set_ylim(-5, 105)
            axes[1].set_ylabel("seeds below tau (%)", fontsize=7.5)
            axes[1].set_xlabel("epoch", fontsize=7.5)
            ax.tick_params(labelbottom=False)
        else:
            ax.set_xlabel("epoch", fontsize=7.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(ctx_title, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=7.5)
        ax.legend(fontsize=7.5, loc="best", framealpha=0.85)
    return Rendered(name, title, caption, fig)


@dataclass(frozen=True)
class EpochFigure:
    """A per-epoch figure (`_epoch_figure`): its metric column, file name, title, y label and kind."""

    column: str
    name: str
    title: str
    ylabel: str
    kind: str

    def render(self, trials: pd.DataFrame, epochs: pd.DataFrame) -> Rendered:
        return _epoch_figure(trials, epochs, self.column, self.name, self.title, self.ylabel, self.kind)


# Test accuracy per epoch: how non-failed seeds learn, and where failed ones stall.
ACCURACY = EpochFigure(
    "test_acc", "accuracy_epochs", "Test accuracy over training", "test accuracy (%)", "accuracy"
)
# Fig. 7: mean convolutional gradient norm (CGN) per epoch; zeros kept on a symlog axis.
CGN = EpochFigure("cgn_mean", "fig7_cgn", "Mean CGN over training (Fig. 7)", "mean CGN per filter", "cgn")
# Fig. 8: (step, filter) checks with CGN below tau per epoch: what RandomOut resets, or would.
BELOW_TAU = EpochFigure(
    "below_tau",
    "fig8_below_tau",
    "Filters below tau per epoch (Fig. 8)",
    "mean checks with CGN < tau",
    "below",
)
# RePr's summed Ortho score per epoch: how much filter overlap the ranking sees.
ORTHO = EpochFigure(
    "ortho_sum", "repr_ortho", "RePr Ortho sum over training", "sum over filters of $O_l^f$", "band"
)


def all_figures(trials: pd.DataFrame, epochs: pd.DataFrame, summary: pd.DataFrame) -> list[Rendered]:
    """Every figure of the report, in reading order; absent data gives a `skipped` entry.

    A figure about one scheme (the tau x P map: RandomOut; the Ortho sum: RePr) is left out, not
    skipped, when the sweep has no trial of that scheme: it has nothing to say there.
    """
    schemes = set(trials["scheme"].dropna())
    figures = [seed_scatter(trials, summary), failure_profiles(trials)]
    if "randomout" in schemes:
        figures.append(tau_p_heatmap(trials))
    figures += [
        accuracy_vs_filters(trials),
        *(figure.render(trials, epochs) for figure in (ACCURACY, CGN, BELOW_TAU)),
    ]
    if "repr" in schemes:
        figures.append(ORTHO.render(trials, epochs))
    return figures
