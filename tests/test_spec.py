"""Sweep specs: expansion order and count, paired seeds, and one-line errors for malformed specs (no Ray)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from specfactory import PLANNED_BASE
from trialfactory import store_finished, stored_result
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.errors import UserError
from orchestrator.run.sweep import record_plan
from orchestrator.spec import SweepSpec, expand, load_plan


def spec_doc(**changes) -> dict:
    doc = {
        "name": "unit",
        "base": PLANNED_BASE,
        "seeds": [3, 1, 2],
        "schemes": [
            {"name": "baseline"},
            {"name": "randomout", "grid": {"tau": [1e-6, 1e-8], "active_fraction": [0.5, 1.0]}},
        ],
    }
    return doc | changes


def write_spec(path: Path, doc: dict | str) -> Path:
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def test_expansion_is_schemes_then_grid_then_seeds():
    plan = expand(SweepSpec.model_validate(spec_doc()))
    assert len(plan.trials) == (1 + 2 * 2) * 3
    got = [
        (t.scheme.name, t.scheme_hparams().get("tau"), t.scheme_hparams().get("active_fraction"), t.seed)
        for t in plan.trials
    ]
    expected = [("baseline", None, None, s) for s in (3, 1, 2)]
    expected += [("randomout", tau, p, s) for tau in (1e-6, 1e-8) for p in (0.5, 1.0) for s in (3, 1, 2)]
    assert got == expected
    assert len({t.trial_key() for t in plan.trials}) == len(plan.trials)
    assert [r["trial_key"] for r in plan.rows()] == [t.trial_key() for t in plan.trials]


def test_every_configuration_gets_the_same_seeds_and_pairs_across_schemes():
    plan = expand(SweepSpec.model_validate(spec_doc()))
    seeds: dict[str, list[int]] = {}
    for t in plan.trials:
        seeds.setdefault(t.config_hash(), []).append(t.seed)
    assert all(s == [3, 1, 2] for s in seeds.values()) and len(seeds) == 5
    assert len({t.pair_key() for t in plan.trials}) == 1  # schemes differ only in scheme and seed


@pytest.mark.parametrize(
    ("seeds", "expected"),
    [([5, 0], [5, 0]), ({"start": 10, "count": 3}, [10, 11, 12]), ({"range": [4, 7]}, [4, 5, 6])],
)
def test_seed_forms(seeds, expected):
    assert SweepSpec.model_validate(spec_doc(seeds=seeds)).seeds == expected


def test_top_level_grid_and_dotted_scheme_grid_keys_are_trial_config_paths():
    doc = spec_doc(
        grid={"model.filters": [2, 3]},
        schemes=[
            {"name": "baseline"},
            {"name": "randomout", "params": {"tau": 1e-12}, "grid": {"optim.lr": [0.1, 0.01]}},
        ],
        seeds=[0],
    )
    plan = expand(SweepSpec.model_validate(doc))
    got = [(t.scheme.name, t.model.filters, t.optim.lr) for t in plan.trials]
    assert got == [
        ("baseline", 2, 0.01),
        ("baseline", 3, 0.01),
        ("randomout", 2, 0.1),
        ("randomout", 2, 0.01),
        ("randomout", 3, 0.1),
        ("randomout", 3, 0.01),
    ]
    assert all(t.scheme.tau == 1e-12 for t in plan.trials if t.scheme.name == "randomout")
    assert {t.pair_key() for t in plan.trials if t.model.filters == 2} != {
        t.pair_key() for t in plan.trials if t.model.filters == 3
    }


def test_fingerprint_follows_the_trials_not_the_runtime_settings():
    plan = expand(SweepSpec.model_validate(spec_doc()))
    same = expand(SweepSpec.model_validate(spec_doc(max_concurrent_trials=1, resources={"cpu": 2})))
    other = expand(SweepSpec.model_validate(spec_doc(seeds=[3, 1, 2, 4])))
    assert plan.fingerprint == same.fingerprint != other.fingerprint
    assert plan.spec_document()["n_trials"] == 15 and plan.spec_document()["failure_margin"] == 0.05


def test_a_repeated_configuration_is_refused():
    doc = spec_doc(schemes=[{"name": "randomout"}, {"name": "randomout", "params": {"tau": 1e-8}}])
    with pytest.raises(UserError, match=r"schemes\[1\]: repeats a configuration of schemes\[0\]"):
        expand(SweepSpec.model_validate(doc))


BAD_SPECS = {
    "unknown scheme": (
        spec_doc(schemes=[{"name": "baseline"}, {"name": "dropout"}]),
        "schemes[1].name: unknown scheme 'dropout'",
    ),
    "empty seeds": (spec_doc(seeds=[]), "seeds: no seeds"),
    "duplicate seed": (spec_doc(seeds=[1, 2, 1]), "seeds: seed 1 is listed more than once"),
    "gpu fraction": (spec_doc(resources={"cpu": 1, "gpu": 1.5}), "resources.gpu: a fraction in [0, 1]"),
    "unknown top-level field": (spec_doc(retries=3), "retries: unknown field"),
    "unknown grid key": (
        spec_doc(schemes=[{"name": "randomout", "grid": {"taux": [1e-8]}}]),
        "schemes[0].grid.taux: unknown field",
    ),
    "bad grid value": (
        spec_doc(schemes=[{"name": "baseline"}, {"name": "randomout", "grid": {"tau": [1e-8, -1.0]}}]),
        "schemes[1].grid.tau: Input should be greater than or equal to 0",
    ),
    "bad base field": (
        spec_doc(base=PLANNED_BASE | {"model": {"name": "resnet"}}),
        "base.model.name: Input should be",
    ),
    "seed in base": (spec_doc(base=PLANNED_BASE | {"seed": 1}), "base: seed does not belong in base"),
    "bad name": (spec_doc(name="../escape"), "name: a sweep name is at most 64 characters"),
    "bad yaml": ("name: [unclosed\n", "YAML: malformed document at line"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_malformed_spec_prints_one_line_naming_the_field_and_exits_2(case, tmp_path, monkeypatch):
    doc, expected = BAD_SPECS[case]
    monkeypatch.setenv("LOTTERY_HOME", str(tmp_path / "home"))
    path = write_spec(tmp_path / "bad.yaml", doc)
    result = CliRunner().invoke(app, ["sweep", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), result.stderr
    assert not (tmp_path / "home").exists()  # nothing was created


def test_missing_spec_file_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["sweep", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and result.stderr.startswith("error: config: no such file")


def test_dry_run_prints_the_count_and_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LOTTERY_HOME", str(tmp_path / "home"))
    path = write_spec(tmp_path / "ok.yaml", spec_doc())
    result = CliRunner().invoke(app, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "15 trials in sweep 'unit'" in result.stdout and "randomout" in result.stdout
    assert not (tmp_path / "home").exists()


def test_spec_file_round_trip(tmp_path):
    text = textwrap.dedent(
        """
        # comments are fine
        name: yaml-demo
        base: {data: {name: digits}, epochs: 1}
        seeds: {range: [0, 2]}
        schemes: [{name: baseline}, {name: batchnorm}]
        """
    )
    plan = load_plan(write_spec(tmp_path / "s.yaml", text))
    assert [(t.scheme.name, t.seed) for t in plan.trials] == [
        ("baseline", 0),
        ("baseline", 1),
        ("batchnorm", 0),
        ("batchnorm", 1),
    ]


def test_a_changed_spec_under_the_same_name_is_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("LOTTERY_HOME", str(tmp_path / "home"))
    record_plan(expand(SweepSpec.model_validate(spec_doc())), tmp_path / "home" / "unit")
    recorded = (tmp_path / "home" / "unit" / "spec.json").read_text()
    path = write_spec(tmp_path / "grown.yaml", spec_doc(seeds=[3, 1, 2, 4]))
    result = CliRunner().invoke(app, ["sweep", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds a different plan (15 trials" in lines[0] and "this spec: 20" in lines[0]
    assert (tmp_path / "home" / "unit" / "spec.json").read_text() == recorded
    assert sorted(p.name for p in (tmp_path / "home" / "unit").iterdir()) == ["spec.json", "trials.json"]


def test_resume_without_a_sweep_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LOTTERY_HOME", str(tmp_path / "home"))
    path = write_spec(tmp_path / "ok.yaml", spec_doc())
    result = CliRunner().invoke(app, ["sweep", str(path), "--resume"])
    assert result.exit_code == 2 and result.stderr.startswith("error: --resume: no sweep 'unit'")
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("command", ["aggregate", "report", "ui"])
def test_unknown_sweep_is_one_line(command, tmp_path, monkeypatch):
    monkeypatch.setenv("LOTTERY_HOME", str(tmp_path))
    result = CliRunner().invoke(app, [command, "nosuch"])
    assert result.exit_code == 2 and result.stderr.startswith("error: sweep: no sweep 'nosuch'")


def test_report_before_aggregate_is_one_line_naming_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LOTTERY_HOME", str(tmp_path / "home"))
    record_plan(expand(SweepSpec.model_validate(spec_doc())), tmp_path / "home" / "unit")
    result = CliRunner().invoke(app, ["report", "unit"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "lacks ['trials.parquet'" in lines[0]
    assert f"run `lottery aggregate {tmp_path / 'home' / 'unit'}` first" in " ".join(result.stderr.split())
    assert sorted(p.name for p in (tmp_path / "home" / "unit").iterdir()) == ["spec.json", "trials.json"]


def test_seed_packs_group_consecutive_seeds_of_one_configuration():
    doc = spec_doc(seeds={"start": 0, "count": 5}, pack_size=2)
    doc["schemes"].append({"name": "batchnorm"})
    plan = expand(SweepSpec.model_validate(doc))
    keys = [t.config_hash() for t in plan.trials]
    assert sorted(i for unit in plan.units for i in unit) == list(range(len(plan.trials)))
    for unit in plan.units:
        assert len({keys[i] for i in unit}) == 1, "a pack holds one configuration"
        assert list(unit) == list(range(unit[0], unit[-1] + 1))
    packable = [u for u in plan.units if plan.trials[u[0]].scheme.name != "batchnorm"]
    assert [len(u) for u in packable[:3]] == [2, 2, 1]  # 5 seeds in packs of 2
    assert all(len(u) == 1 for u in plan.units if plan.trials[u[0]].scheme.name == "batchnorm")


def test_auto_pack_size_follows_the_measured_rule_and_changes_the_fingerprint():
    narrow = expand(SweepSpec.model_validate(spec_doc(seeds={"start": 0, "count": 40})))
    assert max(len(u) for u in narrow.units) == 32  # 2 filters per conv: pack 32
    wide = expand(
        SweepSpec.model_validate(
            spec_doc(base=PLANNED_BASE | {"model": {"name": "crater_cnn", "filters": 20}})
        )
    )
    assert all(len(u) == 1 for u in wide.units)
    alone = expand(SweepSpec.model_validate(spec_doc(seeds={"start": 0, "count": 40}, pack_size=1)))
    assert [t.trial_key() for t in alone.trials] == [t.trial_key() for t in narrow.trials]
    assert alone.fingerprint != narrow.fingerprint, "a restored experiment keeps its own packing"


def test_auto_packs_follow_the_step_size_on_a_cpu_and_keep_the_batch_32_rule_on_cuda():
    """At full batch or a large step the grouped conv makes a CPU pack slower per seed (bench/pack.py)."""

    def largest_pack(device: str = "cpu", filters: int = 2, hidden: int = 16, **base) -> int:
        model = {"name": "crater_cnn", "filters": filters, "hidden_fc": hidden}
        base = PLANNED_BASE | {"model": model, "device": device} | base
        doc = spec_doc(seeds={"start": 0, "count": 40}, base=base)
        return max(len(u) for u in expand(SweepSpec.model_validate(doc)).units)

    assert largest_pack(batch_size=256) == 32  # 2 filters: 2^2 x 256 = 1024, the most that packs
    assert largest_pack(batch_size=512) == 1
    assert largest_pack(full_batch=True) == 1  # the training set's size is unknown while planning
    assert largest_pack(filters=4, hidden=0, batch_size=64) == 40  # 64 per pack, 40 seeds
    assert largest_pack(filters=4, hidden=0, batch_size=128) == 1
    assert largest_pack(filters=1, hidden=0, batch_size=256) == 40
    assert largest_pack(filters=1, hidden=0, full_batch=True) == 8  # one filter still pays, in packs of 8
    assert largest_pack(device="auto", full_batch=True) == 1  # sized as on a CPU
    assert largest_pack(device="cuda", full_batch=True) == 32  # launch-bound: unmeasured here, rule kept
    assert largest_pack(filters=20, device="cuda", batch_size=32) == 1


def test_a_changed_pack_size_is_refused_unless_allow_mixed(tmp_path, monkeypatch):
    """Packing is outside the trial key but changes a trial's exact numbers (summation order)."""
    monkeypatch.setenv("LOTTERY_HOME", str(tmp_path / "home"))
    sweep_dir = tmp_path / "home" / "unit"
    record_plan(expand(SweepSpec.model_validate(spec_doc(seeds={"start": 0, "count": 4}))), sweep_dir)
    (sweep_dir / "tune").mkdir()
    alone = write_spec(tmp_path / "alone.yaml", spec_doc(seeds={"start": 0, "count": 4}, pack_size=1))
    result = CliRunner().invoke(app, ["sweep", str(alone)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: pack_size:") and "--allow-mixed" in lines[0]
    assert (sweep_dir / "tune").is_dir(), "nothing may change on a refusal"

    plan = expand(SweepSpec.model_validate(spec_doc(seeds={"start": 0, "count": 4}, pack_size=1)))
    assert record_plan(plan, sweep_dir, allow_mixed=True) is False  # Tune starts afresh on new packs
    assert [p.name.split("-")[0] for p in sweep_dir.iterdir() if p.name.startswith("tune")] == [
        "tune.repacked"
    ]
    assert (sweep_dir / "spec.json").read_text().count(plan.fingerprint) == 1


def test_resuming_on_another_device_is_refused_unless_allow_mixed(tmp_path, monkeypatch):
    from orchestrator import layout
    from orchestrator.run.preflight import check_device_provenance

    monkeypatch.setenv("LOTTERY_HOME", str(tmp_path / "home"))
    sweep_dir = tmp_path / "home" / "unit"
    path = write_spec(tmp_path / "same.yaml", spec_doc())
    plan = load_plan(path)  # device: cpu; the file's order (YAML sorts the grid keys)
    record_plan(plan, sweep_dir)
    done = layout.trial_dir(sweep_dir, plan.trials[0].trial_key())
    store_finished(done, stored_result(device="cuda:0", pack_size=1, threads=1))
    result = CliRunner().invoke(app, ["sweep", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: device: finished trials") and "cuda:0" in lines[0]
    assert "--allow-mixed" in lines[0] and not (sweep_dir / "tune").exists()
    check_device_provenance(plan, sweep_dir, embedded=True, allow_mixed=True)  # told: no refusal
    store_finished(done, stored_result(device="cpu", pack_size=1, threads=1))
    check_device_provenance(plan, sweep_dir, embedded=True, allow_mixed=False)  # same device: fine


def test_resuming_over_results_of_an_earlier_trainer_is_refused_unless_allow_mixed(tmp_path, monkeypatch):
    """Results without provenance fields were trained before the majority-class rule and per-filter
    Adam steps: under the same keys their numbers mean something else."""
    from orchestrator import layout
    from orchestrator.run.preflight import check_device_provenance

    monkeypatch.setenv("LOTTERY_HOME", str(tmp_path / "home"))
    sweep_dir = tmp_path / "home" / "unit"
    path = write_spec(tmp_path / "same.yaml", spec_doc())
    plan = load_plan(path)  # the file's order (YAML sorts the grid keys)
    record_plan(plan, sweep_dir)
    done = layout.trial_dir(sweep_dir, plan.trials[0].trial_key())
    store_finished(done, stored_result())  # no device: an earlier trainer
    result = CliRunner().invoke(app, ["sweep", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "earlier filter-lottery" in lines[0] and "--allow-mixed" in lines[0]
    check_device_provenance(plan, sweep_dir, embedded=True, allow_mixed=True)
