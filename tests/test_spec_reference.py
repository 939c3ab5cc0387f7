"""docs/spec-reference.md's field reference is the one the models generate, and it answers real questions."""

from __future__ import annotations

from pathlib import Path

from orchestrator.spec import SweepSpec
from orchestrator.spec_reference import TARGET, readme_section, reference
from orchestrator.spec_seeds import SeedFactorial
from trainers.config import OptimConfig, RandomOutScheme, TrialConfig

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "spec-reference.md"


def test_docs_reference_is_the_generated_one() -> None:
    assert readme_section(REFERENCE.read_text()) == reference(), (
        "docs/spec-reference.md is stale: run `python -m orchestrator.spec_reference --write`"
    )


def test_the_generator_writes_the_docs_reference_by_default() -> None:
    assert TARGET == REFERENCE


def test_every_field_is_listed_with_its_path_type_and_default() -> None:
    text = reference()
    for name in SweepSpec.model_fields:
        if name not in ("resources", "schemes", "factorial"):
            assert f"| `{name}` |" in text, name
    for name in SeedFactorial.model_fields:  # written inside seeds: seeds.order, ...
        assert f"| `seeds.{name}` |" in text, name
    for name in set(TrialConfig.model_fields) - {
        "seed",
        "scheme",
        "failure_margin",
        "data",
        "model",
        "optim",
    }:
        assert f"| `base.{name}` |" in text, name
    for name in OptimConfig.model_fields:
        assert f"| `base.optim.{name}` |" in text, name
    for name in set(RandomOutScheme.model_fields) - {"name"}:
        assert f"| `schemes[].params.{name}` |" in text, name
    # where batch_size goes, as a spec writes it
    assert "| `base.batch_size` | integer | 64 | >= 1 | 0 is not allowed; use full_batch for one step" in text
    assert "`base: {batch_size: 64}`" in text
    assert '| `base.optim.name` | "sgd" \\| "adam" | "sgd" |' in text
    assert "`schemes: [{name: randomout, params: {active_fraction: 1.0}}]`" in text
    assert "| `seeds` | list[integer] | required |" in text
