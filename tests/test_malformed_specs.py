"""A bad sweep spec costs one line and exit code 2, never a traceback, and starts nothing.

`malformed_specs/*.yaml` is a corpus of mistakes, each naming on its first line the error it must
produce (`# expect: <substring>`). They run in-process through typer's CliRunner (one import of
torch, Ray and MLflow for all of them), plus one real subprocess to prove that what a user sees in
a terminal is that one line. A hypothesis fuzz then throws random YAML, mutated valid specs and
random bytes at the loader (with --dry-run, so a spec that happens to be valid starts nothing).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from orchestrator.cli import app

ROOT = Path(__file__).resolve().parents[1]
CORPUS = sorted((Path(__file__).parent / "malformed_specs").glob("*.yaml"))
VALID: dict[str, Any] = {
    "name": "fuzz",
    "seeds": [0, 1],
    "base": {
        "data": {"name": "digits"},
        "model": {"name": "crater_cnn", "filters": 2},
        "optim": {"name": "adam", "lr": 0.002},
        "epochs": 2,
        "device": "cpu",
    },
    "schemes": [{"name": "baseline"}, {"name": "randomout", "params": {"tau": 1.0e-8}}],
    "grid": {"model.filters": [2, 4]},
    "resources": {"cpu": 1},
}
FIELD_NAMES = ["name", "seeds", "schemes", "params", "grid", "base", "epochs", "tau", "model", "data", "gpu"]


def expected_error(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: <substring>'"
    return first.removeprefix("# expect: ")


def run_cli(args: list[str], home: Path) -> Result:
    """`lottery ARGS` in-process, with its own empty results root and no cluster or tracking server."""
    env = {
        "LOTTERY_HOME": str(home),
        "RAY_ADDRESS": None,
        "MLFLOW_TRACKING_URI": None,
        "LOTTERY_DATA_DIR": None,
    }
    return CliRunner().invoke(app, args, env=env)


def assert_one_error_line(result: Result, expected: str | None = None) -> None:
    """Exit 2 and exactly one line, on stderr, that starts with `error: `; no traceback anywhere."""
    assert isinstance(result.exception, SystemExit), f"raised {result.exception!r}"
    assert result.exit_code == 2, result.output
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    if expected is not None:
        assert expected in lines[0]


def test_corpus_covers_at_least_thirty_mistakes() -> None:
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_malformed_spec_gives_one_error_line_and_starts_nothing(path: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = run_cli(["sweep", str(path)], home)

    assert_one_error_line(result, expected_error(path))
    assert not home.exists(), f"created {sorted(home.rglob('*'))}"
    assert not ray.is_initialized()


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_dry_run_refuses_what_the_run_refuses(path: Path, tmp_path: Path) -> None:
    """--dry-run makes every check the run makes (data files, device, resources), so it never passes
    a spec that the run then rejects."""
    home = tmp_path / "home"
    result = run_cli(["sweep", "--dry-run", str(path)], home)

    assert_one_error_line(result, expected_error(path))
    assert not home.exists()


@pytest.mark.slow
def test_a_real_terminal_sees_the_one_line(tmp_path: Path) -> None:
    """The data check runs after validation, so this mistake travels the longest path before exit 2."""
    path = next(p for p in CORPUS if p.stem == "craters_missing_data_dir")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LOTTERY_DATA_DIR")}
    env["LOTTERY_HOME"] = str(tmp_path / "home")
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "sweep", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [f"error: {done.stderr.strip().removeprefix('error: ')}"]
    assert expected_error(path) in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "home").exists()


# --- fuzz ------------------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**12), max_value=10**12)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["baseline", "randomout", "repr", "batchnorm", "digits", "craters", "oracle"])
    | st.dates()
)
junk = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8) | st.sampled_from(FIELD_NAMES), inner, max_size=3)
    ),
    max_leaves=8,
)


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location in a document: mapping keys and list indices, outermost first."""
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += paths(value, (*prefix, index))
    return found


@st.composite
def mutated_specs(draw: st.DrawFn) -> str:
    """The valid spec with a few locations replaced, deleted or given an extra key."""
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(doc)))
        if not where:
            continue
        parent = doc
        for part in where[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[where[-1]] = draw(junk)
        elif action == "delete":
            del parent[where[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8) | st.sampled_from(FIELD_NAMES))] = draw(junk)
    return yaml.safe_dump(doc, allow_unicode=True)


documents = (
    mutated_specs().map(str.encode)
    | junk.map(lambda doc: yaml.safe_dump(doc, allow_unicode=True).encode())
    | st.text(alphabet=st.sampled_from(list(":-[]{}!&*#|>'\"\n\t ,?%@`abc0192")), max_size=60).map(str.encode)
    | st.binary(max_size=64)
)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=documents)
def test_fuzzed_spec_validates_or_gives_one_error_line(payload: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.yaml"
        spec.write_bytes(payload)
        result = run_cli(["sweep", "--dry-run", "--no-estimate", str(spec)], Path(tmp) / "home")

    if result.exit_code == 0:
        assert result.exception is None and "trials in sweep" in result.stdout
    else:
        assert_one_error_line(result)
