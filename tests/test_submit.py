"""`lottery submit` refuses before it contacts a cluster (no Ray head here: tests/test_production.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.run.submit import job_entrypoint

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SPEC = "tests/specs/cluster_smoke.yaml"


def test_the_job_runs_the_spec_by_its_path_in_the_uploaded_checkout() -> None:
    assert job_entrypoint(ROOT / SMOKE_SPEC) == f"lottery sweep {SMOKE_SPEC}"


@pytest.mark.parametrize(
    ("spec", "environment", "expected"),
    [
        ("tests/malformed_specs/unknown_scheme.yaml", {}, "unknown scheme 'dropout'"),
        (SMOKE_SPEC, {"LOTTERY_HOME": "runs"}, "storage_path: a cluster job needs an absolute path"),
        (
            SMOKE_SPEC,
            {"MLFLOW_TRACKING_URI": "http://admin:pw@mlflow:5000"},
            "MLFLOW_TRACKING_URI: the tracking URI carries a password",
        ),
    ],
    ids=["bad-spec", "relative-storage", "password-in-uri"],
)
def test_submit_refuses_before_contacting_the_cluster(
    spec: str, environment: dict[str, str], expected: str, tmp_path: Path
) -> None:
    """Nothing listens on the address: every refusal here happens before any request is made."""
    env = {"LOTTERY_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": None, "RAY_ADDRESS": None} | environment
    result = CliRunner().invoke(app, ["submit", str(ROOT / spec), "--address", "http://127.0.0.1:9"], env=env)

    assert result.exit_code == 2 and result.stdout == "", result.output
    assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr


def test_submit_refuses_a_spec_outside_the_checkout(tmp_path: Path) -> None:
    spec = tmp_path / "outside.yaml"
    spec.write_text((ROOT / SMOKE_SPEC).read_text())
    env = {"LOTTERY_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": None}
    result = CliRunner().invoke(app, ["submit", str(spec), "--address", "http://127.0.0.1:9"], env=env)

    assert result.exit_code == 2 and "is outside" in result.stderr, result.output
