"""A sweep spec (YAML) and its expansion into an explicit, ordered list of trials; safe YAML loading.

The spec names a base trial (a TrialConfig document without seed), the seeds, and the
schemes with their hyperparameter grids. Expansion order is fixed and documented:
scheme entries as written x grid combinations (top-level grid keys, then the scheme's,
each in the order written, last key fastest) x seeds. Every scheme gets the same seed
list, so trials with equal pair_key and seed are paired across schemes.

Grid keys: in a scheme's `grid` (and `params`) a bare key names a hyperparameter of that
scheme (`tau`, `active_fraction`, `metric`); a dotted key is a TrialConfig path
(`model.filters`, `optim.lr`). Keys of the top-level `grid`, which applies to every
scheme, are always TrialConfig paths (`epochs` or `model.filters`).

Every trial is validated before anything runs; an error names the spec field that
caused it (`schemes[1].grid.tau: ...`), never an internal TrialConfig path.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.errors import UserError, choice_hint, did_you_mean, unknown_field_message
from trainers.config import SCHEMES, TrialConfig

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
BASE_RESERVED = {
    "seed": "set the seed list at the top level (seeds: ...)",
    "scheme": "list schemes at the top level (schemes: [{name: ...}])",
    "failure_margin": "set failure_margin at the top level",
}
MAX_SEEDS = 100_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Strict):
    """Per trial, as Ray schedules them. Fractional GPUs are logical only: Ray caps no memory."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)

    @field_validator("gpu")
    @classmethod
    def _whole_or_fraction(cls, value: float) -> float:
        if value > 1 and not value.is_integer():
            raise ValueError(f"a fraction in [0, 1] or a whole number of GPUs, got {value:g}")
        return value

    @property
    def threads(self) -> int:
        """torch intra-op threads of a trial: its whole CPUs, at least one.

        The one rule for every trial, in a sweep and under `lottery train` (which trains with the
        default resources, 1 CPU, so 1 thread): the thread count changes summation order and so a
        trial's exact numbers (BatchNorm trials differed in the 3rd digit between 1 and 2 threads),
        and it is recorded in every result and run as `threads`.
        """
        return max(1, math.floor(self.cpu))


class SchemeEntry(_Strict):
    name: str
    params: dict[str, Any] = {}  # fixed hyperparameters of this entry
    grid: dict[str, list[Any]] = {}  # crossed, in the order written

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in SCHEMES:
            hint = did_you_mean(value, SCHEMES) or f"; choose one of {', '.join(SCHEMES)}"
            raise ValueError(f"unknown scheme {value!r}{hint}")
        return value

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return _check_grid(grid)


class SweepSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)  # a directory and an MLflow experiment name
    description: str = ""
    base: dict[str, Any] = {}  # a TrialConfig document without seed, scheme or failure_margin
    seeds: list[int]  # accepts a list, {start, count} or {range: [a, b)} (Python range: b excluded)
    schemes: list[SchemeEntry] = Field(min_length=1)
    grid: dict[str, list[Any]] = {}  # TrialConfig paths crossed for every scheme
    failure_margin: float = Field(0.05, ge=0.0, lt=1.0)  # failed if test acc <= chance + margin
    resources: Resources = Resources()
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: as many as the resources allow
    max_failures: int = Field(2, ge=0)  # Tune retries per trial, each from its last checkpoint
    # Seeds of one configuration trained at once in one process (trainers/pack.py); "auto" packs
    # narrow CraterCNN/vanilla nets by a measured rule, 1 trains every seed alone.
    pack_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # None: $LOTTERY_HOME or ./runs (relative: to the working dir); or a URI, s3://bucket/prefix (layout.py)
    storage_path: str | None = None
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or sqlite:///<sweep dir>/mlflow.db
    ray_address: str | None = None  # None: an embedded local Ray (or $RAY_ADDRESS)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_list(cls, value: Any) -> list[int]:
        seeds = _explicit_seeds(value)
        if not seeds:
            raise ValueError("no seeds; give at least one")
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
            raise ValueError("seeds must be whole numbers >= 0")
        duplicated = sorted({s for s in seeds if seeds.count(s) > 1})
        if duplicated:
            raise ValueError(f"seed {duplicated[0]} is listed more than once")
        return seeds

    @field_validator("base")
    @classmethod
    def _no_reserved(cls, base: dict[str, Any]) -> dict[str, Any]:
        for key, advice in BASE_RESERVED.items():
            if key in base:
                raise ValueError(f"{key} does not belong in base; {advice}")
        return base

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return _check_grid(grid)


def _explicit_seeds(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and set(value) == {"start", "count"}:
        start, count = value["start"], value["count"]
        if not (isinstance(start, int) and isinstance(count, int)) or start < 0 or count < 1:
            raise ValueError("{start, count} needs whole numbers, start >= 0 and count >= 1")
        return _seed_range(start, start + count)
    if isinstance(value, dict) and set(value) == {"range"}:
        bounds = value["range"]
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, int) for b in bounds)):
            raise ValueError("{range: [a, b]} needs two whole numbers (b excluded, as in Python)")
        return _seed_range(bounds[0], bounds[1])
    raise ValueError("expected a list of seeds, {start: S, count: N} or {range: [a, b]}")


def _seed_range(start: int, stop: int) -> list[int]:
    if stop - start > MAX_SEEDS:  # a typo such as count: 1e9 would otherwise exhaust memory
        raise ValueError(f"{stop - start} seeds; at most {MAX_SEEDS} per sweep")
    return list(range(start, stop))


def _check_grid(grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
    for key, values in grid.items():
        if not values:
            raise ValueError(f"{key}: an empty list of values")
        try:
            distinct = {json.dumps(v, sort_keys=True) for v in values}
        except TypeError:  # a YAML date, or a mapping with mixed key types
            raise ValueError(f"{key}: values must be numbers, strings, booleans, lists or mappings") from None
        if len(distinct) != len(values):
            raise ValueError(f"{key}: a value is listed more than once")
    return grid


@dataclass(frozen=True)
class SweepPlan:
    """A validated spec and its trials, in execution order."""

    spec: SweepSpec
    trials: tuple[TrialConfig, ...]
    units: tuple[tuple[int, ...], ...]  # what each Tune trial trains: one trial, or a pack of seeds

    @property
    def fingerprint(self) -> str:
        """Identity of the plan: the ordered trial keys and how they are packed.

        Packing is part of it because a restored Tune experiment keeps its own units.
        """
        keys = "\n".join(t.trial_key() for t in self.trials)
        packs = "" if all(len(u) == 1 for u in self.units) else "\n" + json.dumps(self.units)
        return hashlib.sha256((keys + packs).encode()).hexdigest()[:16]

    def rows(self) -> list[dict[str, Any]]:
        """trials.json: what aggregation needs to know about each planned trial."""
        return [plan_row(t) for t in self.trials]

    def spec_document(self) -> dict[str, Any]:
        """spec.json: the spec with its seeds spelled out, plus the plan's identity."""
        return self.spec.model_dump(mode="json") | {
            "fingerprint": self.fingerprint,
            "n_trials": len(self.trials),
        }


def plan_row(trial: TrialConfig) -> dict[str, Any]:
    return {
        "trial_key": trial.trial_key(),
        "config_hash": trial.config_hash(),
        "pair_key": trial.pair_key(),
        "scheme": trial.scheme.name,
        "hparam_label": trial.hparam_label(),
        "seed": trial.seed,
    }


# Loading: safe YAML in, nested dicts out (specs and `lottery train`'s trial YAML), and dotted
# `key=value` overrides for the command line.


def load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config: no such file {path}")
    try:
        text = path.read_bytes().decode("utf-8")
        doc = yaml.safe_load(text)
    except OSError as exc:
        raise UserError(f"config: cannot read {path} ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"config: {path} is not UTF-8 text (byte {exc.start})") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise UserError(f"config: {path} nests collections too deeply") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise UserError(f"config: {path} must hold a mapping of fields, not a {type(doc).__name__}")
    return doc


def set_dotted(doc: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = doc
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part == "scheme":
            child = {"name": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`--set model.filters=4` style overrides; values are parsed as YAML scalars (1e-8, true, 4)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set scheme.tau=1e-8")
        set_dotted(doc, key.strip(), yaml.safe_load(raw))
    return doc


def load_spec(path: Path) -> SweepSpec:
    doc = load_yaml(path)
    try:
        return SweepSpec.model_validate(doc)
    except ValidationError as exc:
        raise UserError(_describe(exc.errors()[0], len(exc.errors()), model=SweepSpec)) from None


def load_plan(path: Path) -> SweepPlan:
    return expand(load_spec(path))


def expand(spec: SweepSpec) -> SweepPlan:
    """Every (scheme entry, grid combination) validated once, then crossed with the seeds."""
    trials: list[TrialConfig] = []
    first_entry: dict[str, int] = {}
    for index, entry in enumerate(spec.schemes):
        for config in _entry_configs(spec, index, entry):
            key = config.config_hash()
            if key in first_entry:
                raise UserError(
                    f"schemes[{index}]: repeats a configuration of schemes[{first_entry[key]}] "
                    f"({config.scheme.name} {config.hparam_label() or 'defaults'}); remove one"
                )
            first_entry[key] = index
            trials.extend(config.with_seed(seed) for seed in spec.seeds)
    return SweepPlan(spec=spec, trials=tuple(trials), units=pack_units(spec, trials))


def pack_units(spec: SweepSpec, trials: list[TrialConfig]) -> tuple[tuple[int, ...], ...]:
    """Consecutive seeds of one configuration, chunked into packs; models that cannot pack run alone."""
    units: list[tuple[int, ...]] = []
    start = 0
    while start < len(trials):
        config = trials[start]
        end = start
        while end < len(trials) and trials[end].config_hash() == config.config_hash():
            end += 1
        size = _pack_size(spec.pack_size, config)
        units += [tuple(range(i, min(i + size, end))) for i in range(start, end, size)]
        start = end
    return tuple(units)


def _pack_size(requested: int | str, config: TrialConfig) -> int:
    # torch, imported once a spec has validated: a mistake in it is reported without loading torch.
    from trainers.loop import can_pack
    from trainers.pack import auto_pack_size

    if not can_pack(config):
        return 1
    if requested == "auto":
        return auto_pack_size(
            config.model.name, config.model.filters, config.uses_batchnorm, config.model.hidden_fc
        )
    return int(requested)


def _entry_configs(spec: SweepSpec, index: int, entry: SchemeEntry) -> list[TrialConfig]:
    where = f"schemes[{index}]"
    origins: dict[tuple[str, ...], str] = {("scheme",): where}
    axes: list[tuple[tuple[str, ...], list[Any]]] = []
    for key, values in spec.grid.items():
        origins[tuple(key.split("."))] = f"grid.{key}"
        axes.append((tuple(key.split(".")), values))
    for kind, fields in (("params", entry.params), ("grid", entry.grid)):
        for key in fields:
            path = _scheme_path(key)
            if path in origins and origins[path] != where:
                raise UserError(f"{where}.{kind}.{key}: also set by {origins[path]}; set it in one place")
            origins[path] = f"{where}.{kind}.{key}"
    axes += [(_scheme_path(key), values) for key, values in entry.grid.items()]

    configs = []
    for combo in itertools.product(*(values for _, values in axes)):
        doc = copy.deepcopy(spec.base)
        doc["failure_margin"] = spec.failure_margin
        doc["scheme"] = {"name": entry.name}
        for key, value in entry.params.items():
            set_dotted(doc, ".".join(_scheme_path(key)), value)
        for (path, _), value in zip(axes, combo, strict=True):
            set_dotted(doc, ".".join(path), value)
        try:
            configs.append(TrialConfig.model_validate(doc))
        except ValidationError as exc:
            error = exc.errors()[0]
            field = _origin(error["loc"], origins)
            raise UserError(_describe(error, len(exc.errors()), field, model=TrialConfig)) from None
    return configs


def _trial_field(name: Any) -> bool:
    """A TrialConfig field the spec's top level does not have (`epochs`, `model`): it goes in base."""
    name = str(name)
    return (
        name in TrialConfig.model_fields and name not in SweepSpec.model_fields and name not in BASE_RESERVED
    )


def _scheme_path(key: str) -> tuple[str, ...]:
    return tuple(key.split(".")) if "." in key else ("scheme", key)


def _origin(loc: tuple[Any, ...], origins: dict[tuple[str, ...], str]) -> str:
    """The spec field behind a TrialConfig error location (the longest matching prefix)."""
    path = tuple(str(p) for p in loc)
    if len(path) > 1 and path[0] == "scheme" and path[1] in SCHEMES:
        path = (path[0], *path[2:])  # drop the discriminator tag pydantic puts in the location
    for end in range(len(path), 0, -1):
        if path[:end] in origins:
            return origins[path[:end]] + "".join(f".{p}" for p in path[end:])
    return "base" + "".join(f".{p}" for p in path) if path else origins[("scheme",)]


def _describe(error: dict[str, Any], count: int, field: str | None = None, *, model: type[BaseModel]) -> str:
    """`field: message`; an unknown field or name suggests the closest known one (`model`'s fields)."""
    if field is None:
        field = (
            "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".") or "spec"
        )
    message = str(error["msg"]).removeprefix("Value error, ")
    loc = tuple(p for p in error["loc"] if not str(p).startswith("function-"))
    if error["type"] == "extra_forbidden" and model is SweepSpec and len(loc) == 1 and _trial_field(loc[0]):
        message = f"unknown field at the top level; it belongs under base: (base.{loc[0]})"
    elif error["type"] == "extra_forbidden":
        message = unknown_field_message(model, loc)
    elif error["type"] == "missing":
        message = "required field is missing"
    elif "input" in error and not isinstance(error["input"], dict | list):
        echo = "" if repr(error["input"]) in message else f" (got {error['input']!r})"
        message = f"{message}{echo}{choice_hint(error)}"
    else:
        message += choice_hint(error)
    more = f" (and {count - 1} more)" if count > 1 else ""
    return f"{field}: {message}{more}"
