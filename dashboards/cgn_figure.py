"""The per-run figure: one trial's per-filter CGN over epochs, one panel per layer, resets marked.

It is drawn for every MLflow run (by the trial's worker, orchestrator/run/trial.py), so it is
small and cheap on purpose: numpy instead of pandas pivots, one plot call per layer, no layout
engine, and `cgn_figure_png` draws on a canvas kept per process and layer count, so a worker
that trains hundreds of seeds builds its axes once (building them was about a third of the
cost). A layer with more than `max_filters` filters draws the ones that were ever reset and
then the lowest by mean CGN, and says so. Symmetric-log axis, so a dead filter (CGN 0) is drawn
at 0; a net whose filters were all dead throughout gets a linear axis at 0.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator

PNG_COMPRESSION = 1  # zlib level: a third of the encoding time of the default 6, for a few % more bytes


@dataclass(frozen=True)
class LayerPanel:
    """What one layer's panel draws: epoch means of the filters shown, and where they were reset."""

    layer: str
    epochs: np.ndarray  # (E,)
    cgn: np.ndarray  # (E, shown): epoch-mean CGN, NaN where a filter has no row that epoch
    reset: np.ndarray  # (E, shown): reset that epoch
    total_resets: int  # over every filter of the layer, shown or not
    filters: int  # in the layer


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
            )
        )
    return panels


def filter_cgn_figure(trace: pd.DataFrame, title: str, max_filters: int = 64) -> Figure:
    """A new figure of one trial's per-filter CGN (the caller owns it)."""
    figure = _canvas(len(set(_epoch_rows(trace)["layer"])))
    _draw(figure, trace, title, max_filters)
    return figure


def cgn_figure_png(trace: pd.DataFrame, title: str, max_filters: int = 64) -> bytes:
    """The same drawing as PNG bytes, drawn on this process's canvas for that many layers."""
    figure = _kept_canvas(len(set(_epoch_rows(trace)["layer"])))
    _draw(figure, trace, title, max_filters)
    png = io.BytesIO()
    figure.savefig(png, format="png", pil_kwargs={"compress_level": PNG_COMPRESSION})
    return png.getvalue()


def _epoch_rows(trace: pd.DataFrame) -> pd.DataFrame:
    """The per-epoch mean rows (step -1); a trace without steps holds only those."""
    return trace[trace["step"] == -1] if "step" in trace else trace


def _canvas(layers: int) -> Figure:
    figure = Figure(figsize=(3.2 * max(1, layers), 2.8), dpi=80)
    FigureCanvasAgg(figure)
    figure.subplots_adjust(left=0.12 / max(1, layers) + 0.05, right=0.98, bottom=0.16, top=0.8, wspace=0.35)
    for i in range(layers):
        figure.add_subplot(1, layers, i + 1)
    return figure


@functools.lru_cache(maxsize=4)
def _kept_canvas(layers: int) -> Figure:
    return _canvas(layers)


def _draw(figure: Figure, trace: pd.DataFrame, title: str, max_filters: int) -> None:
    """Everything a panel shows is set here on every draw, so a kept canvas carries nothing over."""
    panels = layer_panels(trace, max_filters)
    cgn = _epoch_rows(trace)["cgn"].to_numpy(dtype=float)
    positive = cgn[cgn > 0]
    linthresh = float(positive.min()) if len(positive) else None
    figure.suptitle(title, fontsize=9)
    for ax, panel in zip(figure.axes, panels, strict=True):
        _clear(ax)
        ax.plot(panel.epochs, panel.cgn, "-", lw=0.7, alpha=0.6)
        at = np.broadcast_to(panel.epochs[:, None], panel.reset.shape)
        ax.plot(
            at[panel.reset],
            panel.cgn[panel.reset],
            "x",
            color="red",
            ms=5,
            label=f"reset ({panel.total_resets})",
        )
        if linthresh is not None:
            ax.set_yscale("symlog", linthresh=linthresh)
            ax.yaxis.get_major_locator().set_params(numticks=6)  # readable labels over many decades
        else:  # every filter was dead throughout: a linear axis at 0 says so plainly
            ax.set_yscale("linear")
        ax.relim()
        ax.autoscale_view()
        ax.set_title(f"{panel.layer}: {panel.cgn.shape[1]} of {panel.filters} filters", fontsize=7)
        ax.set_xlabel("epoch", fontsize=7)
        ax.set_ylabel("CGN (epoch mean)", fontsize=7)
        ax.tick_params(labelsize=6)
        # One epoch: its own tick, not fractions of an epoch around it.
        locator = FixedLocator(panel.epochs) if len(panel.epochs) == 1 else MaxNLocator(integer=True)
        ax.xaxis.set_major_locator(locator)
        ax.legend(fontsize=6, loc="best")


def _clear(ax: Axes) -> None:
    """The previous trial's lines and legend, without rebuilding the axes (what `ax.clear` costs)."""
    for line in list(ax.lines):
        line.remove()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    ax.set_prop_cycle(None)  # colours start again from the first, as on a new axes
