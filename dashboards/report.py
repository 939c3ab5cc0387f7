"""One self-contained HTML report of a sweep, built from its aggregated tables (trials, epochs, summary).

Self-contained means one file to mail or archive: figures are embedded as base64 PNG data
URIs, there is no external CSS or script. The page opens with the study's question (the spec's
description), states n, the failure rule and every interval next to the numbers, says in words
what the seeds support, including "no significant effect", and lists each failed seed beside the
same seed under its paired arms. It reads at any width down to 800 px without scrolling sideways:
images scale down, wide tables scroll inside their own box. Each caption is page text, once (not
drawn into the image too). A small inline script records how many images decoded on a hidden
element's data attributes, so a headless browser test can check the page really renders.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from dashboards.decision import BEST_OF
from dashboards.failed_seeds import failed_seeds_html
from dashboards.figures import Rendered, all_figures, alt_text, arm_label, failure_rule
from dashboards.sequential import interval_statement, look_cells
from dashboards.setting import hparams_text, row_labels, row_setting_text, setting_line, split_setting
from dashboards.signed_rank import EXACT_MAX_N, ZERO_METHOD
from dashboards.stats import BASELINE, NOT_FINISHED, STATUSES, never_acted

ALPHA = 0.05

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1200px; color: #222; }
p, figcaption, li { overflow-wrap: anywhere; }
.scroll { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.8em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; } td.failed { background: #fde0dc; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #444; } .note { font-size: 0.85em; color: #555; }
#question { font-size: 1.1em; } #summary td.l:last-child { min-width: 24em; }
"""

_IMG_STATUS_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var el = document.getElementById("img-status");
  el.setAttribute("data-loaded", String(ok));
  el.setAttribute("data-total", String(imgs.length));
});
"""


def _pct(x: float, digits: int = 1) -> str:
    return "–" if pd.isna(x) else f"{100 * x:.{digits}f}"


def _pts(x: float) -> str:
    return "–" if pd.isna(x) else f"{100 * x:+.2f}"


def verdict(row: pd.Series) -> str:
    """What the paired seeds say about one arm against its reference (the baseline unless named), in words."""
    against = row.get("reference")
    against = BASELINE if pd.isna(against) or not against else str(against)
    if row["scheme"] == BASELINE:
        return "reference arm"
    if row["n_pairs"] == 0:
        return f"not compared: no finished same-seed {against} trials"
    p, n_pairs = row["wilcoxon_p"], row["n_pairs"]
    gain = f"median gain {_pts(row['gain_median'])} pts over {n_pairs} paired seeds"
    if not math.isnan(p):
        gain += f", test on {row['wilcoxon_n']} non-tied, {row['wilcoxon_method']}"
    if math.isnan(p):
        return f"not tested: fewer than 2 seeds with a non-zero gain ({gain})"
    if p >= ALPHA:
        return f"no significant effect (p={p:.2g}; {gain})"
    median = row["gain_median"]
    direction = "better than" if median > 0 else "worse than" if median < 0 else "differs from"
    improved = f"{_pct(row['share_improved'], 0)}% of seeds improved"
    return f"{direction} {against} (p={p:.2g}; {gain}; {improved})"


def _summary_html(summary: pd.DataFrame) -> str:
    _, varying = split_setting(summary["setting"])
    head = (
        "<tr><th class=l>scheme</th><th class=l>hyperparameters (all)</th>"
        + ("<th class=l>setting</th>" if varying else "")
        + f"<th>filters</th><th>n finished / planned</th><th>{' / '.join(NOT_FINISHED)}</th>"
        "<th>failed</th><th>diverged / collapsed / low</th><th>failure rate % [Wilson 95% CI]</th>"
        "<th>median acc % (IQR width)</th>"
        "<th>mean acc %</th><th>min acc %</th><th>std % [bootstrap 95% CI]</th><th>paired seeds</th>"
        "<th>better / tied / worse</th><th>rescued / harmed</th><th>median gain pts</th>"
        "<th>Wilcoxon p (n used, method)</th>"
        "<th class=l>what the seeds say</th></tr>"
    )
    body = []
    for _, r in summary.iterrows():
        is_base = r["scheme"] == BASELINE
        tested = not pd.isna(r["wilcoxon_p"])
        cells = [
            str(r["scheme"]),
            hparams_text(r["hparams"]),
            *([row_setting_text(r["setting"], varying)] if varying else []),
            "–" if pd.isna(r["filters"]) else str(r["filters"]),
            f"{r['n']} / {r['n_planned']}",
            " / ".join(str(r.get(f"n_{s}", 0)) for s in NOT_FINISHED),
            f"{r['n_failed']} / {r['n']}",
            f"{r['n_diverged']} / {r['n_collapsed']} / {r['n_low']}",
            f"{_pct(r['failure_rate'])} [{_pct(r['failure_ci_low'])}, {_pct(r['failure_ci_high'])}]",
            f"{_pct(r['acc_median'], 2)} ({_pct(r['acc_iqr'], 2)})",
            _pct(r["acc_mean"], 2),
            _pct(r["acc_min"], 2),
            f"{_pct(r['acc_std'], 2)} [{_pct(r['std_ci_low'], 2)}, {_pct(r['std_ci_high'], 2)}]",
            str(r["n_pairs"]),
            "–" if is_base or not r["n_pairs"] else f"{r['n_better']} / {r['n_tied']} / {r['n_worse']}",
            "–"
            if is_base
            else f"{r['n_rescued']} / {r['n_harmed']}"
            + ("" if pd.isna(r["rescue_harm_p"]) else f" (p = {r['rescue_harm_p']:.2g})"),
            _pts(r["gain_median"]),
            f"{r['wilcoxon_p']:.3g} (n={r['wilcoxon_n']}, {r['wilcoxon_method']})" if tested else "–",
            verdict(r),
        ]
        left = {0, 1, len(cells) - 1} | ({2} if varying else set())
        tds = "".join(
            f"<td{' class=l' if i in left else ''}>{html.escape(c)}</td>" for i, c in enumerate(cells)
        )
        body.append(f"<tr>{tds}</tr>")
    return f"<div class=scroll><table id=summary>{head}{''.join(body)}</table></div>"


def _provenance_html(provenance: dict[str, str] | None) -> str:
    """Where the numbers come from: date, code revision, library versions, seeds, the MLflow run."""
    if not provenance:
        return "<p id=provenance class=note>Provenance: not recorded for this report.</p>"
    items = "".join(
        f"<tr><th class=l>{html.escape(k)}</th><td class=l>{html.escape(str(v))}</td></tr>"
        for k, v in provenance.items()
    )
    return f"<h2>Provenance</h2><div class=scroll><table id=provenance>{items}</table></div>"


def _question_html(question: str) -> str:
    """The study's question, as the spec's `description` states it, first on the page."""
    if not question.strip():
        return "<p id=question class=note>The spec states no description (the study's question).</p>"
    return f"<p id=question><b>Question:</b> {html.escape(question.strip())}</p>"


def _header_html(trials: pd.DataFrame, summary: pd.DataFrame, sweep: str, question: str = "") -> str:
    counts = trials["status"].value_counts()
    n_tests = int(summary["wilcoxon_p"].notna().sum())
    status = ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
    return (
        f"<h1>Filter lottery: {html.escape(sweep)}</h1>{_question_html(question)}"
        f"<p><b>Trials:</b> {len(trials)} planned: {status}. Only finished trials enter n, failure rates "
        "and accuracy statistics; a diverged trial is finished and failed.</p>"
        f"<p><b>Failure rule:</b> {html.escape(failure_rule(trials))}.</p>"
        f"<p id=setting><b>Setting:</b> {html.escape(setting_line(summary))}. Every hyperparameter of a "
        "scheme is listed per row, defaults included.</p>"
        "<p class=note>Intervals: failure rates with the Wilson 95% score interval; the std of final "
        "accuracy with a BCa bootstrap 95% interval (2000 resamples); gains are paired by seed against the "
        "baseline of the same context and tested with the two-sided Wilcoxon signed-rank test "
        f"(zero method '{ZERO_METHOD}': tied pairs are dropped, so the test's n is the better + worse "
        f"pairs, stated per row; exact distribution of the signed-rank sum up to {EXACT_MAX_N} pairs, normal "
        f"approximation above), not adjusted for the {n_tests} comparisons in this table.</p>"
    )


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _figure_html(r: Rendered, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    alt = html.escape(f"{r.title}. {alt_text(r.figure)}" if r.figure is not None else r.title, quote=True)
    return (
        f"<figure id={r.name}><img alt='{alt}' src='data:image/png;base64,{data}'>"
        f"<figcaption><b>{html.escape(r.title)}.</b> {html.escape(r.caption)}</figcaption></figure>"
    )


def _skipped_html(skipped: list[Rendered]) -> str:
    if not skipped:
        return "<p>No figure was skipped.</p>"
    items = "".join(f"<li><b>{html.escape(r.title)}</b>: {html.escape(r.skipped)}</li>" for r in skipped)
    return f"<ul id=skipped>{items}</ul>"


def _sequential_html(looks: pd.DataFrame | None) -> str:
    """A sequential study's design, where it stopped and why, and its anytime-valid intervals."""
    if looks is None or looks.empty:
        return ""
    last_look = int(looks["look"].max())
    last = looks[looks["look"] == last_look]
    seeds = int(last["seeds"].iloc[0])
    held = bool(last["met"].all())
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=l' if i in (1, 7) else ''}>{html.escape(c)}</td>"
            for i, c in enumerate(
                [
                    str(r.look),
                    arm_label(r.scheme, r.hparam_label),
                    str(r.seeds),
                    *look_cells(r, _pct),
                ]
            )
        )
        + "</tr>"
        for r in looks.itertuples(index=False)
    )
    head = (
        "<tr><th>look</th><th class=l>arm</th><th>seeds opened</th><th>n</th><th>estimate %</th>"
        "<th>95% interval %</th><th>meets rule</th><th class=l>verdict</th></tr>"
    )
    return (
        "<h2>Sequential design</h2>"
        f"<p id=sequential><b>Sequential study:</b> seeds were added in batches and the stopping rule "
        f"was checked after each. Rule: {html.escape(str(last['rule'].iloc[0]))}. It "
        f"{'held' if held else 'did not hold'} at look {last_look}, after {seeds} seeds per configuration. "
        f"{html.escape(interval_statement(last['statistic']))}; the Wilson intervals and Wilcoxon p above "
        "assume n was fixed in advance and do not account for the optional stopping.</p>"
        f"<div class=scroll><table id=looks>{head}{rows}</table></div>"
    )


def _decision_html(decision: pd.DataFrame | None, summary: pd.DataFrame) -> str:
    """The decision-grade table (dashboards/decision.py), as `lottery aggregate` prints it."""
    if decision is None or decision.empty:
        return ""
    labels = row_labels(summary)
    labelled = any(labels.values())
    best = "".join(f"<th>best of {n} +pts</th>" for n in BEST_OF)
    head = (
        "<tr><th class=l>scheme</th><th class=l>hyperparameters</th>"
        + ("<th class=l>setting</th>" if labelled else "")
        + "<th>n</th><th>IQM % [95% CI]</th>"
        f"<th class=l>vs</th><th>P(improvement) [95% CI]</th><th>pairs</th>{best}"
        "<th>SD % (test-set floor %)</th></tr>"
    )
    body = []
    for r in decision.itertuples(index=False):
        iqm = f"{_pct(r.iqm)} [{_pct(r.iqm_ci_low)}, {_pct(r.iqm_ci_high)}]" if not pd.isna(r.iqm) else "–"
        improve = (
            f"{r.p_improve:.2f} [{r.p_improve_ci_low:.2f}, {r.p_improve_ci_high:.2f}]"
            if not pd.isna(r.p_improve_ci_low)
            else ("–" if pd.isna(r.p_improve) else f"{r.p_improve:.2f}")
        )
        pairs = f"{r.improve_n} {'paired' if r.improve_paired else 'unpaired'}" if r.improve_n else "–"
        cells = [
            str(r.scheme),
            "" if pd.isna(r.hparam_label) else str(r.hparam_label),
            *([labels.get(str(r.config_hash), "")] if labelled else []),
            str(r.n),
            iqm,
            r.reference or "–",
            improve,
            pairs,
            *(_pts(getattr(r, f"best_of_{n}")) for n in BEST_OF),
            f"{_pct(r.acc_sd, 2)} ({_pct(r.test_floor_sd, 2)})",
        ]
        left = {0, 1, 2, 5} if labelled else {0, 1, 4}
        body.append(
            "<tr>"
            + "".join(
                f"<td{' class=l' if i in left else ''}>{html.escape(c)}</td>" for i, c in enumerate(cells)
            )
            + "</tr>"
        )
    return (
        "<h2>Decision-grade comparisons</h2><p>Interquartile mean of final test accuracy with a stratified "
        "bootstrap 95% CI; P(improvement): the share of seed pairs the arm wins against its reference (a "
        "tie counts 1/2; P(X &gt; Y) over all couples where seeds do not pair), bootstrap 95% CI; best of "
        "N: the expected best of N seeds minus the median, what reporting the best seed adds; the test-set "
        "floor: the accuracy SD the finite test set alone would give (sqrt(sum p_i(1-p_i)) / n over the "
        "seeds' per-example correctness).</p>"
        f"<div class=scroll><table id=decision>{head}{''.join(body)}</table></div>"
    )


def _never_acted_html(summary: pd.DataFrame) -> str:
    return "".join(f"<p class=note>{html.escape(line)}</p>" for line in never_acted(summary))


def build_report(
    trials: pd.DataFrame,
    epochs: pd.DataFrame,
    summary: pd.DataFrame,
    out_dir: Path,
    *,
    name: str,
    provenance: dict[str, str] | None = None,
    looks: pd.DataFrame | None = None,
    question: str = "",
    decision: pd.DataFrame | None = None,
) -> Path:
    """Write the figures as PNGs and one self-contained `report.html` into out_dir; return its path.

    The tables are the aggregated ones (dashboards.stats: TRIAL_COLUMNS, SUMMARY_COLUMNS; the
    epochs table of orchestrator.aggregate). The page is titled by the trials' sweep, else `name`.
    `provenance` (label -> value: date, git revision, versions, seeds, run id) is shown as given;
    `question`, the spec's description, opens the page.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep = str(trials["sweep"].dropna().iloc[0]) if trials["sweep"].notna().any() else name
    rendered = all_figures(trials, epochs, summary)
    figures = []
    for r in rendered:
        if r.figure is not None:
            png = _png(r.figure)
            (out_dir / f"{r.name}.png").write_bytes(png)
            figures.append(_figure_html(r, png))
    page = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>Filter lottery report: {html.escape(sweep)}</title><style>{_STYLE}</style></head><body>"
        f"{_header_html(trials, summary, sweep, question)}"
        f"{_provenance_html(provenance)}"
        f"<h2>Summary per configuration</h2>{_summary_html(summary)}{_never_acted_html(summary)}"
        f"{_decision_html(decision, summary)}"
        f"{_sequential_html(looks)}"
        f"<h2>Failed seeds beside their pairs</h2>{failed_seeds_html(trials)}"
        f"<h2>Figures ({len(figures)} of {len(rendered)})</h2>{''.join(figures)}"
        f"<h2>Skipped figures</h2>{_skipped_html([r for r in rendered if r.figure is None])}"
        f"<div id=img-status hidden data-loaded=0 data-total={len(figures)}></div>"
        f"<script>{_IMG_STATUS_SCRIPT}</script></body></html>"
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
