"""The per-run figure: one trial's per-filter CGN over epochs, one panel per layer, resets marked.

Drawn for every MLflow run (by the trial's worker, orchestrator/run/trial.py) and read there at 100 %,
so it is sized for a screen: 100 dpi, about 540 x 440 px per layer, text 11-15 px. A layer with up
to `LEGEND_MAX` filters shown draws one line per filter with a legend naming it; a wider layer is a
heat map (filters x epochs, colour = CGN on a log scale, black = 0, a dead filter), since dozens of
lines cannot be told apart. Resets are red crosses; the scheme's tau (RandomOut's reset threshold)
is a dashed line, or a line on the heat map's colour bar. The unit is stated on the axis: CGN is
the sum over a filter's weights of |dL/dw| for one minibatch, with the loss summed over the
minibatch (trainers/cgn.py), averaged over the epoch's steps.

It is cheap on purpose: numpy instead of pandas pivots, no layout engine (fixed margins in inches),
and `cgn_figure_png` draws on a canvas kept per process and layer count, so a worker that trains
hundreds of seeds builds its axes once (building them was about a third of the cost). A layer with
more than `max_filters` filters draws the ones that were ever reset and then the lowest by mean
CGN, and says so. Lines use a symmetric-log axis, so a dead filter (CGN 0) is drawn at 0; a net
whose filters were all dead throughout gets a linear axis at 0.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

PNG_COMPRESSION = 1  # zlib level: a third of the encoding time of the default 6, for a few % more bytes
DPI = 100
LEGEND_MAX = 8  # filters shown as lines with a legend; more are a heat map
# Inches per layer panel (x 100 dpi = px): the axes, the y label's margin left, and right of the axes
# the legend (lines) or the colour bar (heat map).
PANEL_W, PANEL_H = 5.4, 4.4
LEFT, AXES_W, BAR_GAP, BAR_W = 1.05, 2.95, 0.12, 0.16
TOP, BOTTOM = 0.75, 0.6
# Font sizes in points (x 100/72 = px at 100 dpi): ticks and legend 11 px, labels 12.5, titles 14-15.
TICK_PT, LABEL_PT, TITLE_PT, SUPTITLE_PT = 8.0, 9.0, 10.0, 11.0
CGN_UNIT = "CGN, epoch mean\nΣ|∂L/∂w| over the filter's weights,\nloss summed over the minibatch"
HEAT_UNIT = "CGN, epoch mean: Σ|∂L/∂w| per filter,\nloss summed over the minibatch"


@dataclass(frozen=True)
class LayerPanel:
    """What one layer's panel draws: epoch means of the filters shown, and where they were reset."""

    layer: str
    epochs: np.ndarray  # (E,)
    cgn: np.ndarray  # (E, shown): epoch-mean CGN, NaN where a filter has no row that epoch
    reset: np.ndarray  # (E, shown): reset that epoch
    total_resets: int  # over every filter of the layer, shown or not
    filters: int  # in the layer
    shown: np.ndarray  # (shown,): the filter index of each column

    @property
    def heat_map(self) -> bool:
        return self.cgn.shape[1] > LEGEND_MAX


def layer_panels(trace: pd.DataFrame, max_filters: int = 64) -> list[LayerPanel]:
    """Epoch-level trace rows (step -1) grouped per layer into (epoch x filter) grids."""
    rows = _epoch_rows(trace)
    layers = rows["layer"].to_numpy()
    epochs, filters = rows["epoch"].to_numpy(), rows["filter"].to_numpy()
    cgn, reset = rows["cgn"].to_numpy(dtype=float), rows["reset"].to_numpy(dtype=float)
    panels = []
    for layer in dict.fromkeys(layers):
        mine = layers == layer
        epoch_values, e = np.unique(epochs[mine], return_inverse=True)
        filter_values, f = np.unique(filters[mine], return_inverse=True)
        shape = (len(epoch_values), len(filter_values))
        sums, counts, resets = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        np.add.at(sums, (e, f), cgn[mine])
        np.add.at(counts, (e, f), 1)
        np.add.at(resets, (e, f), reset[mine])
        means = np.divide(sums, counts, out=np.full(shape, np.nan), where=counts > 0)
        ever = resets.sum(axis=0) > 0
        never = np.flatnonzero(~ever)
        with np.errstate(all="ignore"):  # a filter without any value sorts last
            filter_means = np.nanmean(np.where(counts > 0, means, np.nan), axis=0)
        order = np.concatenate([np.flatnonzero(ever), never[np.argsort(filter_means[never], kind="stable")]])
        shown = order[:max_filters]
        panels.append(
            LayerPanel(
                layer=str(layer),
                epochs=epoch_values,
                cgn=means[:, shown],
                reset=resets[:, shown] > 0,
                total_resets=int(resets.sum()),
                filters=len(filter_values),
                shown=filter_values[shown],
            )
        )
    return panels


def filter_cgn_figure(
    trace: pd.DataFrame, title: str, max_filters: int = 64, tau: float | None = None
) -> Figure:
    """A new figure of one trial's per-filter CGN (the caller owns it). `tau`: the scheme's CGN
    threshold, drawn as a line (None: the scheme has none)."""
    figure = _canvas(len(set(_epoch_rows(trace)["layer"])))
    _draw(figure, trace, title, max_filters, tau)
    return figure


def cgn_figure_png(trace: pd.DataFrame, title: str, max_filters: int = 64, tau: float | None = None) -> bytes:
    """The same drawing as PNG bytes, drawn on this process's canvas for that many layers."""
    figure = _kept_canvas(len(set(_epoch_rows(trace)["layer"])))
    _draw(figure, trace, title, max_filters, tau)
    png = io.BytesIO()
    figure.savefig(png, format="png", pil_kwargs={"compress_level": PNG_COMPRESSION})
    return png.getvalue()


def scheme_tau(hparams: dict | None) -> float | None:
    """The CGN threshold a scheme acts on (RandomOut's `tau`), from its hyperparameters; else None."""
    tau = (hparams or {}).get("tau")
    return float(tau) if isinstance(tau, int | float) and not isinstance(tau, bool) else None


def _epoch_rows(trace: pd.DataFrame) -> pd.DataFrame:
    """The per-epoch mean rows (step -1); a trace without steps holds only those."""
    return trace[trace["step"] == -1] if "step" in trace else trace


def _canvas(layers: int) -> Figure:
    """One (axes, colour bar axes) pair per layer at fixed positions in inches: no layout engine."""
    layers = max(1, layers)
    width = PANEL_W * layers
    figure = Figure(figsize=(width, PANEL_H), dpi=DPI)
    FigureCanvasAgg(figure)
    bottom, height = BOTTOM / PANEL_H, (PANEL_H - TOP - BOTTOM) / PANEL_H
    for i in range(layers):
        x = i * PANEL_W + LEFT
        figure.add_axes((x / width, bottom, AXES_W / width, height))
    for i in range(layers):
        x = i * PANEL_W + LEFT + AXES_W + BAR_GAP
        figure.add_axes((x / width, bottom, BAR_W / width, height))
    return figure


@functools.lru_cache(maxsize=4)
def _kept_canvas(layers: int) -> Figure:
    return _canvas(layers)


def _draw(figure: Figure, trace: pd.DataFrame, title: str, max_filters: int, tau: float | None) -> None:
    """Everything a panel shows is set here on every draw, so a kept canvas carries nothing over."""
    panels = layer_panels(trace, max_filters)
    cgn = _epoch_rows(trace)["cgn"].to_numpy(dtype=float)
    positive = cgn[cgn > 0]
    low = float(positive.min()) if len(positive) else None
    if tau is not None and tau > 0:
        low = tau if low is None else min(low, tau)  # the tau line stays apart from 0
    high = float(positive.max()) if len(positive) else 1.0
    figure.suptitle(title, fontsize=SUPTITLE_PT)
    half = len(figure.axes) // 2
    for ax, bar, panel in zip(figure.axes[:half], figure.axes[half:], panels, strict=True):
        _clear(ax, bar)
        if panel.heat_map:
            _draw_heat_map(ax, bar, panel, low, high, tau)
        else:
            _draw_lines(ax, bar, panel, low, tau)
        ax.set_title(f"{panel.layer}: {panel.cgn.shape[1]} of {panel.filters} filters", fontsize=TITLE_PT)
        resets = f" (red x = reset: {panel.total_resets} in the layer)" if panel.heat_map else ""
        ax.set_xlabel(f"epoch{resets}", fontsize=LABEL_PT)
        ax.tick_params(labelsize=TICK_PT)


def _draw_lines(ax: Axes, bar: Axes, panel: LayerPanel, low: float | None, tau: float | None) -> None:
    bar.set_visible(False)
    for j in np.argsort(panel.shown, kind="stable"):  # the legend in filter order
        ax.plot(panel.epochs, panel.cgn[:, j], "-", lw=1.2, alpha=0.8, label=f"filter {panel.shown[j]}")
    at = np.broadcast_to(panel.epochs[:, None], panel.reset.shape)
    ax.plot(
        at[panel.reset], panel.cgn[panel.reset], "x", color="red", ms=7, mew=1.5,
        label=f"reset ({panel.total_resets})",
    )  # fmt: skip
    if tau is not None:
        ax.axhline(tau, color="0.15", ls="--", lw=1.0, label=f"tau = {tau:g}")
    if low is not None:
        ax.set_yscale("symlog", linthresh=low)
        ax.yaxis.get_major_locator().set_params(numticks=6)  # readable labels over many decades
    else:  # every filter was dead throughout: a linear axis at 0 says so plainly
        ax.set_yscale("linear")
    ax.relim()
    ax.autoscale(True)  # a heat map drawn on this kept canvas before fixed (and flipped) the limits
    if ax.yaxis_inverted():
        ax.invert_yaxis()
    ax.set_ylabel(CGN_UNIT, fontsize=LABEL_PT)
    # One epoch: its own tick, not fractions of an epoch around it.
    locator = FixedLocator(panel.epochs) if len(panel.epochs) == 1 else MaxNLocator(integer=True)
    ax.xaxis.set_major_locator(locator)
    ax.legend(fontsize=TICK_PT, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _draw_heat_map(
    ax: Axes, bar: Axes, panel: LayerPanel, low: float | None, high: float, tau: float | None
) -> None:
    """Filters (rows, as ordered: reset ones first, then the lowest mean CGN) x epochs; black = 0."""
    bar.set_visible(True)
    low = (low if low is not None else high / 10) / 2  # the lowest value (or tau) stays inside the scale
    norm = LogNorm(vmin=low, vmax=max(high, low * 10))
    cmap = colormaps["viridis"].with_extremes(under="black", bad="0.85")
    values = np.where(panel.cgn > 0, panel.cgn, low / 2).T  # 0 -> below the scale: black
    values = np.where(np.isnan(panel.cgn.T), np.nan, values)
    edges = _edges(panel.epochs.astype(float))
    rows = np.arange(len(panel.shown) + 1) - 0.5
    mesh = ax.pcolormesh(edges, rows, np.ma.masked_invalid(values), cmap=cmap, norm=norm)
    filter_at, epoch_at = np.nonzero(panel.reset.T)
    ax.plot(panel.epochs[epoch_at], filter_at, "x", color="red", ms=6, mew=1.5)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(rows[-1], rows[0])  # the first filter on top
    ax.set_yscale("linear")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    shown = panel.shown
    ax.yaxis.set_major_formatter(
        FuncFormatter(lambda y, _: str(shown[int(y)]) if 0 <= int(y) < len(shown) and y == int(y) else "")
    )
    ax.set_ylabel("filter (reset ones first, then by CGN)", fontsize=LABEL_PT)
    colorbar = bar.figure.colorbar(mesh, cax=bar, extend="min")
    line = f"; red line = tau {tau:g}" if tau is not None and tau > 0 else ""
    colorbar.set_label(f"{HEAT_UNIT}\nblack = 0 (dead){line}", fontsize=TICK_PT)
    bar.tick_params(labelsize=TICK_PT)
    if line:
        bar.axhline(tau, color="red", lw=2.0)


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges around epoch numbers (which may skip): halfway between neighbours."""
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    middle = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - middle[0]], middle, [2 * centres[-1] - middle[-1]]])


def _clear(ax: Axes, bar: Axes) -> None:
    """The previous trial's drawing, without rebuilding the panel's axes (what `ax.clear` costs)."""
    for artist in [*ax.lines, *ax.collections, *ax.texts]:
        artist.remove()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    ax.set_prop_cycle(None)  # colours start again from the first, as on a new axes
    if bar.get_visible():  # a colour bar (or a new axes) sets its scale, ticks and label: cleared
        bar.clear()
