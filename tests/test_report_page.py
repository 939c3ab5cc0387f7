"""The report page as a researcher reads it, at 800 px in headless Chromium, and its figures as drawn.

The page must not scroll sideways at 800 px, show no test hook, state the study's question, give each
caption once (as page text, none drawn into the images, whose text is never cut off), colour a tau x P
cell only when its interval excludes 0, keep accuracy intervals inside 0-100 %, and list each failed
seed beside the same seed under its paired arms.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from figure_text import clipped_texts, drawn_texts
from sweepfactory import FakeTrial, lottery_trials, write_sweep
from test_report import ARMS, _chromium, _with_unfinished

from dashboards.failed_seeds import failed_seed_rows
from dashboards.figures import accuracy_vs_filters, all_figures, tau_p_heatmap
from dashboards.report import build_report
from orchestrator.aggregate import aggregate, read_aggregate

QUESTION = "Does RandomOut at tau=1e-08 fail on fewer seeds than the baseline at 2-8 filters?"
# Appended to a copy of the page: what the browser laid out, on attributes --dump-dom shows.
PROBE = """<script>window.addEventListener("load", function () {
  var b = document.body;
  b.setAttribute("data-scroll-width", String(document.documentElement.scrollWidth));
  b.setAttribute("data-hook-visible", String(/figures rendered/.test(b.innerText)));
  var caps = Array.prototype.map.call(document.querySelectorAll("figcaption"), function (c) {
    return c.innerText; });
  var once = caps.every(function (c) { return b.innerText.split(c).length === 2; });
  b.setAttribute("data-captions-once", String(once && caps.length > 0));
});</script>"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    trials = _with_unfinished(lottery_trials(ARMS, seeds=range(8), filters=(4, 8)))
    sweep_dir = write_sweep(tmp_path_factory.mktemp("storage"), "page", trials)
    aggregate(sweep_dir)
    return sweep_dir


def _page(sweep_dir: Path, out: Path) -> Path:
    tables = read_aggregate(sweep_dir)
    return build_report(
        tables.trials, tables.epochs, tables.summary, out, name=sweep_dir.name, question=QUESTION
    )


def _probe(page: Path, tmp_path: Path, width: int) -> dict[str, str]:
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium(["--dump-dom", f"--window-size={width},2000"], probe, tmp_path / "profile")
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:2000]
    facts = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body[1]))
    facts["dom"] = dom
    return facts


@pytest.mark.integration  # Chromium
def test_the_page_reads_at_800_px_without_a_hook_and_with_each_caption_once(sweep: Path, tmp_path: Path):
    page = _page(sweep, tmp_path / "report")
    facts = _probe(page, tmp_path, 800)
    assert int(facts["scroll-width"]) <= 800, facts["scroll-width"]  # was 1219 px
    assert facts["hook-visible"] == "false"
    assert facts["captions-once"] == "true"
    dom = facts["dom"]
    status = re.search(r'id="img-status"[^>]*data-loaded="(\d+)" data-total="(\d+)"', dom)
    assert status and status[1] == status[2] == "8"  # the hook is still there for tests, hidden
    assert re.search(r'<div id="img-status" hidden=""', dom)
    question = re.search(r'<p id="question"><b>Question:</b> ([^<]*)</p>', dom)
    assert question and question[1] == QUESTION
    assert dom.index('id="question"') < dom.index('id="summary"')  # stated before any number
    assert '<table id="failed-seeds">' in dom


def test_no_figure_text_is_cut_and_no_caption_is_drawn_into_an_image(sweep: Path) -> None:
    tables = read_aggregate(sweep)
    rendered = [r for r in all_figures(tables.trials, tables.epochs, tables.summary) if r.figure is not None]
    assert len(rendered) == 8  # the failure profile included
    for r in rendered:
        assert not clipped_texts(r.figure), (r.name, clipped_texts(r.figure))
        texts = " ".join(t.text for t in drawn_texts(r.figure))
        assert "Failure rule" not in texts and r.caption[:40] not in texts, r.name


def _gains(tmp_path: Path, cells: dict[tuple[float, float], list[float]]):
    base = [0.60, 0.62, 0.58, 0.64, 0.61, 0.59, 0.63, 0.60]
    trials = [FakeTrial("baseline", s, a) for s, a in enumerate(base)]
    for (tau, p), gains in cells.items():
        hparams = {"tau": tau, "active_fraction": p}
        trials += [
            FakeTrial("randomout", s, a + g, hparams)
            for s, (a, g) in enumerate(zip(base, gains, strict=True))
        ]
    sweep_dir = write_sweep(tmp_path, "grid", trials)
    return aggregate(sweep_dir).trials


def test_a_tau_p_cell_is_coloured_only_when_its_interval_excludes_zero(tmp_path: Path) -> None:
    noisy = [-0.12, 0.06, -0.10, 0.07, -0.09, 0.05, -0.08, 0.06]  # mean about -3 points, CI across 0
    steady = [0.10, 0.11, 0.09, 0.10, 0.12, 0.10, 0.09, 0.11]  # +10 points, CI far from 0
    trials = _gains(
        tmp_path, {(1e-4, 0.5): noisy, (1e-4, 1.0): steady, (1e-8, 0.5): steady, (1e-8, 1.0): steady}
    )
    r = tau_p_heatmap(trials)
    assert r.figure is not None
    cells = r.figure.axes[0].images[0].get_array()
    # rows: tau descending (1e-4 first); columns: P ascending
    assert bool(np.ma.getmaskarray(cells)[0, 0])  # the noisy cell: grey, not a strong red
    assert not np.ma.getmaskarray(cells)[0, 1] and cells[0, 1] == pytest.approx(10.25)
    assert "interval excludes 0" in r.caption
    # one P value: the narrowest map, whose title and caption were cut at the image's edge
    narrow = tau_p_heatmap(_gains(tmp_path / "narrow", {(1e-4, 1.0): noisy, (1e-8, 1.0): steady}))
    assert narrow.figure is not None and not clipped_texts(narrow.figure)


def test_the_width_figures_accuracy_intervals_stay_within_0_and_100(tmp_path: Path) -> None:
    arms = [("baseline", {}), ("randomout", {"tau": 1e-8, "active_fraction": 1.0})]
    trials = lottery_trials(arms, seeds=range(6), filters=(2, 4, 8), fail_rate=0.5)
    tables = aggregate(write_sweep(tmp_path, "w", trials))
    r = accuracy_vs_filters(tables.trials)
    assert r.figure is not None
    top = r.figure.axes[0]
    for container in top.containers:
        for segments in container.lines[2]:
            ys = np.concatenate([seg[:, 1] for seg in segments.get_segments()])
            assert ys.min() >= 0.0 and ys.max() <= 100.0


def test_each_failed_seed_sits_beside_the_same_seed_under_its_paired_arms(tmp_path: Path) -> None:
    trials = [
        FakeTrial("baseline", 0, 0.05),  # failed (chance 0.1 + margin 0.05)
        FakeTrial("baseline", 1, 0.70),
        FakeTrial("randomout", 0, 0.72, {"tau": 1e-8}),
        FakeTrial("randomout", 1, 0.04, {"tau": 1e-8}),  # failed
    ]
    sweep_dir = write_sweep(tmp_path, "f", trials)
    tables = aggregate(sweep_dir)
    rows = failed_seed_rows(tables.trials)
    assert list(rows["seed"]) == [0, 1]
    assert rows.loc[0, "baseline"] == (pytest.approx(0.05), True)
    assert rows.loc[0, "randomout tau=1e-08"] == (pytest.approx(0.72), False)
    assert rows.loc[1, "baseline"] == (pytest.approx(0.70), False)
    text = build_report(tables.trials, tables.epochs, tables.summary, tmp_path / "r", name="f").read_text()
    table = text.split("<table id=failed-seeds>")[1].split("</table>")[0]
    assert re.search(r"<td>0</td><td class=failed>5\.0 failed</td><td>72\.0</td>", table), table
    assert re.search(r"<td>1</td><td>70\.0</td><td class=failed>4\.0 failed</td>", table), table


def test_lottery_report_states_the_specs_description(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from orchestrator import layout
    from orchestrator.cli import app

    monkeypatch.setenv("LOTTERY_HOME", str(tmp_path / "home"))
    trials = [FakeTrial("baseline", s, 0.7) for s in range(3)]
    sweep_dir = write_sweep(tmp_path / "home", "q", trials)
    spec = layout.read_json(layout.spec_file(sweep_dir))
    layout.atomic_write_json(layout.spec_file(sweep_dir), spec | {"description": QUESTION})
    aggregate(sweep_dir)
    result = CliRunner().invoke(app, ["report", "q"])
    assert result.exit_code == 0, result.output
    page = (layout.report_dir(sweep_dir) / "report.html").read_text()
    assert f"<p id=question><b>Question:</b> {QUESTION}</p>" in page
