"""The per-run CGN figure (dashboards/cgn_figure.py) and the per-layer CGN curves logged beside it.

The figure is read at 100 % on the MLflow run page: its text must be at least 10 px, a few filters
are named in a legend, many are a heat map, the scheme's tau and the resets are marked and the axis
says what CGN is.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from figure_text import clipped_texts, text_px_range
from matplotlib.collections import QuadMesh
from PIL import Image

from dashboards.cgn_figure import PNG_COMPRESSION, cgn_figure_png, filter_cgn_figure


def _trace(epochs: int, filters: int, cgn, layers: tuple[str, ...] = ("conv1", "conv2")) -> pd.DataFrame:
    rows = [
        {
            "epoch": e,
            "step": -1,
            "layer": layer,
            "filter": f,
            "cgn": cgn(e, f),
            "reset": int(e == 1 and f == 0),
        }
        for e in range(epochs)
        for layer in layers
        for f in range(filters)
    ]
    return pd.DataFrame(rows)


SPREAD = _trace(30, 6, lambda e, f: 10.0 ** -(f * 2) if f < 5 else 0.0)
WIDE = _trace(3, 80, lambda e, f: 1.0 + f)


def _png_size(fig) -> tuple[int, int]:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Image.open(io.BytesIO(buffer.getvalue())).size


@pytest.mark.parametrize("trace", [SPREAD, WIDE, _trace(4, 3, lambda e, f: 0.5, layers=("conv1",))])
def test_the_figure_reads_at_100_percent(trace: pd.DataFrame) -> None:
    """Every text at least 10 px in the saved image (was 6.7 px), none cut off, ~540 x 440 px a layer."""
    fig = filter_cgn_figure(trace, "randomout seed=3 4f tau=1e-08", tau=1e-8)
    low, high = text_px_range(fig)
    assert low >= 10.0 and high <= 16.0, (low, high)
    assert not clipped_texts(fig)
    layers = trace["layer"].nunique()
    width, height = _png_size(fig)
    assert (width // layers, height) == (540, 440)


def test_a_few_filters_are_named_in_a_legend_with_resets_tau_and_the_unit() -> None:
    fig = filter_cgn_figure(SPREAD, "t", tau=1e-8)
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"filter {f}" for f in range(6)] + ["reset (1)", "tau = 1e-08"]
    tau = [line for line in ax.get_lines() if line.get_label() == "tau = 1e-08"]
    assert len(tau) == 1 and list(tau[0].get_ydata()) == [1e-8, 1e-8]
    resets = [line for line in ax.get_lines() if line.get_label() == "reset (1)"]
    assert resets[0].get_color() == "red" and resets[0].get_marker() == "x"
    assert list(resets[0].get_xdata()) == [1]
    assert "Σ|∂L/∂w|" in ax.get_ylabel() and "loss summed over the minibatch" in ax.get_ylabel()
    no_tau = filter_cgn_figure(SPREAD, "t")  # a scheme without tau: no line, no legend entry
    assert "tau" not in " ".join(t.get_text() for t in no_tau.axes[0].get_legend().get_texts())


def test_many_filters_are_a_heat_map_with_resets_and_tau_on_its_scale() -> None:
    fig = filter_cgn_figure(WIDE, "t", max_filters=64, tau=0.5)
    panels, bars = fig.axes[:2], fig.axes[2:]
    assert [ax.get_title() for ax in panels] == ["conv1: 64 of 80 filters", "conv2: 64 of 80 filters"]
    mesh = [c for c in panels[0].collections if isinstance(c, QuadMesh)]
    assert len(mesh) == 1 and mesh[0].get_array().shape == (64, 3)  # filters x epochs
    assert panels[0].get_legend() is None and len(panels[0].get_lines()) == 1  # only the reset marks
    assert "reset" in panels[0].get_xlabel()
    assert all(bar.get_visible() for bar in bars)
    assert "Σ|∂L/∂w|" in bars[0].get_ylabel() and "tau 0.5" in bars[0].get_ylabel()
    assert [list(line.get_ydata()) for line in bars[0].get_lines()] == [[0.5, 0.5]]


def test_a_runs_cgn_figure_keeps_its_axes_readable() -> None:
    """Few y labels over many decades, whole epochs, a dead net drawn flat at 0."""
    for ax in filter_cgn_figure(SPREAD, "t").axes[:2]:
        assert ax.get_yscale() == "symlog" and len(ax.yaxis.get_majorticklocs()) <= 7  # 1 .. 1e-8 and 0
        assert all(float(x).is_integer() for x in ax.get_xticks())
    dead = filter_cgn_figure(_trace(1, 1, lambda e, f: 0.0), "t")
    for ax in dead.axes[:2]:
        assert ax.get_yscale() == "linear" and list(ax.get_xticks()) == [0]


@pytest.mark.slow
def test_a_kept_canvas_draws_exactly_what_a_new_figure_draws() -> None:
    """Trial workers draw every run's figure on one canvas per process; nothing of one trial's drawing
    (lines, heat map, colour bar, scale, ticks, legend, colours) may reach the next."""
    traces = [
        (SPREAD, 1e-8),
        (_trace(1, 1, lambda e, f: 0.0), None),  # dead: linear axis, one fixed tick
        (WIDE, 2.0),  # wide: a heat map of 64 of 80
        (_trace(5, 3, lambda e, f: 1.0 + e * f), None),
    ]
    for i, (trace, tau) in enumerate(traces + traces[:1]):
        fresh = io.BytesIO()
        filter_cgn_figure(trace, f"trial {i}", tau=tau).savefig(
            fresh, format="png", pil_kwargs={"compress_level": PNG_COMPRESSION}
        )
        assert cgn_figure_png(trace, f"trial {i}", tau=tau) == fresh.getvalue(), i


def test_a_randomout_trials_own_figure_draws_its_tau_and_its_run_gets_cgn_curves(tmp_path: Path) -> None:
    """A real trial: the worker's figure is the drawing with the scheme's tau, and the run carries
    cgn/<layer>/median and cgn/<layer>/min per epoch, which MLflow's charts compare across runs."""
    import torch
    from mlflow.tracking import MlflowClient
    from trialfactory import config

    from orchestrator import layout
    from orchestrator.run.trial import run_trial, trial_meta
    from orchestrator.tracking.names import run_name
    from orchestrator.tracking.runs import ensure_experiment, log_trial
    from orchestrator.tracking.store import prepare_store

    torch.set_num_threads(1)
    trial_dir = tmp_path / "trials" / "t"
    trial = config(epochs=2, scheme__name="randomout", scheme__tau=1e-3)
    result = run_trial(trial, trial_dir, sweep="s")
    trace = pd.read_parquet(trial_dir / layout.TRACE)
    title = run_name(trial_meta(trial, ""), result)
    own = (trial_dir / layout.CGN_FIGURE).read_bytes()
    assert own == cgn_figure_png(trace, title, tau=1e-3) != cgn_figure_png(trace, title)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepare_store(uri)
    client = MlflowClient(tracking_uri=uri)
    run_id = log_trial(client, ensure_experiment(client, "s", tmp_path / "artifacts"), trial_dir)
    epoch_rows = trace[trace["step"] == -1]
    for layer, rows in epoch_rows.groupby("layer"):
        for statistic, reduce in (("median", np.median), ("min", np.min)):
            history = client.get_metric_history(run_id, f"cgn/{layer}/{statistic}")
            expected = [float(reduce(g["cgn"])) for _, g in rows.groupby("epoch")]
            assert [m.step for m in history] == [0, 1]
            assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(expected)
