"""Every spec in configs/ expands, validates, and plans exactly the trials its header promises."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from orchestrator.spec import load_plan

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PILOT_LR = 0.2  # the lr crater_dying_pilot.yaml chose by its stated rule (its header gives the counts)
EXPECTED_TRIALS = {
    "demo.yaml": 3 * 20,
    "inception28_cifar10.yaml": 3 * 50,
    "crater_tau_p_grid.yaml": (11 * 4 + 1) * 2 * 50,  # two lrs
    "crater_dying_pilot.yaml": 2 * 4 * 10,
    "crater_width.yaml": 10 * 2 * 50,
    "repr_c3_32.yaml": (8 + 1) * 20,
    "resnet20_cifar10.yaml": 2 * 10,
    "crater_width_study.yaml": 6 * 2 * 30,
    "lottery_imp_digits.yaml": 3 * 20,
    "lottery_edgepopup_digits.yaml": (1 + 4 * 2) * 20,
    "sequential_failure_rate.yaml": 400,  # at most: a sequential study opens 40 seeds at a time
    "sequential_paired.yaml": 2 * 400,
}


def test_every_spec_in_configs_is_listed_here():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED_TRIALS)


@pytest.mark.parametrize("name", sorted(EXPECTED_TRIALS))
def test_spec_expands_to_the_exact_trial_count_with_paired_seeds(name):
    path = CONFIGS / name
    plan = load_plan(path)
    assert len(plan.trials) == EXPECTED_TRIALS[name]
    assert plan.spec.name == path.stem
    assert len({t.trial_key() for t in plan.trials}) == len(plan.trials)
    seeds_per_config = Counter(t.config_hash() for t in plan.trials)
    assert set(seeds_per_config.values()) == {len(plan.spec.seeds)}
    assert path.read_text().startswith(("# Reproduces", "# Sequential", "# Pilot")) or name == "demo.yaml"
    assert "Expected cost" in path.read_text()


def test_paper_specs_match_their_papers_settings():
    inception = load_plan(CONFIGS / "inception28_cifar10.yaml").trials[0]
    assert (inception.model.name, inception.data.image_size, inception.optim.name, inception.batch_size) == (
        "inception28",
        28,
        "adam",
        128,
    )
    width = load_plan(CONFIGS / "crater_width.yaml").trials
    assert {t.model.filters for t in width} == set(range(1, 11))
    assert {(t.scheme.tau, t.scheme.active_fraction) for t in width if t.scheme.name == "randomout"} == {
        (1e-12, 1.0)
    }
    grid = load_plan(CONFIGS / "crater_tau_p_grid.yaml").trials
    assert {t.scheme.tau for t in grid if t.scheme.name == "randomout"} == {10.0**-k for k in range(4, 15)}
    assert all(t.epochs == 150 and t.data.image_size == 15 and t.batch_size == 64 for t in grid)
    assert {t.optim.lr for t in grid} == {0.01, PILOT_LR}
    # The RandomOut specs feed the reference's input scale, so the paper's tau means what it meant there.
    for name in (
        "inception28_cifar10.yaml",
        "crater_width.yaml",
        "crater_tau_p_grid.yaml",
        "crater_width_study.yaml",
    ):
        assert {t.data.normalize for t in load_plan(CONFIGS / name).trials} == {"mean_image"}, name
    study = load_plan(CONFIGS / "crater_width_study.yaml").trials
    assert {t.model.filters for t in study} == set(range(1, 7)) and len(
        load_plan(CONFIGS / "crater_width_study.yaml").spec.seeds
    ) >= 30
    repr_trials = load_plan(CONFIGS / "repr_c3_32.yaml").trials
    metrics = {t.scheme.metric for t in repr_trials if t.scheme.name == "repr"}
    assert metrics == {"ortho", "weight", "cgn", "taylor", "apoz", "activation", "random", "oracle"}
    assert all(t.data.val_fraction > 0 and t.optim.lr == 0.01 and t.epochs == 100 for t in repr_trials)
    assert all(t.data.augment == "none" for t in repr_trials)  # the paper states no augmentation
    resnet = load_plan(CONFIGS / "resnet20_cifar10.yaml").trials
    assert {(t.scheme.name, getattr(t.scheme, "metric", None)) for t in resnet} == {
        ("baseline", None),
        ("repr", "ortho"),
    }
    assert all(
        (t.model.name, t.model.init, t.data.augment, t.optim.lr, t.optim.momentum, t.optim.weight_decay)
        == ("resnet20", "kaiming", "crop_flip", 0.1, 0.9, 1e-4)
        and t.epochs == 150
        and t.batch_size == 128
        for t in resnet
    )


def test_crater_specs_state_cgn_units():
    """Every crater spec says in which units tau is compared with CGN; its RandomOut arms say it too."""
    for path in sorted(CONFIGS.glob("crater_*.yaml")):
        assert "CGN units" in path.read_text(), path.name
        for trial in load_plan(path).trials:
            if trial.scheme.name == "randomout":
                assert trial.scheme.cgn_reduction == "sum" and trial.count_reduction == "sum", path.name


def test_the_dying_pilot_spans_the_widths_and_lrs_where_filters_die():
    plan = load_plan(CONFIGS / "crater_dying_pilot.yaml")
    trials = plan.trials
    assert {t.scheme.name for t in trials} == {"baseline"} and len(plan.spec.seeds) == 10
    assert {(t.model.filters, t.optim.lr) for t in trials} == {
        (f, lr) for f in (1, 2) for lr in (0.01, 0.05, 0.1, 0.2)
    }
    assert all(
        (t.data.name, t.data.image_size, t.model.name, t.batch_size, t.optim.name, t.full_batch)
        == ("craters", 15, "crater_cnn", 64, "sgd", False)
        for t in trials
    )
    assert (
        f"By the rule above the studies take lr {PILOT_LR:g}"
        in (CONFIGS / "crater_dying_pilot.yaml").read_text()
    )


@pytest.mark.parametrize("name", ["crater_tau_p_grid.yaml", "crater_width.yaml", "crater_width_study.yaml"])
def test_the_crater_studies_run_the_pilots_lr_on_seeds_it_did_not_see(name: str) -> None:
    """A setting chosen on a pilot is tested on fresh seeds: the studies take the pilot's lr (besides the
    grid's first choice, 0.01) at the pilot's batch, and none of the pilot's seeds."""
    pilot = load_plan(CONFIGS / "crater_dying_pilot.yaml").trials
    study = load_plan(CONFIGS / name).trials
    assert PILOT_LR in {t.optim.lr for t in study} and {t.optim.lr for t in study} <= {0.01, PILOT_LR}
    assert {(t.batch_size, t.full_batch, t.epochs) for t in study} == {(64, False, 150)}
    assert not {t.seed for t in pilot} & {t.seed for t in study}


def test_repr_c3_32_drops_29_of_its_96_filters_per_cycle():
    """drop_fraction_of: all, as Algorithm 1's "p % of F": round(0.3 x 96) = 29, from the two eligible
    layers of C3(32) (19 would be 30% of their 64). The spec's own RePr makes the drop."""
    import torch

    from trainers.cgn import CgnMonitor
    from trainers.filters import filter_groups
    from trainers.models import build_model
    from trainers.schemes import TrainContext
    from trainers.schemes.repr import RePr

    trials = load_plan(CONFIGS / "repr_c3_32.yaml").trials
    trial = next(t for t in trials if t.scheme.name == "repr" and t.scheme.metric == "ortho")
    assert trial.scheme.drop_fraction_of == "all"
    gen = torch.Generator().manual_seed(0)
    model = build_model(
        trial.model, in_channels=3, image_size=32, num_classes=10, batchnorm=False, generator=gen
    )
    groups = filter_groups(model)
    assert [g.filters for g in groups] == [32, 32, 32]
    optimizer = torch.optim.SGD(model.parameters(), lr=trial.optim.lr)
    monitor = CgnMonitor(groups, tau=trial.count_tau, trace_every=0)
    ctx = TrainContext(trial, model, groups, optimizer, monitor, data=None, generators=[gen])
    scheme = RePr(trial.scheme)
    scheme.setup(ctx)
    scheme.on_epoch_end(ctx, trial.scheme.s1 - 1)  # the first drop
    assert [int(m.sum()) for m in scheme.dropped_masks()][0] == 0
    assert sum(int(m.sum()) for m in scheme.dropped_masks()) == 29


def test_lottery_specs_pair_their_arms_by_seed():
    """The ticket control names the rewound IMP of the same settings as its reference; edge-popup
    shares the baseline's pair key, so every arm is compared seed by seed."""
    imp = load_plan(CONFIGS / "lottery_imp_digits.yaml").trials
    arms = {(t.scheme.name, getattr(t.scheme, "reinit", None)): t for t in imp if t.seed == 0}
    rewound, control = arms[("imp", False)], arms[("imp", True)]
    assert control.reference_hash() == rewound.config_hash() and rewound.reference_hash() is None
    assert rewound.pair_key() == arms[("baseline", None)].pair_key()
    assert (rewound.scheme.rounds, rewound.scheme.rate, rewound.scheme.rewind_step) == (4, 0.5, 0)
    # Frankle & Carbin's layer-wise rates (conv at half the fc rate, the output layer at half the fc
    # rate), OpenLTH's rounds that end at round 0's end step; the control prunes alike.
    for arm in (rewound, control):
        s = arm.scheme
        assert (s.scope, s.kind_rate("conv"), s.kind_rate("linear"), s.output_rate()) == (
            "layer",
            0.25,
            0.5,
            0.25,
        )
        assert s.round_steps == "remaining"
    edge = load_plan(CONFIGS / "lottery_edgepopup_digits.yaml").trials
    assert len({t.pair_key() for t in edge}) == 1
    assert {(t.scheme.k, t.scheme.weights) for t in edge if t.scheme.name == "edgepopup"} == {
        (k, w) for k in (0.1, 0.3, 0.5, 0.7) for w in ("signed_constant", "kaiming_normal")
    }


def test_kuberay_rayjob_runs_a_spec_of_this_repo_on_the_compose_image_with_token_auth():
    """The manifest cannot be applied here (no Kubernetes); its shape and references are checked."""
    import yaml

    job = yaml.safe_load((CONFIGS / "kuberay" / "rayjob.yaml").read_text())
    compose = yaml.safe_load((CONFIGS.parent / "docker-compose.yml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    command, verb, spec = job["spec"]["entrypoint"].split()
    assert (command, verb) == ("lottery", "sweep")
    load_plan(CONFIGS.parent / spec)  # the entrypoint names a valid spec of this repository
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.60.")
    assert cluster["authOptions"]["mode"] == "token"
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    images = {c["image"] for pod in pods for c in pod["template"]["spec"]["containers"]}
    assert images == {compose["x-lottery-image"]["image"]}
    workers = cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert workers["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert workers["volumes"][0]["emptyDir"]["medium"] == "Memory"  # shared memory for the object store
    env = {e["name"]: e for e in workers["containers"][0]["env"]}
    assert "valueFrom" in env["MLFLOW_TRACKING_PASSWORD"]  # from a Secret, never a literal value
    assert "value" not in env["MLFLOW_TRACKING_PASSWORD"]
