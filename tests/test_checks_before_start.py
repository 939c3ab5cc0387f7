"""What a sweep checks before anything starts, beyond the corpus in malformed_specs/: the model against its
data's shape (also where the data is the workers'), the trial cap counted before the plan is built, the
dry run's table of a large plan, keys given twice in YAML, a directory given as a spec, and
`lottery sweep --set` (a spec tried with other resources without editing it)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
import yaml
from specfactory import spec_doc
from test_malformed_specs import CORPUS, assert_one_error_line, expected_error, run_cli

from orchestrator.errors import UserError
from orchestrator.run.preflight_model import DataShape, check_models, known_shapes
from orchestrator.spec import MAX_TRIALS, load_plan, load_yaml
from trainers.config import DataConfig
from trainers.data import NATIVE_SHAPES, load_data

BASE = {
    "data": {"name": "digits"},
    "model": {"name": "crater_cnn", "filters": 2, "hidden_fc": 0},
    "epochs": 1,
    "device": "cpu",
}


def write_spec(path: Path, **changes: Any) -> Path:
    doc = spec_doc("checks", **({"base": BASE} | changes))
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_dry_run_without_the_estimate_makes_every_check(path: Path, tmp_path: Path) -> None:
    """`--no-estimate` skips the timed probe only: a model that cannot take its data passed it (exit 0)."""
    home = tmp_path / "home"
    result = run_cli(["sweep", "--dry-run", "--no-estimate", str(path)], home)

    assert_one_error_line(result, expected_error(path))
    assert not home.exists()
    assert not ray.is_initialized()


def test_the_model_check_uses_the_known_shape_where_the_data_is_the_workers(tmp_path: Path) -> None:
    """On a cluster the driver loads no data; the dataset's native shape, resized, stands in for it."""
    small = write_spec(tmp_path / "s.yaml", base=BASE | {"data": {"name": "digits", "image_size": 4}})
    plan = load_plan(small)
    fine = load_plan(write_spec(tmp_path / "f.yaml"))

    with pytest.raises(UserError, match=r"^base\.model\.padding: crater_cnn with padding 0 .* 4x4 input"):
        check_models(load_plan(small, ["base.model.padding=0"]), known_shapes(plan))
    check_models(fine, known_shapes(fine))  # padding 1 on 8x8 digits fits: no error


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_known_shapes_are_the_loaded_ones(name: str) -> None:
    data = load_data(DataConfig(name=name), 0, torch.device("cpu"))
    assert DataShape.of(data) == DataShape(*NATIVE_SHAPES[name])
    resized = DataConfig(name=name, image_size=6)
    assert DataShape.known(resized) == DataShape.of(load_data(resized, 0, torch.device("cpu")))


def test_a_million_trial_grid_is_refused_before_it_is_built(tmp_path: Path) -> None:
    """Counted from the grid sizes: refused in well under a second (it took 133 s and 2.5 GB to expand)."""
    values = {"tau": list(range(1, 1021)), "active_fraction": [i / 1000 for i in range(1, 1001)]}
    spec = write_spec(tmp_path / "big.yaml", seeds=[0], schemes=[{"name": "randomout", "grid": values}])

    started = time.perf_counter()
    with pytest.raises(UserError) as refused:
        load_plan(spec)
    elapsed = time.perf_counter() - started

    assert str(refused.value).startswith("max_trials: this spec plans 1,020,000 trials")
    assert "set max_trials: 1020000 in the spec" in str(refused.value)
    assert elapsed < 10, f"{elapsed:.1f} s"  # generous for a shared CI core


def test_max_trials_is_the_override(tmp_path: Path) -> None:
    grid = {"grid": {"model.filters": list(range(1, 7))}}
    spec = write_spec(tmp_path / "s.yaml", seeds={"start": 0, "count": 2000}, **grid)  # 12,000 trials

    with pytest.raises(UserError, match=f"more than max_trials {MAX_TRIALS:,}"):
        load_plan(spec)
    assert len(load_plan(spec, ["max_trials=12000"]).trials) == 12_000


def test_the_dry_run_table_of_a_large_plan_fits_a_screen(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml", grid={"model.filters": list(range(1, 61))})  # 60 configurations

    result = run_cli(["sweep", "--dry-run", "--no-estimate", str(spec)], tmp_path / "home")

    assert result.exit_code == 0, result.output
    assert "40 more configurations" in result.stdout
    assert "model.filters=20" in result.stdout and "model.filters=21" not in result.stdout
    assert len(result.stdout.splitlines()) < 45, result.stdout


def test_a_key_given_twice_is_named_with_both_lines_at_any_depth(tmp_path: Path) -> None:
    path = tmp_path / "trial.yaml"
    path.write_text("model:\n  name: crater_cnn\n  filters: 4\n  padding: 1\n  filters: 8\n")
    with pytest.raises(UserError, match=r"^filters: set twice, on lines 3 and 5"):
        load_yaml(path)


def test_a_merge_key_may_repeat_what_it_merges(tmp_path: Path) -> None:
    """`<<: *anchor` then an override is YAML's own way to reuse a block: not a key given twice."""
    path = tmp_path / "spec.yaml"
    path.write_text("small: &small {filters: 2, padding: 1}\nmodel:\n  <<: *small\n  filters: 4\n")
    assert load_yaml(path)["model"] == {"filters": 4, "padding": 1}


@pytest.mark.parametrize("command", [["sweep"], ["train", "--no-mlflow", "--config"]])
def test_a_directory_as_the_spec_says_so(command: list[str], tmp_path: Path) -> None:
    result = run_cli([*command, str(tmp_path)], tmp_path / "home")

    assert_one_error_line(result, f"config: {tmp_path} is a directory; give the YAML file itself")


def test_sweep_set_tries_a_spec_with_other_resources_without_editing_it(tmp_path: Path) -> None:
    """A spec written for a GPU machine, tried here: `--set` overrides its fields as in `lottery train`."""
    spec = write_spec(tmp_path / "gpu.yaml", base=BASE | {"device": "cuda"}, resources={"gpu": 1024})
    home = tmp_path / "home"

    refused = run_cli(["sweep", "--dry-run", "--no-estimate", str(spec)], home)
    assert_one_error_line(refused)  # without CUDA here, base.device; with it, the 1024 GPUs
    assert refused.stderr.startswith(("error: base.device: 'cuda'", "error: resources.gpu: each trial asks"))

    here = ["--set", "resources.gpu=0", "--set", "base.device=cpu"]
    tried = run_cli(["sweep", "--dry-run", "--no-estimate", *here, str(spec)], home)
    assert tried.exit_code == 0, tried.output
    assert "2 trials in sweep 'checks'" in tried.stdout

    misspelt = run_cli(["sweep", "--dry-run", "--no-estimate", "--set", "base.devise=cpu", str(spec)], home)
    assert_one_error_line(misspelt, "base.devise: unknown field; did you mean 'device'?")
    assert not home.exists()
