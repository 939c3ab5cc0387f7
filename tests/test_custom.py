"""The user's own network and data (`name: custom`): identity, resolution and every bad input refused
before anything starts, in one line naming the field (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from trialfactory import store_finished, stored_result
from typer.testing import CliRunner, Result

from orchestrator import layout
from orchestrator.cli import app
from orchestrator.spec import load_plan
from trainers.config import TrialConfig
from trainers.custom import file_path, resolve
from trainers.data import load_data
from trainers.filters import conv_layers, filter_groups
from trainers.models import build_model, derive_seeds
from trainers.pack import auto_pack_size

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom"


def lottery(args: list[str], home: Path) -> Result:
    env = {"RAY_ADDRESS": None, "MLFLOW_TRACKING_URI": None, "LOTTERY_HOME": str(home)}
    return CliRunner().invoke(app, args, env=env)


def one_error_line(result: Result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0].removeprefix("error: ")


def example_copy(folder: Path, *, schemes: list[dict] | None = None, **base: object) -> Path:
    """The example's net, loader and spec in `folder` (a small train split), `base` fields replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("net.py", "data.py"):
        shutil.copy(EXAMPLE / name, folder / name)
    doc = yaml.safe_load((EXAMPLE / "spec.yaml").read_text())
    doc["base"]["data"]["kwargs"] = {"train": 300}
    doc["base"]["epochs"] = 1
    doc["base"].update(base)
    if schemes is not None:
        doc["schemes"] = schemes
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    return spec


def custom_trial(**model: object) -> TrialConfig:
    return TrialConfig.model_validate(
        {
            "model": {"name": "custom", "builder": "net.py:build", "base_dir": str(EXAMPLE)} | model,
            "data": {"name": "custom", "loader": "data.py:load", "base_dir": str(EXAMPLE)},
        }
    )


# --- identity ---------------------------------------------------------------------------------------


def test_the_key_holds_builder_and_kwargs_but_not_where_the_files_are() -> None:
    trial = custom_trial()
    moved = custom_trial(base_dir="/elsewhere")
    assert trial.trial_key() == moved.trial_key()  # moving the spec's folder keeps every key
    assert trial.trial_key() != custom_trial(kwargs={"width": 4}).trial_key()
    assert trial.trial_key() != custom_trial(builder="other.py:build").trial_key()
    identity = trial.identity()
    assert identity["model"] == {"name": "custom", "builder": "net.py:build"}
    assert identity["data"] == {"name": "custom", "loader": "data.py:load"}


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"name": "custom"}, "builder: model 'custom' needs a builder"),
        ({"name": "crater_cnn", "builder": "net.py:build"}, "builder: only model 'custom' takes a builder"),
        ({"name": "crater_cnn", "kwargs": {"a": 1}}, "kwargs: only model 'custom' takes kwargs"),
        ({"name": "custom", "builder": "net.py"}, "builder: 'net.py' is not"),
    ],
)
def test_custom_and_its_builder_come_together(model: dict, message: str) -> None:
    field, text = message.split(": ", 1)
    with pytest.raises(ValidationError) as caught:
        TrialConfig.model_validate({"model": model})
    (error,) = caught.value.errors()
    assert error["loc"] == ("model", field) and text in error["msg"]


def test_a_relative_file_resolves_against_the_spec_folder(tmp_path: Path, monkeypatch) -> None:
    spec = example_copy(tmp_path / "study")
    monkeypatch.chdir(ROOT)  # not the spec's folder
    trial = load_plan(spec).trials[0]
    assert file_path(trial.model.builder or "", trial.model.base_dir) == tmp_path / "study" / "net.py"
    target = resolve(trial.model.builder or "", trial.model.base_dir, "model.builder")
    assert target.source == tmp_path / "study" / "net.py"


def test_a_custom_net_is_a_pure_function_of_its_seed_and_keeps_the_global_rng() -> None:
    trial = custom_trial(init="kaiming")
    data = load_data(trial.data, 0, torch.device("cpu"))

    def build(seed: int) -> torch.nn.Module:
        return build_model(
            trial.model,
            in_channels=data.in_channels,
            image_size=data.image_size,
            num_classes=data.num_classes,
            batchnorm=False,
            generator=torch.Generator().manual_seed(derive_seeds(seed)[0]),
        )

    state = torch.random.get_rng_state()
    first, again, other = build(0), build(0), build(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(first.state_dict()["stem.0.weight"], other.state_dict()["stem.0.weight"])
    assert list(conv_layers(first)) == ["stem.0", "blocks.0.dw", "blocks.0.pw", "blocks.1.dw", "blocks.1.pw"]


def test_custom_data_fingerprint_is_the_tensors_and_the_loader(tmp_path: Path) -> None:
    spec = example_copy(tmp_path)
    trial = load_plan(spec).trials[0]
    data = load_data(trial.data, 0, torch.device("cpu"))
    record = data.files["loader"]
    assert record["target"] == "data.py:load" and record["kwargs"] == {"train": 300}
    assert len(record["sha256"]) == 64 and len(record["source_sha256"]) == 64
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 8)
    assert len(data.y_train) == 300
    fingerprint = data.fingerprint
    other = trial.data.model_copy(update={"kwargs": {"train": 301}})
    assert load_data(other, 0, torch.device("cpu")).fingerprint != fingerprint  # other tensors
    (tmp_path / "data.py").write_text((tmp_path / "data.py").read_text() + "\n# edited\n")
    assert load_data(trial.data, 0, torch.device("cpu")).fingerprint != fingerprint  # edited loader


# --- bad input, before anything starts ------------------------------------------------------------------

NET_HEAD = "import torch\nfrom torch import nn\n\n"
BAD_BUILDERS = {
    "not importable": (
        "import no_such_module_here\n",
        "base.model.builder: importing",
        "ModuleNotFoundError: No module named 'no_such_module_here'",
    ),
    "not callable": ("build = 3\n", "base.model.builder: net.py:build is a int, not a callable", ""),
    "not a module": (
        "def build(**kw):\n    return 'net'\n",
        "base.model.builder: net.py:build returned a str, not a torch.nn.Module",
        "",
    ),
    "wrong output": (
        "def build(*, in_channels, num_classes, image_size, **kw):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))\n",
        "base.model.builder: the net maps 2 x 1 x 8 x 8 images to (2, 3), not N x K logits (2, 10)",
        "",
    ),
    "no conv for a filter scheme": (
        "def build(*, in_channels, num_classes, image_size, **kw):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))\n",
        "base.model.builder: net.py:build has no nn.Conv2d",
        "",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BUILDERS))
def test_a_bad_builder_is_one_line_before_anything_starts(tmp_path: Path, case: str) -> None:
    source, start, detail = BAD_BUILDERS[case]
    spec = example_copy(tmp_path / "study")  # baseline and randomout: a filter scheme
    (tmp_path / "study" / "net.py").write_text(NET_HEAD + source)
    line = one_error_line(lottery(["sweep", "--dry-run", "--no-estimate", str(spec)], tmp_path / "home"))
    assert line.startswith(start), line
    assert detail in line
    assert not (tmp_path / "home").exists()  # nothing written


def test_a_net_without_convs_trains_under_baseline_and_refuses_a_filter_scheme(tmp_path: Path) -> None:
    """Baseline needs no filters: an MLP trains, with an empty per-layer record; a filter scheme on the
    same net is one line naming the field before anything starts."""
    source = BAD_BUILDERS["no conv for a filter scheme"][0]
    for schemes in ([{"name": "baseline"}], [{"name": "baseline"}, {"name": "randomout"}]):
        spec = example_copy(tmp_path / "study", schemes=schemes)
        (tmp_path / "study" / "net.py").write_text(NET_HEAD + source)
        result = lottery(["sweep", "--dry-run", "--no-estimate", str(spec)], tmp_path / "home")
        if len(schemes) == 1:
            assert result.exit_code == 0, result.output
    line = one_error_line(result)
    assert line == (
        "base.model.builder: net.py:build has no nn.Conv2d, so scheme randomout has no filters to work on; "
        "add a conv layer, or run only baseline"
    )
    (tmp_path / "mlp.py").write_text(NET_HEAD + source)
    args = [
        "train",
        "--model=custom",
        f"--set=model.builder={tmp_path / 'mlp.py'}:build",
        "--dataset=custom",
        f"--set=data.loader={EXAMPLE / 'data.py'}:load",
        "--set=data.kwargs.train=300",
        "--epochs=2",
        f"--out={tmp_path / 'out'}",
    ]
    trained = lottery(args, tmp_path / "home")
    assert trained.exit_code == 0, trained.output  # logged to MLflow too: no CGN figure to draw
    assert "not drawn" not in trained.output
    (trial_dir,) = layout.trials_root(layout.train_dir(tmp_path / "out")).iterdir()
    result = json.loads((trial_dir / "result.json").read_text())
    assert result["epochs_done"] == 2 and result["final_test_acc"] > 0.3  # ten digits: chance is 0.1
    assert result["parameters"] == 64 * 10 + 10 and result["total_resets"] == 0


# --- seed packs of a custom net -----------------------------------------------------------------------

BRANCHING_NET = (
    "class Net(nn.Module):\n"
    "    def __init__(self, in_channels, num_classes):\n"
    "        super().__init__()\n"
    "        self.conv = nn.Conv2d(in_channels, 2, 3, padding=1)\n"
    "        self.fc = nn.Linear(2 * 64, num_classes)\n"
    "    def forward(self, x):\n"
    "        out = self.conv(x).flatten(1)\n"
    "        return self.fc(out if out.sum() > 0 else -out)  # data-dependent: vmap cannot batch it\n"
    "def build(*, in_channels, num_classes, image_size, **kw):\n"
    "    return Net(in_channels, num_classes)\n"
)


def test_auto_packs_a_custom_net_that_vmap_batches_by_the_measured_rule(tmp_path: Path) -> None:
    spec = example_copy(tmp_path / "study", schemes=[{"name": "baseline"}, {"name": "batchnorm"}])
    plan = load_plan(spec)  # 4 seeds a scheme, batch 32, on a CPU; ~900 parameters
    assert [len(u) for u in plan.units] == [4, 1, 1, 1, 1]  # batchnorm: BN running statistics, alone
    assert [len(u) for u in load_plan(spec, ["seeds.count=12"]).units][:2] == [8, 4]  # packs of 8
    assert {len(u) for u in load_plan(spec, ["base.batch_size=64"]).units} == {1}  # larger steps: alone
    assert [len(u) for u in load_plan(spec, ["pack_size=3"]).units][:3] == [3, 1, 1]  # explicit size
    assert {len(u) for u in load_plan(spec, ["base.model.kwargs.width=300"]).units} == {1}  # 559k params


def test_auto_pack_size_of_a_custom_net() -> None:
    assert auto_pack_size("custom", 0, False, images_per_step=32, device="cpu", parameters=906) == 8
    assert auto_pack_size("custom", 0, False, images_per_step=32, device="cpu", parameters=None) == 1
    assert auto_pack_size("custom", 0, False, images_per_step=32, device="cpu", parameters=500_000) == 1
    assert auto_pack_size("custom", 0, False, images_per_step=None, device="cpu", parameters=906) == 1
    assert auto_pack_size("custom", 0, False, images_per_step=256, device="cuda", parameters=906) == 8
    assert auto_pack_size("custom", 0, True, images_per_step=32, device="cuda", parameters=906) == 1


def test_the_dry_run_says_in_one_line_which_custom_net_trains_one_seed_per_trial(tmp_path: Path) -> None:
    spec = example_copy(tmp_path / "study", schemes=[{"name": "baseline"}, {"name": "batchnorm"}])
    args = ["sweep", "--dry-run", "--no-estimate", "--set=pack_size=8", str(spec)]
    result = lottery(args, tmp_path / "home")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1] == "5 Tune trials: seed packs of 1, 4 (pack_size 8; see trainers/pack.py)"
    assert lines[2] == (
        "pack_size 8: net.py:build under batchnorm: BatchNorm (stem.0.bn) updates running statistics in "
        "train mode, which vmap cannot batch per seed; this net trains one seed per trial"
    )

    (tmp_path / "study" / "net.py").write_text(NET_HEAD + BRANCHING_NET)
    assert {len(u) for u in load_plan(spec, ["pack_size=8"]).units} == {1}
    result = lottery(args, tmp_path / "home")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1] == "8 Tune trials, one seed each (pack_size 8)"
    assert lines[2].startswith("pack_size 8: net.py:build under baseline: vmap cannot batch this net (")
    assert "data-dependent control flow" in lines[2] and lines[2].endswith("; it trains one seed per trial")
    assert lines[3].startswith("pack_size 8: net.py:build under batchnorm: BatchNorm (conv.bn) updates")


def test_the_batchnorm_scheme_puts_batchnorm_after_every_conv_of_a_custom_net(tmp_path: Path) -> None:
    spec = example_copy(tmp_path / "study", schemes=[{"name": "batchnorm"}])
    result = lottery(["sweep", "--dry-run", "--no-estimate", str(spec)], tmp_path / "home")
    assert result.exit_code == 0, result.output
    trial = load_plan(spec).trials[0]
    data = load_data(trial.data, 0, torch.device("cpu"))
    model = build_model(
        trial.model,
        in_channels=data.in_channels,
        image_size=data.image_size,
        num_classes=data.num_classes,
        batchnorm=trial.uses_batchnorm,
        generator=torch.Generator().manual_seed(0),
    )
    groups = filter_groups(model)
    assert [g.name for g in groups] == ["stem.0", "blocks.0.dw", "blocks.0.pw", "blocks.1.dw", "blocks.1.pw"]
    assert all(g.bn is not None and g.bn.num_features == g.filters for g in groups)


def test_the_batchnorm_scheme_refuses_a_custom_net_that_has_batchnorm(tmp_path: Path) -> None:
    spec = example_copy(tmp_path / "study", schemes=[{"name": "batchnorm"}])
    net = tmp_path / "study" / "net.py"
    net.write_text(
        net.read_text().replace(
            "nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()",
            "nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width)",
        )
    )
    line = one_error_line(lottery(["sweep", "--dry-run", "--no-estimate", str(spec)], tmp_path / "home"))
    assert "batchnorm: the net already has BatchNorm (stem.1)" in line


LOADER_HEAD = (
    "import torch\n\ndef load(**kw):\n    x = torch.rand(20, 1, 8, 8)\n    y = torch.arange(20) % 4\n"
)
BAD_LOADERS = {
    "not importable": (
        "    return x, y, x, y\n\nimport no_such_loader_dep\n",
        "ModuleNotFoundError: No module named 'no_such_loader_dep'",
    ),
    "not a tuple": ("    return x\n", "data.loader: data.py:load returned a Tensor; return the tuple"),
    "not tensors": (
        "    return x.numpy(), y, x, y\n",
        "data.loader: train_x is a ndarray; return torch tensors",
    ),
    "wrong shape": (
        "    return x[:, 0], y, x, y\n",
        "data.loader: train_x has shape (20, 8, 8); images are N x C",
    ),
    "int labels of the wrong type": (
        "    return x, y.int(), x, y\n",
        "data.loader: train_y is torch.int32 of shape (20,); labels are a 1-D int64",
    ),
    "nan": (
        "    x[3, 0, 1, 1] = float('nan')\n    return x, y, x, y\n",
        "data.loader: train_x holds NaN or inf",
    ),
    "empty split": ("    return x, y, x[:0], y[:0]\n", "data.loader: test_x is empty"),
    "labels outside": ("    return x, y, x, y + 2\n", "data.loader: label 5 is outside 0..3"),
    "negative labels": ("    return x, y - 1, x, y\n", "data.loader: label -1 is outside 0..2"),
    "shapes differ": (
        "    return x, y, torch.rand(20, 1, 9, 9), y\n",
        "data.loader: train images are (1, 8, 8) but test images (1, 9, 9)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_LOADERS))
def test_a_bad_loader_is_one_line_before_anything_starts(tmp_path: Path, case: str) -> None:
    body, expected = BAD_LOADERS[case]
    spec = example_copy(tmp_path / "study")
    (tmp_path / "study" / "data.py").write_text(LOADER_HEAD + body)
    line = one_error_line(lottery(["sweep", "--dry-run", "--no-estimate", str(spec)], tmp_path / "home"))
    assert line.startswith("base.data.loader: "), line
    assert expected in line, line


def test_a_package_builder_that_cannot_import_says_why(tmp_path: Path) -> None:
    spec = example_copy(tmp_path / "study")
    doc = yaml.safe_load(spec.read_text())
    doc["base"]["model"]["builder"] = "no_such_package.nets:build"
    spec.write_text(yaml.safe_dump(doc))
    line = one_error_line(lottery(["sweep", "--dry-run", "--no-estimate", str(spec)], tmp_path / "home"))
    assert line == (
        "base.model.builder: cannot import no_such_package.nets: "
        "ModuleNotFoundError: No module named 'no_such_package'"
    )


def test_a_package_builder_imports_from_the_spec_folder(tmp_path: Path) -> None:
    spec = example_copy(tmp_path / "study", schemes=[{"name": "baseline"}])
    package = tmp_path / "study" / "mynets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(EXAMPLE / "net.py", package / "small.py")
    doc = yaml.safe_load(spec.read_text())
    doc["base"]["model"]["builder"] = "mynets.small:build"
    spec.write_text(yaml.safe_dump(doc))
    result = lottery(["sweep", "--dry-run", "--no-estimate", str(spec)], tmp_path / "home")
    assert result.exit_code == 0, result.output


# --- an edited builder is other code, as changed data is other data ------------------------------------


def test_an_edited_builder_refuses_its_stored_results(tmp_path: Path) -> None:
    home = tmp_path / "home"
    spec = example_copy(tmp_path / "study", schemes=[{"name": "baseline"}])
    trial = load_plan(spec).trials[0]
    sha = resolve("net.py:build", tmp_path / "study", "model.builder").sha256
    trial_dir = layout.trial_dir(home / "custom-example", trial.trial_key())
    fingerprint = load_data(trial.data, 0, torch.device("cpu")).fingerprint
    stored = stored_result(
        device="cpu", builder="net.py:build", builder_sha256=sha, data_fingerprint=fingerprint
    )
    store_finished(trial_dir, stored)
    args = ["sweep", "--dry-run", "--no-estimate", str(spec)]
    result = lottery(args, home)
    assert result.exit_code == 0, result.output  # the same file: resumes

    net = tmp_path / "study" / "net.py"
    net.write_text(net.read_text().replace("width: int = 8", "width: int = 6"))
    line = one_error_line(lottery(args, home))
    assert line.startswith(f"base.model.builder: the stored result of trial {trial.trial_key()} was trained")
    assert f"source sha256 {sha[:12]}" in line and "--retrain-changed" in line
    result = lottery([*args, "--retrain-changed"], home)
    assert result.exit_code == 0, result.output
    assert "1 stored result(s) trained on other data would be set aside" in result.stdout


# --- what a cluster's workers are sent --------------------------------------------------------------


def test_the_runtime_env_ships_file_targets_and_the_user_s_packages_only(tmp_path: Path) -> None:
    from orchestrator.run.user_code import code_runtime_env
    from trainers.custom import SHIPPED_ENV

    spec = example_copy(tmp_path / "study")
    env = code_runtime_env(load_plan(spec))
    study = tmp_path / "study"
    assert env is not None
    assert env["py_modules"] == sorted([str(study / "data.py"), str(study / "net.py")])
    assert json.loads(env["env_vars"][SHIPPED_ENV]) == {
        str(study / "net.py"): "net",
        str(study / "data.py"): "data",
    }

    package = study / "shipnets"  # a name no other test imports
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(EXAMPLE / "net.py", package / "small.py")
    doc = yaml.safe_load(spec.read_text())
    doc["base"]["model"]["builder"] = "shipnets.small:build"
    spec.write_text(yaml.safe_dump(doc))
    env = code_runtime_env(load_plan(spec))
    assert env is not None and env["py_modules"] == sorted([str(package), str(study / "data.py")])

    doc["base"]["model"]["builder"] = "torch.nn:Conv2d"  # installed: every worker has it already
    doc["base"]["data"] = {"name": "digits"}
    spec.write_text(yaml.safe_dump(doc))
    assert code_runtime_env(load_plan(spec)) is None
    builtin = example_copy(tmp_path / "builtin", model={"name": "crater_cnn"}, data={"name": "digits"})
    assert code_runtime_env(load_plan(builtin)) is None


def test_two_shipped_files_of_one_name_are_refused(tmp_path: Path) -> None:
    from orchestrator.errors import UserError
    from orchestrator.run.user_code import code_runtime_env

    spec = example_copy(tmp_path / "study")
    (tmp_path / "study" / "other").mkdir()
    shutil.copy(EXAMPLE / "data.py", tmp_path / "study" / "other" / "net.py")
    doc = yaml.safe_load(spec.read_text())
    doc["base"]["data"]["loader"] = "other/net.py:load"
    spec.write_text(yaml.safe_dump(doc))
    with pytest.raises(
        UserError, match=r"^base\.data\.loader: .* share the module name 'net' on the workers"
    ):
        code_runtime_env(load_plan(spec))


def test_submit_refuses_a_file_target_outside_the_uploaded_checkout(tmp_path: Path) -> None:
    from orchestrator.errors import UserError
    from orchestrator.run.user_code import check_uploaded

    plan = load_plan(example_copy(tmp_path / "study"))
    with pytest.raises(UserError, match=r"^base\.model\.builder: .*net\.py is outside .*put the file in it"):
        check_uploaded(plan, ROOT)
    check_uploaded(plan, tmp_path)  # inside: uploaded with the checkout


def test_lottery_train_makes_the_same_checks(tmp_path: Path) -> None:
    (tmp_path / "lin.py").write_text(NET_HEAD + BAD_BUILDERS["no conv for a filter scheme"][0])
    builder = f"--set=model.builder={tmp_path / 'lin.py'}:build"
    args = ["train", "--model=custom", "--scheme=randomout", builder]
    line = one_error_line(lottery([*args, f"--out={tmp_path / 'out'}", "--no-mlflow"], tmp_path / "home"))
    assert line.startswith(f"base.model.builder: {tmp_path / 'lin.py'}:build has no nn.Conv2d")
    assert not (tmp_path / "out").exists()  # nothing written
