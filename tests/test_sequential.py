"""Sequential seed studies and `lottery plan`, as pure logic: no Ray, no MLflow.

The stopping rule is checked on synthetic trial tables against stopping points worked out by hand
from closed forms; the confidence sequences against Ville's guarantee by simulation (and against a
naive Wilson interval looked at after every seed, which misses far more often); the sample sizes
against textbook values.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
import yaml
from specfactory import PLANNED_BASE
from sweepfactory import lottery_trials, write_sweep
from typer.testing import CliRunner

from dashboards.planning import (
    SEQUENTIAL_PAIRED_MAX,
    paired_sample_size,
    rate_sample_size,
    rate_sample_size_anytime,
    sequential_paired_power,
    sequential_paired_sample_size,
)
from dashboards.sequential import median_cs, rate_cs, sign_critical_count, sign_critical_counts
from dashboards.stats import TRIAL_COLUMNS
from orchestrator.cli import _plan_cell, app
from orchestrator.errors import UserError
from orchestrator.run.sweep import record_plan
from orchestrator.sequential import StudyState, replay
from orchestrator.spec import Sequential, SweepSpec, expand

ALPHA = 0.05


def table(rows: list[dict]) -> pd.DataFrame:
    """A per-trial table (TRIAL_COLUMNS) from a few fields per row; the rest as for a finished trial."""
    full = []
    for r in rows:
        scheme = r["scheme"]
        full.append(
            {
                "trial_key": f"{scheme}-{r['seed']}",
                "config_hash": r.get("config_hash", scheme),
                "pair_key": "p",
                "scheme": scheme,
                "hparam_label": "",
                "seed": r["seed"],
                "status": r.get("status", "finished"),
                "final_test_acc": r.get("acc", 0.9),
                "failed": r.get("failed", False),
                "diverged": False,
            }
        )
    return (
        pd.DataFrame(full)
        .reindex(columns=list(TRIAL_COLUMNS))
        .astype({k: v for k, v in TRIAL_COLUMNS.items() if k not in ("failed", "diverged")})
    )


def width_rule(width: float, batch: int) -> Sequential:
    return Sequential.model_validate({"batch": batch, "until": f"failure_rate_ci_width <= {width}"})


def zero_failure_upper(n: int) -> float:
    """Upper end of the rate sequence after 0 failures in n, in closed form: with k = 0 the mixture is
    B(1/2, n + 1/2) / B(1/2, 1/2) / (1 - p)^n, and B(1/2, 1/2) = pi."""
    log_mixture = scipy.special.betaln(0.5, n + 0.5) - math.log(math.pi)
    return 1 - math.exp((log_mixture - math.log(1 / ALPHA)) / n)


def test_a_study_stops_at_the_first_batch_whose_interval_is_narrow_enough():
    batch, width = 10, 0.05
    expected = next(look for look in range(1, 100) if zero_failure_upper(look * batch) <= width)
    assert zero_failure_upper((expected - 1) * batch) > width  # one batch earlier is not enough
    seeds = list(range(100, 100 + 100 * batch))
    trials = table([{"scheme": "baseline", "seed": s} for s in seeds[: (expected + 3) * batch]])

    result = replay(width_rule(width, batch), seeds, trials)

    assert result.stop_look == expected
    assert result.looks["look"].max() == expected  # no look after the stop
    last = result.looks[result.looks["look"] == expected].iloc[0]
    assert last["seeds"] == expected * batch and last["n"] == expected * batch
    assert last["cs_low"] == 0.0 and last["cs_high"] == pytest.approx(zero_failure_upper(expected * batch))
    assert not result.looks[result.looks["look"] < expected]["met"].any()


def test_every_arm_must_meet_the_rule_and_an_unfinished_batch_is_not_looked_at():
    batch, width = 10, 0.05
    solo = next(look for look in range(1, 100) if zero_failure_upper(look * batch) <= width)
    seeds = list(range(60 * batch))
    rows = [{"scheme": "baseline", "seed": s} for s in seeds[: 40 * batch]]
    # the second arm fails on its first seed: its interval stays wider for longer
    rows += [{"scheme": "randomout", "seed": s, "failed": s == 0} for s in seeds[: 40 * batch]]
    both = replay(width_rule(width, batch), seeds, table(rows))
    assert both.stop_look is not None and both.stop_look > solo
    looks = both.looks.set_index(["look", "scheme"])
    assert looks.loc[(solo, "baseline"), "met"] and not looks.loc[(solo, "randomout"), "met"]
    low, high = rate_cs(1, both.stop_look * batch)
    assert high - low <= width < np.subtract(*rate_cs(1, (both.stop_look - 1) * batch)[::-1])

    # the batch after look 2 has a trial still running: the study has looked twice, and not stopped
    cut = [
        r | {"status": "incomplete"} if r["seed"] == 2 * batch else r for r in rows if r["seed"] < 3 * batch
    ]
    partial = replay(width_rule(width, batch), seeds, table(cut))
    assert (partial.complete_looks, partial.stop_look) == (2, None)


def paired_rule(batch: int, smallest_effect: float | None = None) -> Sequential:
    until = {"paired": {"scheme": "randomout", "vs": "baseline", "decided": 0.95}}
    if smallest_effect is not None:
        until["paired"]["smallest_effect"] = smallest_effect
    return Sequential.model_validate({"batch": batch, "until": until})


def pairs(gains: list[float]) -> pd.DataFrame:
    rows = [{"scheme": "baseline", "seed": s, "acc": 0.5} for s in range(len(gains))]
    rows += [{"scheme": "randomout", "seed": s, "acc": 0.5 + g} for s, g in enumerate(gains)]
    return table(rows)


def test_a_paired_study_stops_when_every_seed_agrees_at_the_hand_computed_count():
    # All t gains positive: the one-sided sign mixture is 2^(t+1) * integral_1/2^1 q^t dq
    # = (2^(t+1) - 1) / (t + 1), first >= 2/alpha = 40 at t = 8 (t = 7 gives 31.9).
    first = next(t for t in range(1, 50) if (2 ** (t + 1) - 1) / (t + 1) >= 2 / ALPHA)
    assert first == 8 and sign_critical_count(7) is None and sign_critical_count(8) == 8
    seeds = list(range(30))
    result = replay(paired_rule(batch=3), seeds, pairs([0.02] * 30))
    assert result.stop_look == 3  # 9 pairs: the first look at or after 8
    last = result.looks.iloc[-1]
    assert (last["cs_low"], last["cs_high"]) == pytest.approx((0.02, 0.02))
    assert last["verdict"] == "better: median gain > 0"


def test_a_paired_study_stops_on_a_negligible_effect_only_when_given_one():
    gains = [0.001 * (-1) ** s for s in range(40)]  # a tiny, symmetric lottery: no gain to speak of
    undecided = replay(paired_rule(batch=10), list(range(40)), pairs(gains))
    assert undecided.stop_look is None and undecided.complete_looks == 4
    negligible = replay(paired_rule(batch=10, smallest_effect=0.01), list(range(40)), pairs(gains))
    assert negligible.stop_look == 1  # 10 pairs: c = 10, interval [-0.001, 0.001] inside +-0.01
    assert negligible.looks.iloc[-1]["verdict"] == "no median gain as large as 0.01 either way"


def test_rate_interval_ends_solve_the_mixture_equation_by_quadrature():
    for k, n in [(3, 20), (17, 60), (0, 30)]:
        low, high = rate_cs(k, n)

        def mixture(p: float, k: int = k, n: int = n) -> float:
            density = scipy.stats.beta(0.5, 0.5).pdf
            ratio, _ = scipy.integrate.quad(
                lambda q: (q / p) ** k * ((1 - q) / (1 - p)) ** (n - k) * density(q), 0, 1, limit=200
            )
            return ratio

        assert mixture(high) == pytest.approx(1 / ALPHA, rel=1e-5)
        if k:
            assert mixture(low) == pytest.approx(1 / ALPHA, rel=1e-5)
        assert low <= k / n <= high


def test_the_rate_sequence_holds_at_every_look_where_a_wilson_interval_does_not():
    """Ville: P(the true rate ever leaves the sequence) <= alpha. A 95% Wilson interval recomputed
    after every seed, the naive sequential study, leaves it on a far larger share of paths."""
    rng = np.random.default_rng(7)
    p, paths, steps = 0.2, 4000, 300
    x = rng.random((paths, steps)) < p
    k = np.cumsum(x, axis=1)
    n = np.arange(1, steps + 1)
    log_m = (
        scipy.special.betaln(0.5 + k, 0.5 + n - k)
        - math.log(math.pi)
        - k * math.log(p)
        - (n - k) * math.log(1 - p)
    )
    ever_out = (log_m >= math.log(1 / ALPHA)).any(axis=1).mean()
    z = scipy.stats.norm.ppf(1 - ALPHA / 2)
    phat = k / n
    centre = (phat + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * np.sqrt(phat * (1 - phat) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    wilson_out = (np.abs(centre - p) > half).any(axis=1).mean()
    assert ever_out <= ALPHA
    assert wilson_out > 3 * ALPHA


def test_the_median_sequence_rarely_decides_a_null_comparison():
    """Gains with median 0, a third of them ties at exactly 0: an anytime 'decided' is rare (<= alpha)."""
    rng = np.random.default_rng(3)
    paths, steps = 4000, 200
    gains = rng.normal(0, 0.01, (paths, steps)) * (rng.random((paths, steps)) > 1 / 3)
    crit = np.array([sign_critical_count(t) or t + 1 for t in range(1, steps + 1)])
    positive = np.cumsum(gains > 0, axis=1)
    negative = np.cumsum(gains < 0, axis=1)
    decided = ((positive >= crit) | (negative >= crit)).any(axis=1).mean()
    assert decided <= ALPHA
    # the count test and the order-statistic interval are the same decision
    path = gains[0, :60]
    low, high = median_cs(path)
    c = sign_critical_count(60)
    assert (low > 0) == ((path > 0).sum() >= c) and (high < 0) == ((path < 0).sum() >= c)


def test_plan_sample_sizes_agree_with_hand_computed_ones():
    # 1.959964^2 * 0.2 * 0.8 / 0.05^2 = 245.85 -> 246; at p = 1/2: 384.15 -> 385
    assert rate_sample_size(0.2, 0.05) == 246
    assert rate_sample_size(0.5, 0.05) == 385
    # paired t-test, alpha 0.05 two-sided, power 0.8: n = 34 for d = 0.5 sd, 15 for 0.8 sd, 199 for 0.2 sd
    assert [paired_sample_size(d, 1.0) for d in (0.5, 0.8, 0.2)] == [34, 15, 199]
    assert paired_sample_size(0.01, 0.02) == 34  # the same effect size in accuracy units
    # the sequential column: the first n whose sequence at the rate is at most 2w wide
    n = rate_sample_size_anytime(0.2, 0.05)
    assert np.subtract(*rate_cs(0.2 * n, n)[::-1]) <= 0.1 < np.subtract(*rate_cs(0.2 * (n - 1), n - 1)[::-1])


def test_the_sequential_paired_plan_is_exact_and_agrees_with_simulating_the_sequence():
    # Looking after every pair, "better" is declared by 90 pairs (d = 0.5 sd) and 25 (d = sd) with
    # power 0.8, where the fixed t-test needs 34 and 10; looking every 20 pairs, 100 and 40.
    assert [sequential_paired_sample_size(d, 1.0) for d in (0.5, 1.0)] == [90, 25]
    assert [sequential_paired_sample_size(d, 1.0, batch=20) for d in (0.5, 1.0)] == [100, 40]
    assert sequential_paired_sample_size(0.01, 0.02, batch=20) == 100  # the same effect size in accuracy
    # The exact forward pass against 20,000 simulated studies. The sequence's lower end is above 0
    # exactly when the positive gains reach the critical count (checked on real paths below).
    rng = np.random.default_rng(7)
    gains = rng.normal(1.0, 1.0, size=(20000, 25))
    positives = np.cumsum(gains > 0, axis=1)
    critical = np.array([sign_critical_count(n) or n + 1 for n in range(1, 26)])
    decided = (positives >= critical).any(axis=1)
    assert decided.mean() == pytest.approx(sequential_paired_power(25, 1.0, 1.0), abs=0.015)
    for path, n in itertools.product(gains[:40], (10, 18, 25)):
        assert (median_cs(path[:n])[0] > 0) == ((path[:n] > 0).sum() >= critical[n - 1])
    assert sequential_paired_power(24, 1.0, 1.0) < 0.8 <= sequential_paired_power(25, 1.0, 1.0)
    # The planner's fast critical counts are the sequence's own, n by n.
    assert sign_critical_counts(300).tolist() == [sign_critical_count(n) or 0 for n in range(301)]
    assert _plan_cell(math.inf) == f"> {SEQUENTIAL_PAIRED_MAX}"  # beyond the exact pass's reach


def test_lottery_plan_prints_the_table_with_its_methods(tmp_path):
    runner = CliRunner()
    given = runner.invoke(
        app, ["plan", "--rate", "0.2", "--within", "0.05", "--gain", "0.01", "--gain-sd", "0.02"]
    )
    assert given.exit_code == 0, given.output
    assert "246" in given.stdout and "34" in given.stdout
    assert "normal approximation" in given.stdout and "noncentral t" in given.stdout
    gain_row = next(line for line in given.stdout.splitlines() if line.startswith("│ gain sd"))
    assert gain_row.split("│")[-2].strip() == "100"  # the sequential paired column, a look every 20 pairs
    caption = " ".join(given.stdout.split())
    assert "sign-test confidence sequence" in caption and "a look every 20 pairs" in caption

    pilot = lottery_trials([("baseline", {}), ("randomout", {"tau": 1e-8})], range(40), fail_rate=0.25)
    sweep_dir = write_sweep(tmp_path, "pilot", pilot)
    result = runner.invoke(app, ["plan", str(sweep_dir), "--within", "0.1", "--gain", "0.01"])
    assert result.exit_code == 0, result.output
    baseline = [t for t in pilot if t.scheme == "baseline"]
    failed = sum(t.final_test_acc <= 0.15 for t in baseline)  # chance 0.1 + margin 0.05 in the factory
    expected = rate_sample_size(failed / len(baseline), 0.1)
    row = next(line for line in result.stdout.splitlines() if "baseline" in line)
    assert f" {expected} " in row, result.stdout

    bad = runner.invoke(app, ["plan", "--within", "0.7", "--rate", "0.2"])
    assert (
        bad.exit_code == 2
        and bad.stderr.strip() == "error: --within: needs a half-width in (0, 0.5], got 0.7"
    )


# --- the plan of a sequential study -----------------------------------------------------------------


def sequential_doc(**seeds) -> dict:
    return {
        "name": "seq",
        "base": PLANNED_BASE,
        "seeds": {"start": 5, "max": 10, "batch": 4, "until": "failure_rate_ci_width <= 0.2"} | seeds,
        "schemes": [{"name": "baseline"}, {"name": "randomout"}],
        "pack_size": 2,
    }


def test_a_sequential_plan_is_batch_first_and_its_open_batches_are_a_prefix():
    plan = expand(SweepSpec.model_validate(sequential_doc()))
    assert plan.spec.seeds == list(range(5, 15)) and plan.n_batches == 3  # 4 + 4 + 2 seeds
    order = [(t.scheme.name, t.seed) for t in plan.trials]
    assert order[:8] == [("baseline", s) for s in range(5, 9)] + [("randomout", s) for s in range(5, 9)]
    assert order[16:] == [("baseline", 13), ("baseline", 14), ("randomout", 13), ("randomout", 14)]
    two = plan.opened(2)
    assert two.trials == plan.trials[:16] and two.units == plan.units[:8]
    batch = plan.batch(1)
    assert [(t.scheme.name, t.seed) for t in batch.trials] == order[8:16]
    assert [[batch.trials[i].seed for i in u] for u in batch.units] == [[9, 10], [11, 12]] * 2
    # the recorded spec expands to the same plan (what `lottery sync` relies on)
    document = plan.spec_document()
    again = expand(
        SweepSpec.model_validate({k: v for k, v in document.items() if k not in ("fingerprint", "n_trials")})
    )
    assert again.fingerprint == plan.fingerprint == document["fingerprint"]


def test_a_started_study_keeps_its_rule_and_lists_only_its_open_batches(tmp_path: Path):
    plan = expand(SweepSpec.model_validate(sequential_doc()))
    sweep_dir = tmp_path / "seq"
    record_plan(plan, sweep_dir)
    planned = yaml.safe_load((sweep_dir / "trials.json").read_text())
    assert [r["trial_key"] for r in planned] == [t.trial_key() for t in plan.trials[:8]]
    StudyState(opened=2).save(sweep_dir)
    record_plan(plan, sweep_dir)  # the same design resumes, and lists both open batches
    assert len(yaml.safe_load((sweep_dir / "trials.json").read_text())) == 16

    for change in ({"until": "failure_rate_ci_width <= 0.3"}, {"batch": 5}, {"max": 12}):
        other = expand(SweepSpec.model_validate(sequential_doc(**change)))
        with pytest.raises(UserError, match="design is fixed once it has results"):
            record_plan(other, sweep_dir)
    fixed = expand(SweepSpec.model_validate(sequential_doc() | {"seeds": list(range(5, 15))}))
    with pytest.raises(UserError, match="started as a sequential study"):
        record_plan(fixed, sweep_dir)


def test_the_report_states_the_design_the_rule_and_the_anytime_method():
    from dashboards.report import _sequential_html

    seeds = list(range(30))
    looks = replay(paired_rule(batch=3), seeds, pairs([0.02] * 30)).looks
    page = _sequential_html(looks)
    assert "Sequential study" in page and "held at look 3, after 9 seeds per configuration" in page
    assert looks["rule"].iloc[0] in page and "Howard &amp; Ramdas 2022" in page
    assert page.count("<tr>") == 1 + len(looks)  # the header and one row per (look, arm)
    assert _sequential_html(looks.iloc[0:0]) == ""  # a fixed design has no such section
