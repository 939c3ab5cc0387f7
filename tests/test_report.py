"""A fake sweep on disk -> aggregate -> report.html, opened in a real headless Chromium."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from browser import HEADLESS_FLAGS
from sweepfactory import FakeTrial, lottery_trials, write_sweep

from dashboards.report import build_report
from dashboards.stats import SUMMARY_COLUMNS, TRIAL_COLUMNS
from orchestrator.aggregate import AggregateResult, aggregate, read_aggregate

CHROMIUM = Path("/usr/bin/chromium")
ARMS = [("baseline", {}), ("batchnorm", {}), ("repr", {})] + [
    ("randomout", {"tau": tau, "active_fraction": p}) for tau in (1e-4, 1e-8) for p in (0.5, 1.0)
]
FIGURES = [
    "fig4_seed_scatter",
    "failure_profile",
    "fig5_tau_p_heatmap",
    "fig6_accuracy_vs_filters",
    "accuracy_epochs",
    "fig7_cgn",
    "fig8_below_tau",
    "repr_ortho",
]


def _with_unfinished(trials: list[FakeTrial]) -> list[FakeTrial]:
    """Turn four baseline trials of width 4 into errored / incomplete / pending / diverged ones."""
    out, statuses = [], iter(["errored", "incomplete", "pending", "diverged"])
    for t in trials:
        if t.scheme == "baseline" and t.filters == 4 and t.seed < 4:
            status = next(statuses)
            t = FakeTrial(
                t.scheme,
                t.seed,
                t.final_test_acc,
                filters=t.filters,
                status="finished" if status == "diverged" else status,
                diverged=status == "diverged",
            )
        out.append(t)
    return out


def report_of(sweep_dir: Path, out_dir: Path) -> Path:
    """As `lottery report` builds it: from the aggregated tables read back from disk."""
    tables = read_aggregate(sweep_dir)
    return build_report(
        tables.trials, tables.epochs, tables.summary, out_dir, name=sweep_dir.name, decision=tables.decision
    )


@pytest.fixture(scope="module")
def full_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AggregateResult]:
    trials = _with_unfinished(lottery_trials(ARMS, seeds=range(8), filters=(4, 8)))
    sweep_dir = write_sweep(tmp_path_factory.mktemp("storage"), "full", trials)
    return sweep_dir, aggregate(sweep_dir)


def test_aggregate_counts_every_planned_trial(full_sweep: tuple[Path, AggregateResult]) -> None:
    sweep_dir, result = full_sweep
    trials = result.trials
    assert len(trials) == len(ARMS) * 8 * 2
    assert {c: str(t) for c, t in trials.dtypes.items()} == TRIAL_COLUMNS
    assert trials["status"].value_counts().to_dict() == {
        "finished": len(trials) - 3,
        "errored": 1,
        "incomplete": 1,
        "pending": 1,
    }
    incomplete = trials[trials["status"] == "incomplete"].iloc[0]
    assert incomplete["epochs_done"] == 2 and not incomplete["failed"]  # half of 4 epochs written
    diverged = trials[trials["diverged"]]
    assert len(diverged) == 1 and diverged["failed"].all() and diverged["final_test_acc"].isna().all()
    # every trial with a metrics file contributes all its epochs: finished 4, errored/incomplete 2
    assert len(result.epochs) == 4 * (len(trials) - 3) + 2 * 2
    base4 = result.summary.query("scheme == 'baseline' and filters == 4").iloc[0]
    assert (base4.n_planned, base4.n, base4.n_errored, base4.n_incomplete, base4.n_pending) == (8, 5, 1, 1, 1)
    assert base4.n_acc == 4  # the diverged trial is finished but has no accuracy
    for name, frame in (("trials", trials), ("epochs", result.epochs), ("summary", result.summary)):
        pd.testing.assert_frame_equal(pd.read_parquet(sweep_dir / "aggregate" / f"{name}.parquet"), frame)
    assert list(result.summary.columns) == list(SUMMARY_COLUMNS)


def _chromium(args: list[str], page: Path, profile: Path) -> str:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `apt-get install -y chromium` (the Makefile does)")
    cmd = [
        str(CHROMIUM),
        *HEADLESS_FLAGS,
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *args,
        page.resolve().as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.integration  # Chromium
def test_report_renders_every_figure(full_sweep: tuple[Path, AggregateResult], tmp_path: Path) -> None:
    sweep_dir, _ = full_sweep
    page = report_of(sweep_dir, tmp_path / "report")
    assert page == tmp_path / "report" / "report.html"
    assert sorted(p.stem for p in page.parent.glob("*.png")) == sorted(FIGURES)
    text = page.read_text()
    assert "src='data:image/png;base64," in text and "<link" not in text  # self-contained
    assert re.search(
        r"Failure rule:</b> failed if final test accuracy &lt;= majority-class accuracy 0\.\d{3} \+ 0\.05",
        text,
    )

    dom = _chromium(["--dump-dom"], page, tmp_path / "profile")
    status = re.search(r'id="img-status"[^>]*data-loaded="(\d+)" data-total="(\d+)"', dom)
    assert status, dom[-2000:]
    assert (int(status[1]), int(status[2])) == (len(FIGURES), len(FIGURES))
    assert len(re.findall(r"<img ", dom)) == len(FIGURES)
    for name in FIGURES:
        assert f'<figure id="{name}">' in dom

    shot = tmp_path / "report.png"
    _chromium([f"--screenshot={shot}", "--window-size=1280,2400"], page, tmp_path / "profile")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_report_names_skipped_figures_and_null_results(tmp_path: Path) -> None:
    # BatchNorm moves each seed by +-1 point around the baseline: no effect to find.
    base = [0.70, 0.72, 0.68, 0.74, 0.71, 0.69, 0.73, 0.70]
    trials = [FakeTrial("baseline", s, a) for s, a in enumerate(base)]
    trials += [FakeTrial("batchnorm", s, a + (0.01 if s % 2 else -0.01)) for s, a in enumerate(base)]
    sweep_dir = write_sweep(tmp_path, "null", trials)
    result = aggregate(sweep_dir)
    p = result.summary.set_index("scheme").loc["batchnorm", "wilcoxon_p"]
    assert p >= 0.05

    text = report_of(sweep_dir, sweep_dir / "report").read_text()
    gain = "median gain +0.00 pts over 8 paired seeds, test on 8 non-tied, exact"
    verdict = f"no significant effect (p={p:.2g}; {gain})"
    assert verdict in text
    skipped = text.split("<ul id=skipped>")[1].split("</ul>")[0]
    assert "the number of filters does not vary in this sweep" in skipped
    # no RandomOut and no RePr trial: their figures are left out, not listed as skipped
    assert "fig5_tau_p_heatmap" not in text and "repr_ortho" not in text and "Ortho" not in skipped
    assert text.count("<figure ") == 5 and "data-total=5" in text  # and the failure profile
    assert "better / tied / worse" in text and "(n=8, exact)" in text


def _figure_alt(dom: str, name: str) -> str:
    found = re.search(rf'<figure id="{name}"><img alt="([^"]*)"', dom)
    assert found, f"figure {name} not rendered"
    return found[1].replace("&amp;", "&")


@pytest.mark.integration  # Chromium
def test_width_sweep_report_shows_both_schemes_with_intervals_and_failure_rates(tmp_path: Path) -> None:
    """A baseline vs RandomOut sweep over three widths, read as a researcher reads it: in a browser."""
    arms = [("baseline", {}), ("randomout", {"tau": 1e-8, "active_fraction": 1.0})]
    trials = lottery_trials(arms, seeds=range(10), filters=(2, 4, 8), fail_rate=0.4)
    sweep_dir = write_sweep(tmp_path, "width", trials)
    aggregate(sweep_dir)
    provenance = {"git revision": "0123abc", "seeds": "[0, 1]", "MLflow parent run": "run-42"}
    tables = read_aggregate(sweep_dir)
    page = build_report(
        tables.trials, tables.epochs, tables.summary, tmp_path / "r", name="w", provenance=provenance
    )
    dom = _chromium(["--dump-dom"], page, tmp_path / "profile")

    status = re.search(r'id="img-status"[^>]*data-loaded="(\d+)" data-total="(\d+)"', dom)
    assert status and status[1] == status[2] == "6", dom[-1500:]
    # figures of schemes this sweep lacks are absent, not drawn empty and not listed as skipped
    assert 'id="repr_ortho"' not in dom and "RePr" not in dom
    width = _figure_alt(dom, "fig6_accuracy_vs_filters")
    for scheme in ("baseline", "randomout tau=1e-08 P=1"):
        assert re.search(
            rf"panel final test accuracy \(%\):[^|]*{re.escape(scheme)} \(n=10\): 3 points with interval "
            "bars",
            width,
        ), width
        assert re.search(
            rf"panel failed \(%\):[^|]*{re.escape(scheme)} failure rate: 3 points with interval bars", width
        ), width
    assert "95% t-interval" in dom and "Wilson 95% interval" in dom
    # per-seed, CGN and below-tau figures: one panel per width
    for name in ("fig4_seed_scatter", "failure_profile", "fig7_cgn", "fig8_below_tau", "accuracy_epochs"):
        alt = _figure_alt(dom, name)
        assert all(f"{w} filters]" in alt for w in (2, 4, 8)), (name, alt)
    below = _figure_alt(dom, "fig8_below_tau")
    assert "panel seeds below tau (%)" in below and "panel mean checks with CGN &lt; tau" in dom
    assert "0 of 60 seeds reach a mean CGN of 0 (dead)" in dom  # stated even when none does
    accuracy = _figure_alt(dom, "accuracy_epochs")
    assert "baseline non-failed" in accuracy and "baseline failed (" in accuracy
    # the setting, every hyperparameter, better/tied/worse with the test's n and method, provenance
    assert "lr=0.01 optimizer=sgd momentum=0 weight_decay=0 epochs=4 batch=64 init=uniform0.01" in dom
    assert "P=1 reset" not in dom and '<td class="l">P=1 tau=1e-08</td>' in dom
    assert '<td class="l">none</td>' in dom  # the baseline has no hyperparameter, and says so
    assert re.search(r"<td>10 / 0 / 0</td>", dom) and re.search(r"\(n=10, exact\)", dom)
    assert "zero method 'wilcox'" in dom
    assert re.search(r'<table id="provenance">.*0123abc.*run-42', dom)

    shot = tmp_path / "width.png"
    _chromium([f"--screenshot={shot}", "--window-size=1280,3000"], page, tmp_path / "profile")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = os.environ.get("LOTTERY_SHOTS")
    if out:  # keep the rendered page for a reader (not a test outcome)
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "report_width.png").write_bytes(shot.read_bytes())
