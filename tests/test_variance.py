"""Variance by source against hand computations and simulations with known components."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from dashboards.variance import (
    INTERACTION,
    NONDETERMINISM,
    TITLE,
    VARIANCE_COLUMNS,
    format_variance_table,
    share_ci_width,
    variance_by_source,
    variance_components,
)

SOURCES = ("seed", "order_seed")
TRUTH_PTS = {"seed": 2.0, "order_seed": 1.0, INTERACTION: 0.5, NONDETERMINISM: 0.3}  # SDs in points


def crossed(
    rng: np.random.Generator, levels: tuple[int, int] = (20, 20), replicates: int = 2, **sd
) -> pd.DataFrame:
    """One arm's full factorial over init x order seeds with replicates, accuracy = 80 % + a normal
    effect per init level, per order level, per cell and per trial, SDs in points."""
    s = {**TRUTH_PTS, **sd}
    a, b = levels
    y = (
        80
        + rng.normal(0, s["seed"], (a, 1, 1))
        + rng.normal(0, s["order_seed"], (1, b, 1))
        + rng.normal(0, s[INTERACTION], (a, b, 1))
        + rng.normal(0, s[NONDETERMINISM], (a, b, replicates))
    )
    i, j, k = np.meshgrid(range(a), range(b), range(replicates), indexing="ij")
    return pd.DataFrame(
        {
            "arm": "baseline",
            "seed": i.ravel(),
            "order_seed": j.ravel() + 100,
            "replicate": k.ravel(),
            "test_accuracy": y.ravel() / 100,
        }
    )


def pts2(result: dict, name: str) -> float:
    """A component in points^2."""
    return result["components"][name]["variance"] * 1e4


def test_a_3x2_design_with_replicates_matches_the_mean_squares_worked_by_hand() -> None:
    # Cell means (points) = 73 + init effect (0, -5, +5) + order effect (-2, +2) + interaction
    # ((1, -1), (-1, 1), (0, 0)); each cell holds 2 replicates around its mean:
    cells = {
        (0, 0): (71, 73),
        (0, 1): (74, 74),
        (1, 0): (64, 66),
        (1, 1): (70, 72),
        (2, 0): (76, 76),
        (2, 1): (78, 82),
    }
    frame = pd.DataFrame(
        [
            {"seed": i, "order_seed": j, "replicate": k, "test_accuracy": v / 100}
            for (i, j), pair in cells.items()
            for k, v in enumerate(pair)
        ]
    )
    # a = 3, b = 2, r = 2:
    # MS_init  = r b sum(init effect^2) / (a - 1) = 2 * 2 * 50 / 2 = 100
    # MS_order = r a sum(order effect^2) / (b - 1) = 2 * 3 * 8 / 1 = 48
    # MS_inter = r sum(interaction^2) / ((a - 1)(b - 1)) = 2 * 4 / 2 = 4
    # MS_within = (2 + 0 + 2 + 2 + 0 + 8) / (a b (r - 1)) = 14 / 6
    # E[MS_within] = s_e^2; E[MS_inter] = s_e^2 + r s_ab^2; E[MS_init] = s_e^2 + r s_ab^2 + r b s_a^2;
    # E[MS_order] = s_e^2 + r s_ab^2 + r a s_b^2, so:
    nondet, inter = 14 / 6, (4 - 14 / 6) / 2
    init, order = (100 - 4) / 4, (48 - 4) / 6
    result = variance_components(frame, SOURCES, n_boot=0)
    assert pts2(result, "seed") == pytest.approx(init)
    assert pts2(result, "order_seed") == pytest.approx(order)
    assert pts2(result, INTERACTION) == pytest.approx(inter)
    assert pts2(result, NONDETERMINISM) == pytest.approx(nondet)
    total = init + order + inter + nondet
    assert result["total"] * 1e4 == pytest.approx(total)
    assert result["components"]["seed"]["share"] == pytest.approx(init / total)
    assert result["replicates"] == 2 and result["n_trials"] == 12 and result["n_dropped"] == 0
    levels = {name: c["n_levels"] for name, c in result["components"].items()}
    assert levels == {"seed": 3, "order_seed": 2, INTERACTION: 6, NONDETERMINISM: 2}


def test_a_negative_estimate_is_reported_as_zero() -> None:
    # 2x2, one trial per cell, y = [[0, 1], [1, 0]] points: no init or order effect, all interaction.
    # MS_init = MS_order = 0 and MS_inter = 1 * 4 * 0.25 / 1 = 1, so s_a^2 = (0 - 1) / 2 < 0 -> 0.
    frame = pd.DataFrame(
        {"seed": [0, 0, 1, 1], "order_seed": [0, 1, 0, 1], "test_accuracy": [0.0, 0.01, 0.01, 0.0]}
    )
    result = variance_components(frame, SOURCES, n_boot=0)
    assert pts2(result, "seed") == 0.0 and pts2(result, "order_seed") == 0.0
    assert pts2(result, INTERACTION) == pytest.approx(1.0)
    assert result["components"][INTERACTION]["share"] == pytest.approx(1.0)
    # Without replicates the interaction includes the nondeterminism, and says so.
    assert "includes nondeterminism" in result["components"][INTERACTION]["note"]
    assert math.isnan(result["components"][NONDETERMINISM]["variance"])
    assert "no replicates" in result["components"][NONDETERMINISM]["note"]


def test_one_varying_source_without_replicates_is_its_sample_variance() -> None:
    acc = np.array([0.70, 0.74, 0.69, 0.75, 0.72])
    frame = pd.DataFrame({"seed": range(5), "order_seed": 7, "test_accuracy": acc})
    result = variance_components(frame, n_boot=0)
    parts = result["components"]
    assert parts["seed"]["variance"] == pytest.approx(np.var(acc, ddof=1))
    assert parts["seed"]["share"] == 1.0 and "includes nondeterminism" in parts["seed"]["note"]
    assert math.isnan(parts["order_seed"]["variance"]) and parts["order_seed"]["note"].startswith("one level")
    assert (
        math.isnan(parts["augment_seed"]["variance"]) and "not in the table" in parts["augment_seed"]["note"]
    )
    assert math.isnan(parts[INTERACTION]["variance"]) and "fewer than 2 sources" in parts[INTERACTION]["note"]


def test_known_components_are_recovered_on_average_and_shares_add_to_100() -> None:
    rng = np.random.default_rng(0)
    names = list(TRUTH_PTS)
    estimates = np.array(
        [
            [pts2(r, n) for n in names]
            for r in (variance_components(crossed(rng), n_boot=0) for _ in range(100))
        ]
    )
    truth = np.array([TRUTH_PTS[n] ** 2 for n in names])
    # ANOVA estimators are unbiased (truncation at 0 never bites at these sizes): the mean of 100
    # designs is within 10 % of the truth (about 3 standard errors for the init component).
    np.testing.assert_allclose(estimates.mean(axis=0), truth, rtol=0.10)
    one = variance_components(crossed(np.random.default_rng(1)), n_boot=200)
    shares = [c["share"] for c in one["components"].values() if not math.isnan(c["share"])]
    assert sum(shares) == pytest.approx(1.0)
    for name in names:
        low, high = one["components"][name]["share_ci"]
        assert 0 <= low <= one["components"][name]["share"] <= high <= 1


def test_a_design_where_only_init_varies_has_no_order_component() -> None:
    frame = crossed(np.random.default_rng(2), levels=(20, 1))
    parts = variance_components(frame, n_boot=100)["components"]
    assert math.isnan(parts["order_seed"]["variance"]) and parts["order_seed"]["note"] == (
        "one level: no spread to attribute"
    )
    assert parts["seed"]["variance"] > 0 and parts[NONDETERMINISM]["variance"] > 0
    assert parts["seed"]["share"] + parts[NONDETERMINISM]["share"] == pytest.approx(1.0)


def test_identical_replicates_give_exactly_zero_nondeterminism() -> None:
    frame = crossed(np.random.default_rng(3), levels=(8, 8), replicates=3, nondeterminism=0.0)
    result = variance_components(frame, n_boot=100)
    part = result["components"][NONDETERMINISM]
    assert part["variance"] == 0.0 and part["share"] == 0.0 and part["variance_ci"] == (0.0, 0.0)
    table = variance_by_source(frame, n_boot=50)
    assert (table["nondeterminism_sd_pts"] == 0.0).all()


def test_noisy_replicates_recover_the_injected_sd() -> None:
    frame = crossed(np.random.default_rng(4), levels=(10, 10), replicates=5, nondeterminism=0.3)
    part = variance_components(frame, n_boot=200)["components"][NONDETERMINISM]
    # 400 degrees of freedom: the SD estimate is within 10 % of 0.3 points (about 3 standard errors).
    assert 100 * math.sqrt(part["variance"]) == pytest.approx(0.3, rel=0.10)
    low, high = part["variance_ci"]
    assert low < 0.3**2 / 1e4 < high


def test_replicates_alone_measure_nondeterminism() -> None:
    acc = np.array([0.801, 0.799, 0.803, 0.800])
    frame = pd.DataFrame({"seed": 0, "replicate": range(4), "test_accuracy": acc})
    parts = variance_components(frame, n_boot=200)["components"]
    assert parts[NONDETERMINISM]["variance"] == pytest.approx(np.var(acc, ddof=1))
    assert parts[NONDETERMINISM]["share"] == 1.0
    assert parts[NONDETERMINISM]["variance_ci"][1] > 0
    assert all(math.isnan(parts[s]["variance"]) for s in ("seed", "order_seed", INTERACTION))


def test_an_arm_where_nothing_varies_has_no_components() -> None:
    frame = pd.DataFrame({"seed": [3], "order_seed": [1], "test_accuracy": [0.8]})
    result = variance_components(frame)
    assert all(math.isnan(c["variance"]) for c in result["components"].values())
    assert math.isnan(result["total"])
    assert result["components"][NONDETERMINISM]["note"] == "no replicates"


def test_a_missing_cell_cuts_the_design_to_a_balanced_one_and_counts_what_was_left_out() -> None:
    frame = crossed(np.random.default_rng(5), levels=(6, 6), replicates=1)
    failed = (frame["seed"] == 2) & (frame["order_seed"] == 103)
    frame.loc[failed, "test_accuracy"] = np.nan  # a diverged trial
    result = variance_components(frame, n_boot=0)
    # One missing cell: one init level or one order level goes (5 more trials), ties to the first source.
    assert result["n_trials"] == 30 and result["n_dropped"] == 6
    without_row = variance_components(frame[frame["seed"] != 2], n_boot=0)
    assert pts2(result, "seed") == pytest.approx(pts2(without_row, "seed"))
    assert pts2(result, INTERACTION) == pytest.approx(pts2(without_row, INTERACTION))
    # A failed trial that is simply absent from the frame is cut the same way.
    absent = variance_components(frame[~failed], n_boot=0)
    assert absent["n_trials"] == 30 and absent["n_dropped"] == 5
    assert pts2(absent, "order_seed") == pytest.approx(pts2(result, "order_seed"))
    table = variance_by_source(frame.assign(arm="a"), n_boot=0)
    assert set(table["n_dropped"]) == {6}


def test_two_trials_with_the_same_seeds_and_replicate_are_refused() -> None:
    frame = pd.DataFrame({"seed": [0, 0, 1], "replicate": [0, 0, 0], "test_accuracy": [0.8, 0.81, 0.79]})
    with pytest.raises(ValueError, match="give repeated trials distinct `replicate` values"):
        variance_components(frame)


def test_the_table_has_a_row_per_arm_and_source_with_both_floors() -> None:
    rng = np.random.default_rng(6)
    frame = pd.concat([crossed(rng, (6, 5)), crossed(rng, (4, 4), replicates=1).assign(arm="randomout")])
    # Two seeds of randomout on 4 test examples: p = (1, 1/2, 0, 1/2), sum p(1 - p) = 1/2,
    # floor = sqrt(1/2) / 4 = 17.68 points.
    correct = {"randomout": [np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 1], bool)]}
    table = variance_by_source(frame, test_correct=correct, n_boot=100)
    assert list(table.columns) == list(VARIANCE_COLUMNS)
    assert list(zip(table["arm"], table["source"], strict=True)) == list(
        itertools.product(
            ["baseline", "randomout"], ["seed", "order_seed", "augment_seed", INTERACTION, NONDETERMINISM]
        )
    )
    floor = table.groupby("arm")["test_floor_sd_pts"].first()
    assert math.isnan(floor["baseline"]) and floor["randomout"] == pytest.approx(100 * math.sqrt(0.5) / 4)
    arm = table[table["arm"] == "baseline"].set_index("source")
    assert arm["share_pct"].sum() == pytest.approx(100.0)
    assert arm.loc["seed", "sd_pts"] == pytest.approx(100 * math.sqrt(arm.loc["seed", "variance"]))
    assert arm.loc["seed", "sd_ci_low"] <= arm.loc["seed", "sd_pts"] <= arm.loc["seed", "sd_ci_high"]
    assert arm["nondeterminism_sd_pts"].iloc[0] == pytest.approx(arm.loc[NONDETERMINISM, "sd_pts"])
    assert arm["total_sd_pts"].iloc[0] == pytest.approx(100 * math.sqrt(arm["variance"].sum()))
    text = format_variance_table(table)
    assert text.startswith(TITLE) and "randomout" in text and "not in the table" in text


def test_the_bootstrap_is_deterministic_for_a_seed() -> None:
    frame = crossed(np.random.default_rng(7), (8, 8))
    one, two = (variance_components(frame, n_boot=100, seed=3) for _ in range(2))
    pd.testing.assert_frame_equal(pd.DataFrame(one["components"]), pd.DataFrame(two["components"]))
    other = variance_components(frame, n_boot=100, seed=4)
    assert other["components"]["seed"]["share_ci"] != one["components"]["seed"]["share_ci"]


def test_the_share_interval_narrows_with_more_levels() -> None:
    rng = np.random.default_rng(8)
    small = share_ci_width(crossed(rng, (6, 6)), "seed", n_boot=300)
    large = share_ci_width(crossed(rng, (40, 40)), "seed", n_boot=300)
    assert 0 < large < small <= 1
    parts = variance_components(crossed(np.random.default_rng(9), (10, 10)), n_boot=300)["components"]
    low, high = parts["seed"]["share_ci"]
    assert share_ci_width(crossed(np.random.default_rng(9), (10, 10)), "seed", n_boot=300) == high - low
    # Two arms: the widest counts; a component that cannot be estimated gives NaN (no stop).
    both = pd.concat([crossed(rng, (40, 40)), crossed(rng, (6, 6)).assign(arm="b")])
    assert share_ci_width(both, "seed", n_boot=300) > large
    assert math.isnan(share_ci_width(both, "augment_seed", n_boot=50))
    with pytest.raises(ValueError, match="unknown component"):
        share_ci_width(both, "dropout_seed", n_boot=50)


@pytest.mark.slow
def test_the_pigeonhole_interval_of_the_init_share_covers_the_truth() -> None:
    rng = np.random.default_rng(10)
    truth = {n: s**2 for n, s in TRUTH_PTS.items()}
    share = truth["seed"] / sum(truth.values())
    runs, covered = 150, 0
    for i in range(runs):
        low, high = variance_components(crossed(rng), n_boot=300, seed=i)["components"]["seed"]["share_ci"]
        covered += low <= share <= high
    print(f"95% pigeonhole bootstrap interval of the init share: coverage {covered / runs:.3f} over {runs}")
    assert 0.85 <= covered / runs <= 0.99


def test_three_crossed_sources_recover_their_components_and_pooled_interactions() -> None:
    # init x order x augmentation, 6 levels each, 2 replicates; each two-way interaction SD 0.3 and the
    # three-way 0.2 points, pooled: 3 * 0.09 + 0.04 = 0.31 points^2.
    rng = np.random.default_rng(12)
    sd = {"seed": 1.5, "order_seed": 1.0, "augment_seed": 0.7}
    truth = [1.5**2, 1.0**2, 0.7**2, 3 * 0.3**2 + 0.2**2, 0.25**2]
    i, j, k, rep = np.meshgrid(*(range(6),) * 3, range(2), indexing="ij")
    estimates = []
    for _ in range(60):
        y = 80 + sum(rng.normal(0, s, 6)[axis] for axis, s in zip((i, j, k), sd.values(), strict=True))
        for a, b in itertools.combinations((i, j, k), 2):
            y = y + rng.normal(0, 0.3, (6, 6))[a, b]
        y = y + rng.normal(0, 0.2, (6, 6, 6))[i, j, k] + rng.normal(0, 0.25, y.shape)
        frame = pd.DataFrame(
            {"seed": i.ravel(), "order_seed": j.ravel(), "augment_seed": k.ravel(), "replicate": rep.ravel()}
        ).assign(test_accuracy=y.ravel() / 100)
        result = variance_components(frame, n_boot=0)
        estimates.append([pts2(result, n) for n in [*sd, INTERACTION, NONDETERMINISM]])
    # Mean of 60 designs: within 3 standard errors of the truth (6 levels: a main effect's estimate
    # has a relative SD of about sqrt(2 / 5) per design).
    np.testing.assert_allclose(np.mean(estimates, axis=0), truth, rtol=0.25)
    np.testing.assert_allclose(np.mean(estimates, axis=0)[3:], truth[3:], rtol=0.05)
    timed = variance_components(frame, n_boot=1000)
    assert timed["n_trials"] == 432 and timed["components"]["augment_seed"]["n_levels"] == 6


def test_rows_with_the_same_seeds_and_no_replicate_column_are_replicates() -> None:
    acc = [0.80, 0.82, 0.70, 0.71]  # two seeds, each run twice: within-cell variance (0.02^2 + 0.01^2) / 4
    frame = pd.DataFrame({"seed": [0, 0, 1, 1], "test_accuracy": acc})
    parts = variance_components(frame, n_boot=0)["components"]
    assert parts[NONDETERMINISM]["variance"] == pytest.approx((0.01**2 + 0.01**2 + 0.005**2 + 0.005**2) / 2)
    assert parts[NONDETERMINISM]["n_levels"] == 2 and parts["seed"]["note"] == ""
