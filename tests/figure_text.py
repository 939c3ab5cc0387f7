"""What a figure's text looks like once saved: each visible text's size in pixels and whether it is cut.

A figure is read at 100 % in a browser or MLflow's artifact view, so its text must be at least 10 px
there. Sizes are the renderer's: the font size in points at the figure's dpi (what `savefig` writes
without a `dpi`), measured on the drawn figure, so a text the layout shrank or hid is measured as drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

from matplotlib.figure import Figure
from matplotlib.text import Text


@dataclass(frozen=True)
class DrawnText:
    text: str
    px: float  # font size in pixels at the saved dpi
    left: float  # its extent in pixels, figure origin bottom left
    bottom: float
    right: float
    top: float


def _shown(artist: Text) -> bool:
    if not artist.get_visible() or not artist.get_text().strip():
        return False
    axes = artist.axes
    return axes is None or axes.get_visible()


def _undrawn_tick_labels(fig: Figure) -> set[int]:
    """Tick labels an axis holds but does not draw (ticks outside its view limits)."""
    held, drawn = set(), set()
    for ax in fig.get_axes():
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                held |= {id(tick.label1), id(tick.label2)}
            for tick in axis._update_ticks():  # what Axis.draw draws
                drawn |= {id(tick.label1), id(tick.label2)}
    return held - drawn


def drawn_texts(fig: Figure) -> list[DrawnText]:
    """Every text a saved copy of `fig` shows (titles, labels, ticks, legends, annotations)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    undrawn = _undrawn_tick_labels(fig)
    found = []
    for artist in fig.findobj(Text):
        if not isinstance(artist, Text) or not _shown(artist) or id(artist) in undrawn:
            continue
        box = artist.get_window_extent(renderer)
        px = renderer.points_to_pixels(artist.get_fontsize())
        found.append(DrawnText(artist.get_text(), float(px), box.x0, box.y0, box.x1, box.y1))
    return found


def text_px_range(fig: Figure) -> tuple[float, float]:
    sizes = [t.px for t in drawn_texts(fig)]
    return min(sizes), max(sizes)


def clipped_texts(fig: Figure, slack: float = 1.0) -> list[DrawnText]:
    """The texts that reach past the figure's edge (cut off in the saved image)."""
    width, height = fig.bbox.width, fig.bbox.height
    return [
        t
        for t in drawn_texts(fig)
        if t.left < -slack or t.bottom < -slack or t.right > width + slack or t.top > height + slack
    ]
