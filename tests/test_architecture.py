"""The code's boundaries: which package may import what, no import circles, one owner for the sweep
directory's names, and every list of schemes, models and statuses derived from its owner (a missing entry
fails here). Checked on the source and in fresh interpreters, so a stray import fails here."""

from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path
from typing import get_args

import pandas as pd
import pytest
from typer.main import get_command

from dashboards.report import _header_html, _summary_html
from dashboards.stats import STATUSES, TRIAL_COLUMNS, summarise
from orchestrator import aggregate, layout
from orchestrator.cli import app
from orchestrator.run.trainable import RESULT_KEYS
from orchestrator.spec_reference import reference
from trainers.config import DATASET_NAMES, MODEL_NAMES, TrialConfig
from trainers.data import _LOADERS
from trainers.events import (
    EPOCH_COLUMNS,
    TABLE,
    TUNE,
    EpochRecord,
    LayerEpochStats,
    TrialResult,
    result_fields,
)
from trainers.models import MODELS
from trainers.schemes import REGISTRY, SCHEMES

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = ROOT / "orchestrator" / "layout.py"
PACKAGES = ("orchestrator", "dashboards", "trainers")
NAMES = {value for key, value in vars(layout).items() if key.isupper() and isinstance(value, str)}
FILE_NAMES = {name for name in NAMES if "." in name}  # spec.json, result.json, .fault_injected ...
FOLDER_NAMES = NAMES - FILE_NAMES  # trials, tune, packs ...: path components, also common words
PATH_CALLS = {"Path", "joinpath", "glob", "rglob", "with_name"}

IMPORTS = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    for name in sys.argv[1:]:
        module = importlib.import_module(name)
        for found in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):
            if not found.name.endswith(".__main__"):
                importlib.import_module(found.name)
    print(json.dumps(sorted(sys.modules)))
    """
)


def imported_by(*modules: str) -> set[str]:
    """Every module a fresh interpreter holds after importing `modules` and all their submodules."""
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS, *modules], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


def top_level(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("trainers", {"ray", "mlflow", "orchestrator"}),  # PyTorch only
        ("dashboards", {"orchestrator", "ray", "mlflow"}),  # figures from the aggregated tables only
    ],
)
def test_a_package_imports_nothing_outside_its_boundary(package: str, forbidden: set[str]) -> None:
    assert top_level(imported_by(package)) & forbidden == set()


def test_tracking_and_sync_import_no_part_of_the_sweep_driver() -> None:
    loaded = imported_by("orchestrator.tracking")
    assert "orchestrator.tracking.sync" in loaded
    assert {name for name in loaded if name.startswith("orchestrator.run")} == set()


def test_layout_is_light_enough_for_every_module_to_import() -> None:
    assert top_level(imported_by("orchestrator.layout")) & {"torch", "ray", "mlflow", "trainers"} == set()


def test_the_cli_and_a_spec_mistake_load_no_torch(tmp_path: Path) -> None:
    """torch costs seconds per process: `lottery --help` and a one-line spec error must not wait for it."""
    assert "torch" not in top_level(imported_by("orchestrator.cli"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nseeds: [0]\nbase: {epoch: 3}\nschemes: [{name: baseline}]\n")
    probe = (
        "import sys\nfrom orchestrator.errors import UserError\nfrom orchestrator.spec import load_plan\n"
        "from pydantic import ValidationError\n"
        "from pathlib import Path\n"
        f"try:\n    load_plan(Path({str(bad)!r}))\nexcept (UserError, ValidationError):\n    pass\n"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def spelled_names(source: str) -> list[tuple[int, str]]:
    """(line, name) of every sweep-directory name the source spells out: a file name in any string
    (docstrings aside), a folder name where it builds a path (`x / "trials"`, `Path("tune")`)."""
    tree = ast.parse(source)
    docstrings = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    in_path: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            in_path |= {id(node.left), id(node.right)}
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name in PATH_CALLS:
                in_path |= {id(arg) for arg in node.args}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in docstrings:
            continue
        found += [(node.lineno, name) for name in FILE_NAMES if name in node.value]
        if node.value in FOLDER_NAMES and id(node) in in_path:
            found.append((node.lineno, node.value))
    return sorted(found)


def test_the_check_sees_names_spelled_outside_layout() -> None:
    source = 'd = root / "trials" / key\nok = (d / "result.json").exists()\nlabel = "trials"\n'
    assert spelled_names(source) == [(1, "trials"), (2, "result.json")]


def test_the_sweep_directorys_names_are_spelled_only_in_layout() -> None:
    assert {"spec.json", "trials.json", "sweep.json", "trials", "tune", "packs", "result.json"} <= NAMES
    assert len(NAMES) == len([v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str)])
    sources = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    assert LAYOUT in sources
    spelled = {
        f"{path.relative_to(ROOT)}:{line}": name
        for path in sources
        if path != LAYOUT
        for line, name in spelled_names(path.read_text())
    }
    assert spelled == {}, "use orchestrator.layout's names and path functions"


LONG_MODULE = 450  # lines; a longer module says in its docstring why it is one file
LONG_REASON = "Longer than the ~450 lines a module usually gets, on purpose:"


def test_a_module_longer_than_450_lines_says_why() -> None:
    sources = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    long = {path: path.read_text() for path in sources if len(path.read_text().splitlines()) > LONG_MODULE}
    assert ROOT / "orchestrator" / "layout.py" in long  # the check sees the long modules
    silent = [
        str(path.relative_to(ROOT))
        for path, source in long.items()
        if LONG_REASON not in " ".join((ast.get_docstring(ast.parse(source)) or "").split())
    ]
    assert silent == [], f"split the module, or begin a paragraph of its docstring with {LONG_REASON!r}"


def test_scheme_names_have_one_source() -> None:
    configs = get_args(TrialConfig.model_fields["scheme"].annotation)
    assert tuple(REGISTRY) == SCHEMES
    assert [c.model_fields["name"].default for c in configs] == list(SCHEMES)


def module_sources() -> dict[str, str]:
    """Dotted module name -> source, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path.read_text()
    return found


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """module -> the project modules it imports, counting every import statement wherever it stands:
    at module level, inside a function, under `if TYPE_CHECKING:` (an import moved into a function
    still ties the two modules together; it only hides the circle from the interpreter)."""

    def owner(name: str) -> str | None:  # a module, or the module an imported name belongs to
        while name and name not in sources:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, source in sources.items():
        is_package = any(name.startswith(f"{module}.") for name in sources)
        package = module if is_package else module.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                targets |= {owner(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package upwards
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets |= {owner(f"{base}.{alias.name}") or owner(base) for alias in node.names}
        graph[module] = {target for target in targets if target and target != module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: each strongly connected group of two or more modules, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = [stack.pop()]
            while group[-1] != module:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(found)


def test_the_check_sees_circles_hidden_in_functions_and_type_checking() -> None:
    sources = {
        "p": "",
        "p.a": "def f():\n    from p.b import g\n",
        "p.b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p import a\n",
        "p.c": "import p.d\n",
        "p.d": "from p.c import x\n",
        "p.e": "from p.a import f\n",  # into a circle, not part of one
        "p.q": "",
        "p.q.r": "from .. import e\nfrom . import s\n",
        "p.q.s": "def h():\n    from .r import t\n",
    }
    assert circles(import_graph(sources)) == [["p.a", "p.b"], ["p.c", "p.d"], ["p.q.r", "p.q.s"]]


def test_no_module_imports_itself_back_through_others() -> None:
    sources = module_sources()
    graph = import_graph(sources)
    assert {"orchestrator.layout", "orchestrator.run.sweep", "trainers.schemes"} <= set(graph)
    assert "orchestrator.spec" in graph["orchestrator.run.sweep"]  # the graph sees the imports
    assert circles(graph) == [], "a circle: move what both sides need into a module both can import"


@pytest.mark.parametrize("module", ["orchestrator.provenance", "orchestrator.tracking.record"])
def test_reading_sweep_json_loads_no_ray_and_no_mlflow(module: str) -> None:
    """The report's provenance and the logging process read sweep.json; neither needs Ray or MLflow."""
    loaded = imported_by(module)
    assert module in loaded
    assert top_level(loaded) & {"ray", "mlflow"} == set()


def test_every_scheme_has_its_parameters_in_the_docs_reference() -> None:
    """The generated field reference (docs/spec-reference.md holds it; tests/test_spec_reference.py keeps
    the two equal) has a section per registered scheme, listing each of its parameters."""
    configs = {
        c.model_fields["name"].default: c for c in get_args(TrialConfig.model_fields["scheme"].annotation)
    }
    sections = dict(re.findall(r"#### Scheme `(\w+)` [^\n]*\n(.*?)(?=\n#### |\Z)", reference(), re.S))
    assert list(sections) == list(REGISTRY) == list(configs)
    for scheme, section in sections.items():
        params = set(configs[scheme].model_fields) - {"name"}
        assert {name for name in params if f"| `schemes[].params.{name}` |" not in section} == set(), scheme
        assert params or "No hyperparameters." in section


def test_lottery_train_offers_every_model_and_dataset() -> None:
    assert tuple(MODELS) == MODEL_NAMES  # the builders, and the names specs are validated against
    assert tuple(_LOADERS) == DATASET_NAMES
    options = {param.name: param.help or "" for param in get_command(app).commands["train"].params}
    assert [name for name in MODELS if name not in options["model"].split(" | ")] == []
    assert [name for name in _LOADERS if name not in options["dataset"].split(" | ")] == []


def test_every_status_is_counted_in_the_report() -> None:
    """One trial of each status: the report's header and its table count every one of them."""
    assert set(get_args(layout.Status)) - {"unfinished"} <= set(STATUSES)  # unfinished: incomplete or pending
    assert set(get_args(layout.Status)) <= set(layout.count_trials(ROOT / "no-such-sweep", []))
    rows = []
    for seed, status in enumerate(STATUSES):
        row = {column: math.nan if kind == "float64" else pd.NA for column, kind in TRIAL_COLUMNS.items()}
        row |= {"trial_key": f"k{seed}", "config_hash": "A", "pair_key": "A", "scheme": "baseline"}
        row |= {"hparam_label": "", "hparams": "{}", "setting": "{}", "seed": seed, "status": status}
        row |= {
            "failed": False,
            "diverged": False,
            "final_test_acc": 0.9 if status == "finished" else math.nan,
        }
        rows.append(row)
    trials = pd.DataFrame(rows).astype(TRIAL_COLUMNS)
    summary = summarise(trials)
    header = _header_html(trials, summary, "statuses")
    planned, listed = re.search(r"(\d+) planned: ([^.]*)\.", header).groups()
    counted = dict((status, int(n)) for n, status in re.findall(r"(\d+) (\w+)", listed))
    assert counted == dict.fromkeys(STATUSES, 1) and sum(counted.values()) == int(planned) == len(STATUSES)
    table = _summary_html(summary)
    heads, cells = re.findall(r"<th[^>]*>([^<]*)</th>", table), re.findall(r"<td[^>]*>([^<]*)</td>", table)
    not_finished = [status for status in STATUSES if status != "finished"]
    assert " / ".join(not_finished) in heads
    assert f"1 / {len(STATUSES)}" in cells and " / ".join(["1"] * len(not_finished)) in cells


def test_every_metric_is_declared_where_it_is_emitted() -> None:
    """An epoch row's columns and a result's fields are declared in trainers/events.py; the epochs table,
    the trial table, MLflow and Tune take them from there."""
    from orchestrator.tracking.runs import EPOCH_METRICS, RESULT_METRICS, ROUND_METRICS

    layer = LayerEpochStats("conv1", 2, 0.1, 0.0, 1, 1, 0, 0.0)
    row = EpochRecord(0, 0, 1, 0.5, 0.5, 0.5, 0.5, 1.0, (layer,)).flat()
    assert set(row) - {"seed"} <= set(EPOCH_COLUMNS) == set(aggregate.METRIC_COLUMNS)
    assert set(EPOCH_METRICS) | set(ROUND_METRICS) <= set(EPOCH_COLUMNS)
    assert {"train_loss", "test_acc", "cgn_mean"} <= set(EPOCH_METRICS)
    results = {field.name for field in fields(TrialResult)}
    assert set(result_fields(TABLE)) <= set(TRIAL_COLUMNS) & results  # each table field has its type
    assert set(RESULT_METRICS) | set(RESULT_KEYS) <= results
    assert result_fields(TUNE) == RESULT_KEYS and "final_test_acc" in RESULT_METRICS
