"""The pre-registered example studies plan what their READMEs promise, and their study seeds are not
their pilots' (a setting chosen on a pilot is tested on fresh seeds)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.spec import load_plan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_variance_study_is_a_10_by_10_factorial_per_arm():
    plan = load_plan(EXAMPLES / "variance_digits" / "study.yaml")
    assert len(plan.trials) == 2 * 10 * 10
    assert {t.scheme.name for t in plan.trials} == {"baseline", "batchnorm"}
    assert {t.seed for t in plan.trials} == set(range(100, 110))
    assert {t.order_seed for t in plan.trials} == set(range(200, 210))
    assert {(t.augment_seed, t.replicate, t.data_seed) for t in plan.trials} == {(None, 0, 0)}
    text = (EXAMPLES / "variance_digits" / "README.md").read_text()
    assert "10 init seeds (100..109) x 10 order seeds (200..209)" in text


def test_the_fate_clock_study_forks_fresh_seeds_at_the_piloted_setting():
    pilot = load_plan(EXAMPLES / "fate_craters" / "pilot.yaml")
    study = load_plan(EXAMPLES / "fate_craters" / "study.yaml")
    assert len(pilot.trials) == 2 * 2 * 10 and len(study.trials) == 2 * 16 * (1 + 3 * 2)
    assert not {t.seed for t in pilot.trials} & {t.seed for t in study.trials}
    assert {t.optim.lr for t in study.trials} == {0.05} and 0.05 in {t.optim.lr for t in pilot.trials}
    assert {(t.model.filters, t.batch_size, t.data.image_size) for t in study.trials} == {(1, 64, 15)}
    forks = {(t.fork.at, t.fork.child) for t in study.trials if t.fork is not None}
    assert forks == {(at, c) for at in (0.0, 0.05, 0.25) for c in (1, 2)}
    assert sum(t.fork is None for t in study.trials) == 2 * 16  # the parents


def test_the_reset_family_study_runs_its_five_arms_on_fresh_seeds_at_the_piloted_lr():
    pilot = load_plan(EXAMPLES / "reset_family" / "pilot.yaml")
    study = load_plan(EXAMPLES / "reset_family" / "study.yaml")
    assert len(study.trials) == 3 * 5 * 50 and len(pilot.trials) == 3 * 2 * 5 * 6
    assert not {t.seed for t in pilot.trials} & {t.seed for t in study.trials}
    assert {t.optim.lr for t in study.trials} == {0.05} and {t.model.filters for t in study.trials} == {
        1,
        2,
        4,
    }
    arms = {(t.scheme.name, getattr(t.scheme, "outgoing", None)) for t in study.trials}
    assert arms == {
        ("baseline", None),
        ("randomout", "keep"),
        ("randomout", "zero"),
        ("redo", None),
        ("cbp", None),
    }
    piloted = {t.scheme.model_dump_json() for t in pilot.trials}
    assert {t.scheme.model_dump_json() for t in study.trials} <= piloted  # every arm as piloted
