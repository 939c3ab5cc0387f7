"""The seeds block of a sweep spec: seed lists in their spellings, the split by source (a full
factorial of init x order x augment x split x replicates), the fate clock's fork plan, and the rules a
sequential study stops on. orchestrator/spec.py owns the rest of the spec and its expansion; these
models are its `seeds:` and `fork:` fields and carry their own messages, which spec.py prefixes with the
field's path.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainers.config import MAX_SEED, ForkConfig, TrialConfig

MAX_SEEDS = 100_000
SEQUENTIAL_KEYS = ("batch", "until")  # what makes `seeds: {start, max, batch, until}` a sequential study
RULE_HELP = (
    "'failure_rate_ci_width <= W', {paired: {scheme: S, vs: baseline, decided: 0.95}} or "
    "{variance_share_ci_width: {source: order, width: W}}"
)
_WIDTH_RULE = re.compile(r"^\s*failure_rate_ci_width\s*<=\s*([0-9.eE+-]+)\s*$")


class StrictModel(BaseModel):
    """A spec model: unknown keys are refused (a typo is an error, not a default), values are frozen
    and not infinite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FailureRateRule(StrictModel):
    """Stop once every configuration's anytime-valid failure-rate interval is at most `width` wide."""

    kind: Literal["failure_rate_ci_width"] = "failure_rate_ci_width"
    width: float = Field(gt=0, le=1)
    confidence: float = Field(0.95, gt=0.5, lt=1)


class PairedRule(StrictModel):
    """Stop once the median paired gain of `scheme` over `vs` is decided at level `decided`: its
    anytime-valid interval excludes 0, or (with `smallest_effect`) lies inside (-effect, +effect)."""

    kind: Literal["paired"] = "paired"
    scheme: str
    vs: str = "baseline"
    decided: float = Field(0.95, gt=0.5, lt=1)
    smallest_effect: float | None = Field(None, gt=0, lt=1)  # accuracy fraction: 0.01 = 1 point


class VarianceShareRule(StrictModel):
    """Stop once every arm's bootstrap interval of `source`'s share of the variance is at most `width`
    wide (seeds split by source only; dashboards/variance.py). A fixed-n interval, not a confidence
    sequence: stopping on its width, never on the share's value, keeps the study's bias small, and the
    share is reported with that caveat (docs/statistics.md)."""

    kind: Literal["variance_share_ci_width"] = "variance_share_ci_width"
    source: Literal["init", "order", "augment", "interaction", "nondeterminism"]
    width: float = Field(gt=0, le=1)  # a fraction of the variance: 0.2 = 20 points of share


class Sequential(StrictModel):
    """How a sequential study grows: `batch` more seeds per configuration until `until` holds."""

    batch: int = Field(ge=1)
    until: Annotated[FailureRateRule | PairedRule | VarianceShareRule, Field(discriminator="kind")]

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        """A misspelt key is named before the key it was meant to be is reported missing."""
        unknown = sorted(set(data) - {"batch", "until"}, key=str) if isinstance(data, dict) else []
        if unknown:
            raise ValueError(
                f"unknown field {unknown[0]!r}; a sequential study takes start, max, batch and until"
            )
        return data

    @field_validator("until", mode="before")
    @classmethod
    def _rule(cls, value: Any) -> Any:
        """The spec's short forms: a comparison string, or a mapping keyed by the rule's name."""
        if isinstance(value, str):  # the error names the value it quotes
            match = _WIDTH_RULE.match(value)
            if match is None:
                raise ValueError(f"expected {RULE_HELP}")
            width = _float(match.group(1))
            if width is None or not 0 < width <= 1:
                raise ValueError("failure_rate_ci_width needs a number in (0, 1]")
            value = {"failure_rate_ci_width": width}
        if not isinstance(value, dict):
            raise ValueError(f"expected {RULE_HELP}")
        if "kind" in value:  # the recorded form (spec.json)
            return value
        if set(value) == {"paired"}:
            return {"kind": "paired", **value["paired"]} if isinstance(value["paired"], dict) else value
        if set(value) == {"variance_share_ci_width"}:
            inner = value["variance_share_ci_width"]
            return {"kind": "variance_share_ci_width", **inner} if isinstance(inner, dict) else value
        if "failure_rate_ci_width" in value and set(value) <= {"failure_rate_ci_width", "confidence"}:
            width = _float(value["failure_rate_ci_width"])
            if width is None or not 0 < width <= 1:
                got = value["failure_rate_ci_width"]
                raise ValueError(f"failure_rate_ci_width needs a number in (0, 1], got {got!r}")
            return {"kind": "failure_rate_ci_width", "width": width} | (
                {"confidence": value["confidence"]} if "confidence" in value else {}
            )
        raise ValueError(f"expected {RULE_HELP}")

    def describe(self) -> str:
        rule = self.until
        if isinstance(rule, VarianceShareRule):
            return (
                f"every arm's 95% bootstrap interval of the {rule.source} share of the variance at most "
                f"{rule.width:g} wide (variance_share_ci_width: {rule.source} <= {rule.width:g})"
            )
        if isinstance(rule, FailureRateRule):
            return (
                f"every configuration's {rule.confidence:.0%} failure-rate confidence sequence "
                f"at most {rule.width:g} wide (failure_rate_ci_width <= {rule.width:g})"
            )
        effect = f" or lies inside +-{rule.smallest_effect:g}" if rule.smallest_effect else ""
        return (
            f"the {rule.decided:.0%} confidence sequence of the median paired gain of {rule.scheme} over "
            f"{rule.vs} excludes 0{effect}"
        )


class SeedFactorial(StrictModel):
    """`seeds: {init, order, augment, split, replicates}`: the seed split by source, crossed in full.

    `init` (the trial's `seed`: weights and the scheme's draws) stays in `seeds`; each trial of it
    runs once per cell of order x augment x split x replicate. A source left out is not split off:
    order then comes from data_seed's stream, augmentation from the order stream, the split from
    data_seed (base, 0 by default). `replicates: R` repeats each cell R times with identical seeds,
    which measures nondeterminism (0 on CPU, where a repeat is bit-identical)."""

    order: list[int] | None = None
    augment: list[int] | None = None
    split: list[int] | None = None
    replicates: int = Field(1, ge=1, le=100)

    @field_validator("order", "augment", "split", mode="before")
    @classmethod
    def _seed_lists(cls, value: Any) -> list[int] | None:
        return None if value is None else checked_seeds(value)

    def cells(self) -> list[dict[str, int]]:
        """The TrialConfig fields of every cell, the last source fastest; [{}] when nothing is split."""
        axes = [
            [{field: s} for s in seeds] if seeds else [{}]
            for field, seeds in (("order_seed", self.order), ("augment_seed", self.augment))
            + (("data_seed", self.split),)
        ]
        repeats = [{"replicate": r} if r else {} for r in range(self.replicates)]
        return [o | a | s | r for o in axes[0] for a in axes[1] for s in axes[2] for r in repeats]

    def describe(self) -> str:
        """ "10 order seeds x 2 replicates": what each init seed is crossed with."""
        sources = (("order seeds", self.order), ("augment seeds", self.augment), ("splits", self.split))
        parts = [f"{len(seeds)} {name}" for name, seeds in sources if seeds]
        return " x ".join(parts + ([f"{self.replicates} replicates"] if self.replicates > 1 else []))


class ForkPlan(StrictModel):
    """`fork: {at: [0, 0.01, 0.05, 0.2], children: M}`: the fate clock (trainers/fork.py). Every trial of
    the plan is a parent; for each fraction in `at`, M children train its first `at` of the steps as it
    does and then draw batches (and augmentation) of their own. `lottery aggregate` prints the "Fate
    clock" table from them (dashboards/fate.py); the summary and every other table leave them out."""

    at: list[float] = Field(min_length=1, max_length=20)  # fractions of training, each in [0, 1)
    children: int = Field(2, ge=2, le=100)  # per parent and fraction; 2 at least: the barrier is between two

    @field_validator("at")
    @classmethod
    def _fractions(cls, at: list[float]) -> list[float]:
        bad = next((a for a in at if not 0 <= a < 1), None)
        if bad is not None:
            raise ValueError(f"{bad} is not a fraction of training in [0, 1); write e.g. at: [0, 0.05, 0.2]")
        if len(set(at)) != len(at):
            raise ValueError("a fraction is listed twice; list each fork point once")
        return sorted(at)

    def children_of(self, config: TrialConfig) -> list[TrialConfig]:
        """The configuration's children, fork point by fork point, child by child (seed not yet set)."""
        return [
            config.model_copy(update={"fork": ForkConfig(at=at, child=c)})
            for at in self.at
            for c in range(1, self.children + 1)
        ]


# What `seeds: {...}` takes when it splits the seed by source: init, then SeedFactorial's fields.
FACTORIAL_KEYS: tuple[str, ...] = ("init", *SeedFactorial.model_fields)


def checked_seeds(value: Any) -> list[int]:
    """A seed list in any of its spellings, checked: whole, distinct, within MAX_SEED."""
    seeds = _explicit_seeds(value)
    if not seeds:
        raise ValueError("no seeds; give at least one")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise ValueError("seeds must be whole numbers >= 0")
    too_big = next((s for s in seeds if s > MAX_SEED), None)
    if too_big is not None:  # trainers.config.MAX_SEED says why
        raise ValueError(f"seed {too_big} is above {MAX_SEED} (2**63 - 1), the largest a result holds")
    duplicated = sorted({s for s in seeds if seeds.count(s) > 1})
    if duplicated:
        raise ValueError(f"seed {duplicated[0]} is listed more than once")
    return seeds


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _explicit_seeds(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and set(value) == {"start", "count"}:
        start, count = value["start"], value["count"]
        if not (isinstance(start, int) and isinstance(count, int)) or start < 0 or count < 1:
            raise ValueError("{start, count} needs whole numbers, start >= 0 and count >= 1")
        return _seed_range(start, start + count)
    if isinstance(value, dict) and set(value) == {"start"}:
        raise ValueError("a sequential study needs max: the most seeds per configuration")
    if isinstance(value, dict) and "max" in value and set(value) <= {"start", "max"}:
        start, most = value.get("start", 0), value["max"]
        if not (isinstance(start, int) and isinstance(most, int)) or start < 0 or most < 1:
            raise ValueError("{start, max} needs whole numbers, start >= 0 and max >= 1")
        return _seed_range(start, start + most)
    if isinstance(value, dict) and set(value) == {"range"}:
        bounds = value["range"]
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, int) for b in bounds)):
            raise ValueError("{range: [a, b]} needs two whole numbers (b excluded, as in Python)")
        low, high = bounds
        if high < low:
            raise ValueError(f"range [{low}, {high}] has its bounds reversed; write [{high}, {low}]")
        if high == low:
            raise ValueError(
                f"range [{low}, {high}] is empty (b is excluded, as in Python); write [{low}, {low + 1}]"
            )
        return _seed_range(low, high)
    raise ValueError(
        "expected a list of seeds, {start: S, count: N}, {range: [a, b]} "
        "or {start: S, max: N, batch: B, until: RULE}"
    )


def _seed_range(start: int, stop: int) -> list[int]:
    if stop - start > MAX_SEEDS:  # a typo such as count: 1e9 would otherwise exhaust memory
        raise ValueError(f"{stop - start} seeds; at most {MAX_SEEDS} per sweep")
    return list(range(start, stop))
