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

A sequential study (`seeds: {start: 0, max: 400, batch: 20, until: RULE}`) plans every seed up to
`max` per configuration but runs them a batch at a time until RULE holds (orchestrator/sequential.py).
Its trials are ordered batch first (batch x scheme entry x grid x seeds of the batch), so the
trials of the first k batches are a prefix of the plan and its fingerprint does not move as
batches are added.

The models of the `seeds:` and `fork:` fields (seed spellings, the split by source, the fork plan,
the sequential rules) live in orchestrator/spec_seeds.py.

Longer than the ~450 lines a module usually gets, on purpose: the spec's models, their expansion and
the messages that name a spec field are one contract (a message's field path follows the models'
shape and the expansion's origins), which one file keeps in step.
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
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.errors import UserError, did_you_mean, plain_message, unknown_field_message
from orchestrator.spec_seeds import (
    FACTORIAL_KEYS,
    SEQUENTIAL_KEYS,
    ForkPlan,
    PairedRule,
    SeedFactorial,
    Sequential,
    StrictModel,
    VarianceShareRule,
    checked_seeds,
)
from trainers.config import SCHEMES, UNFORKABLE_SCHEMES, TrialConfig

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAME_RULE = "at most 64 characters: letters, digits, . _ - (the first a letter or digit)"
BASE_RESERVED = {
    "seed": "set the seed list at the top level (seeds: ...)",
    "scheme": "list schemes at the top level (schemes: [{name: ...}])",
    "failure_margin": "set failure_margin at the top level",
}
MAX_TRIALS = 10_000  # the default cap on a plan: a typo in a grid or the seeds can mean millions of trials


class Resources(StrictModel):
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


# A grid of values to cross: every list non-empty, its values distinct (a scheme's grid and the base grid).
Grid = Annotated[dict[str, list[Any]], AfterValidator(_check_grid)]


class SchemeEntry(StrictModel):
    name: str
    params: dict[str, Any] = {}  # fixed hyperparameters of this entry
    grid: Grid = {}  # crossed, in the order written

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in SCHEMES:
            hint = did_you_mean(value, SCHEMES) or f"; choose one of {', '.join(SCHEMES)}"
            raise ValueError(f"unknown scheme {value!r}{hint}")
        return value


class SweepSpec(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)  # a directory and an MLflow experiment name
    description: str = ""
    base: dict[str, Any] = {}  # a TrialConfig document without seed, scheme or failure_margin
    seeds: list[int]  # accepts a list, {start, count} or {range: [a, b)} (Python range: b excluded)
    # Set from `seeds: {start, max, batch, until}`: the seeds above are then the most a study may use.
    sequential: Sequential | None = None
    # Set from `seeds: {init, order, augment, split, replicates}` (SeedFactorial): the init seeds stay
    # above, and every trial runs once per cell of the other sources.
    factorial: SeedFactorial | None = None
    fork: ForkPlan | None = None  # the fate clock: children forked from every trial (ForkPlan)
    schemes: list[SchemeEntry] = Field(min_length=1)
    grid: Grid = {}  # TrialConfig paths crossed for every scheme
    failure_margin: float = Field(0.05, ge=0.0, lt=1.0)  # failed if test acc <= chance + margin
    resources: Resources = Resources()
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: as many as the resources allow
    max_failures: int = Field(2, ge=0)  # Tune retries per trial, each from its last checkpoint
    # Seeds of one configuration trained at once in one process (trainers/pack.py); "auto" packs
    # narrow CraterCNN/vanilla nets, and small custom nets that vmap batches, by a measured rule; 1
    # trains every seed alone. A custom net vmap cannot batch trains alone whatever this says.
    pack_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # None: $LOTTERY_HOME or ./runs (relative: to the working dir); or a URI, s3://bucket/prefix (layout.py)
    storage_path: str | None = None
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or sqlite:///<sweep dir>/mlflow.db
    ray_address: str | None = None  # None: an embedded local Ray (or $RAY_ADDRESS)
    # Each MLflow run's per-filter CGN figure, drawn by the trial (~0.05-0.1 s of a worker per seed);
    # false for many very short trials: the trace stays an artifact and `lottery report` draws the sweep
    run_figures: bool = True
    # The most trials the plan may hold, checked before it is expanded: a grid typo can plan millions
    max_trials: int = Field(MAX_TRIALS, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _split_factorial(cls, data: Any) -> Any:
        """`seeds: {init, order, ...}`: the init seeds stay in seeds, the other sources go to factorial."""
        seeds = data.get("seeds") if isinstance(data, dict) else None
        if not (isinstance(seeds, dict) and set(seeds) & set(FACTORIAL_KEYS)):
            return data
        if "factorial" in data:
            raise ValueError("give the seed sources in seeds only, not also in factorial")
        unknown = sorted(set(seeds) - set(FACTORIAL_KEYS) - set(SEQUENTIAL_KEYS), key=str)
        if unknown:
            raise ValueError(
                f"seeds.{unknown[0]}: not a seed source; seeds split by source take "
                f"{', '.join(FACTORIAL_KEYS)} (and batch and until for a sequential study)"
            )
        if "init" not in seeds:
            raise ValueError(
                "seeds.init: seeds split by source need init, the weights' seeds (e.g. init: [0, 1])"
            )
        sequential = {k: seeds[k] for k in SEQUENTIAL_KEYS if k in seeds}
        if sequential and "sequential" in data:
            raise ValueError("give batch and until in seeds only, not also in sequential")
        sources = {k: v for k, v in seeds.items() if k not in ("init", *SEQUENTIAL_KEYS)}
        return (
            data
            | {"seeds": seeds["init"], "factorial": sources}
            | ({"sequential": sequential} if sequential else {})
        )

    @model_validator(mode="before")
    @classmethod
    def _split_sequential(cls, data: Any) -> Any:
        """`seeds: {start, max, batch, until}`: the seed range stays in seeds, the rest goes to sequential."""
        seeds = data.get("seeds") if isinstance(data, dict) else None
        if not (isinstance(seeds, dict) and (set(SEQUENTIAL_KEYS) & set(seeds) or "max" in seeds)):
            return data
        if "init" in seeds:  # seeds split by source: _split_factorial takes them apart
            return data
        if "sequential" in data:
            raise ValueError("give batch and until in seeds only, not also in sequential")
        return data | {
            "seeds": {k: v for k, v in seeds.items() if k in ("start", "max")},
            "sequential": {k: v for k, v in seeds.items() if k not in ("start", "max")},
        }

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_list(cls, value: Any) -> list[int]:
        return checked_seeds(value)

    def seed_cells(self) -> list[dict[str, int]]:
        """The other sources' cells each init seed runs in: [{}] for a plain seed list."""
        return self.factorial.cells() if self.factorial is not None else [{}]

    @field_validator("base")
    @classmethod
    def _no_reserved(cls, base: dict[str, Any]) -> dict[str, Any]:
        for key, advice in BASE_RESERVED.items():
            if key in base:
                raise ValueError(f"{key} does not belong in base; {advice}")
        return base


@dataclass(frozen=True)
class SweepPlan:
    """A validated spec and its trials, in execution order."""

    spec: SweepSpec
    trials: tuple[TrialConfig, ...]
    units: tuple[tuple[int, ...], ...]  # what each Tune trial trains: one trial, or a pack of seeds
    batch_ends: tuple[int, ...] = ()  # a sequential study: the trial index where each seed batch ends

    @property
    def n_batches(self) -> int:
        return len(self.batch_ends)

    def opened(self, batches: int) -> SweepPlan:
        """The first `batches` seed batches of a sequential study: a prefix of trials and units."""
        end = self.batch_ends[batches - 1]
        units = tuple(u for u in self.units if u[-1] < end)
        return SweepPlan(self.spec, self.trials[:end], units, self.batch_ends[:batches])

    def batch(self, index: int) -> SweepPlan:
        """One seed batch alone (what one Tune experiment runs); its units index its own trials."""
        start = self.batch_ends[index - 1] if index else 0
        end = self.batch_ends[index]
        units = tuple(tuple(i - start for i in u) for u in self.units if start <= u[0] < end)
        return SweepPlan(self.spec, self.trials[start:end], units)

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
        **trial.source_seeds(),
        **trial.lineage(),
    }


# Loading: safe YAML in, nested dicts out (specs and `lottery train`'s trial YAML), and dotted
# `key=value` overrides for the command line.


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is refused: PyYAML keeps the
    last one silently, so `epochs: 10` ... `epochs: 8` would train 8 epochs without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat keys on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = lines.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if first != key_node.start_mark.line + 1:
                raise UserError(
                    f"{key}: set twice, on lines {first} and {key_node.start_mark.line + 1} "
                    "(YAML would keep only the last); keep one"
                )
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise UserError(f"config: {path} is a directory; give the YAML file itself")
    if not path.is_file():
        raise UserError(f"config: no such file {path}")
    try:
        text = path.read_bytes().decode("utf-8")
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
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
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise UserError(
                f"--set {item!r}: the value is not a YAML value ({getattr(exc, 'problem', exc)}); quote it"
            ) from None
        set_dotted(doc, key.strip(), value)
    return doc


def load_spec(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """The spec at `path`, with `lottery sweep --set FIELD=VALUE` overrides applied, validated."""
    doc = load_yaml(path)
    if not doc:
        raise UserError(f"spec: {path} is empty; a sweep spec needs name, seeds and schemes (see configs/)")
    doc = apply_overrides(doc, list(overrides))
    try:
        return SweepSpec.model_validate(doc)
    except ValidationError as exc:
        error = exc.errors()[0]
        if error["loc"][:1] in (("sequential",), ("factorial",)) and error["loc"][0] not in doc:
            error = error | {"loc": ("seeds", *error["loc"][1:])}  # written inside seeds
        raise UserError(_describe(error, len(exc.errors()), model=SweepSpec)) from None


def load_plan(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepPlan:
    """A spec file's plan. The trial cap applies to a spec given now, not to one a sweep recorded
    (`lottery sync` expands spec.json as it was accepted)."""
    spec = with_code_folder(load_spec(path, overrides), path.resolve().parent)
    check_trial_count(spec)
    return expand(spec)


def with_code_folder(spec: SweepSpec, folder: Path) -> SweepSpec:
    """A relative `model.builder` / `data.loader` file resolves against the spec's folder: that folder
    travels as the section's base_dir (no part of the trial key, so moving the folder keeps the keys)."""
    base = copy.deepcopy(spec.base)
    for section, field in (("model", "builder"), ("data", "loader")):
        doc = base.get(section)
        if isinstance(doc, dict) and doc.get(field) and "base_dir" not in doc:
            doc["base_dir"] = str(folder)
    return spec if base == spec.base else spec.model_copy(update={"base": base})


def expand(spec: SweepSpec) -> SweepPlan:
    """Every (scheme entry, grid combination) validated once, then crossed with the seeds."""
    _check_sequential(spec)
    configs: list[TrialConfig] = []
    cells = spec.seed_cells()
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
            configs += [_in_cell(config, cell, index) for cell in cells]
    if spec.sequential is None:
        trials = [config.with_seed(seed) for config in _with_children(spec, configs) for seed in spec.seeds]
        return SweepPlan(spec=spec, trials=tuple(trials), units=pack_units(spec, trials))
    trials, units, ends = [], [], []
    size = spec.sequential.batch
    for start in range(0, len(spec.seeds), size):  # batch first, so k batches are a prefix of the plan
        batch = [config.with_seed(seed) for config in configs for seed in spec.seeds[start : start + size]]
        units += [tuple(len(trials) + i for i in unit) for unit in pack_units(spec, batch)]
        trials += batch
        ends.append(len(trials))
    return SweepPlan(spec=spec, trials=tuple(trials), units=tuple(units), batch_ends=tuple(ends))


def _with_children(spec: SweepSpec, configs: list[TrialConfig]) -> list[TrialConfig]:
    """Each configuration followed by its fate-clock children, when the spec forks."""
    if spec.fork is None:
        return configs
    out = []
    for config in configs:
        if config.scheme.name in UNFORKABLE_SCHEMES:
            raise UserError(
                f"fork: scheme {config.scheme.name} cannot fork (its trained state is not the net's "
                "weights); fork baseline, batchnorm, randomout or repr, or drop fork"
            )
        out += [config, *spec.fork.children_of(config)]
    return out


def _in_cell(config: TrialConfig, cell: dict[str, int], index: int) -> TrialConfig:
    """The configuration in one cell of a seed factorial (validated: an augment seed needs augmentation)."""
    if not cell:
        return config
    if "augment_seed" in cell and config.data.augment == "none":
        raise UserError(
            f"seeds.augment: schemes[{index}] trains with data.augment: none, so augment seeds change "
            "nothing; set data.augment: crop_flip in base or leave augment out of seeds"
        )
    return config.model_copy(update=cell)


def check_trial_count(spec: SweepSpec) -> None:
    """Refuse a plan of more than max_trials trials, counted from the grid sizes before any is built (a
    1,020,000-trial grid took minutes and gigabytes to expand and print before it could be refused)."""
    top = math.prod(len(values) for values in spec.grid.values())
    configs = sum(top * math.prod(len(values) for values in e.grid.values()) for e in spec.schemes)
    cells = len(spec.seed_cells())
    family = 1 + (len(spec.fork.at) * spec.fork.children if spec.fork else 0)  # a parent and its children
    trials = configs * len(spec.seeds) * cells * family
    if trials > spec.max_trials:
        crossed = f" x {cells:,} seed cells ({spec.factorial.describe()})" if spec.factorial else ""
        crossed += f" x {family} (a parent and its fate-clock children)" if spec.fork else ""
        raise UserError(
            f"max_trials: this spec plans {trials:,} trials ({configs:,} configurations x "
            f"{len(spec.seeds):,} seeds{crossed}), more than max_trials {spec.max_trials:,}; shrink the "
            f"grid or the seeds, or set max_trials: {trials} in the spec to run them all"
        )


def _check_sequential(spec: SweepSpec) -> None:
    """What a sequential study's fields mean together: a batch within max, a rule over named schemes."""
    if spec.sequential is None:
        return
    if spec.fork is not None:
        raise UserError("fork: a sequential study cannot fork yet; drop fork or the study's batch and until")
    rule = spec.sequential.until
    if isinstance(rule, VarianceShareRule):
        factorial = spec.factorial
        needs = {"order": "order", "augment": "augment"}.get(rule.source)
        if factorial is None or (needs and not getattr(factorial, needs)):
            raise UserError(
                f"seeds.until.variance_share_ci_width.source: {rule.source} is not split in this study; "
                f"split it in seeds (seeds: {{init: [...], {needs or 'order'}: [...]}})"
            )
        if rule.source == "nondeterminism" and factorial.replicates < 2:
            raise UserError(
                "seeds.until.variance_share_ci_width.source: nondeterminism needs replicates >= 2 in seeds"
            )
    if spec.sequential.batch > len(spec.seeds):
        raise UserError(
            f"seeds.batch: {spec.sequential.batch} seeds per batch but max is {len(spec.seeds)}; "
            "lower batch or raise max"
        )
    rule = spec.sequential.until
    if isinstance(rule, PairedRule):
        names = list(dict.fromkeys(e.name for e in spec.schemes))
        for field, name in (("scheme", rule.scheme), ("vs", rule.vs)):
            if name not in names:
                raise UserError(
                    f"seeds.until.paired.{field}: no scheme {name!r} in this spec's schemes "
                    f"({', '.join(names)}); name one of them"
                )
        if rule.scheme == rule.vs:
            raise UserError(f"seeds.until.paired.vs: compares {rule.scheme} with itself; name another scheme")


def pack_units(spec: SweepSpec, trials: list[TrialConfig]) -> tuple[tuple[int, ...], ...]:
    """Consecutive seeds of one configuration, chunked into packs; models that cannot pack run alone."""
    units: list[tuple[int, ...]] = []
    start = 0
    while start < len(trials):
        config = trials[start]
        end = start
        while end < len(trials) and trials[end].pack_hash() == config.pack_hash():
            end += 1
        size = _pack_size(spec.pack_size, config)
        units += [tuple(range(i, min(i + size, end))) for i in range(start, end, size)]
        start = end
    return tuple(units)


def _pack_size(requested: int | str, config: TrialConfig) -> int:
    # torch, imported once a spec has validated: a mistake in it is reported without loading torch.
    from trainers.loop import can_pack
    from trainers.pack import auto_pack_size

    if requested == 1:
        return 1
    parameters = None
    if config.model.name == "custom":  # a generic pack, where vmap batches the net (checked once per net)
        from trainers.packcheck import custom_pack_check

        check = custom_pack_check(config)
        if check.problem is not None:
            return 1
        parameters = check.parameters
    elif not can_pack(config):
        return 1
    if requested == "auto":
        return auto_pack_size(
            config.model.name,
            config.model.filters,
            config.uses_batchnorm,
            config.model.hidden_fc,
            images_per_step=None if config.full_batch else config.batch_size,
            device=config.device,
            parameters=parameters,
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


def _unknown_top_level(name: str) -> str:
    """A misspelt top-level field, or a misspelt trial field (`epoch`) that belongs under base."""
    own = did_you_mean(name, SweepSpec.model_fields)
    trial = did_you_mean(name, [f for f in TrialConfig.model_fields if _trial_field(f)])
    if own or not trial:
        return unknown_field_message(SweepSpec, (name,))
    meant = trial.removeprefix("; did you mean '").removesuffix("'?")
    return f"unknown field at the top level; did you mean base.{meant}? (trial fields go under base:)"


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
    elif error["type"] == "extra_forbidden" and model is SweepSpec and len(loc) == 1:
        message = _unknown_top_level(str(loc[0]))
    elif error["type"] == "string_pattern_mismatch" and loc == ("name",):
        message = f"a sweep name is {NAME_RULE} (got {error['input']!r})"
    elif error["type"] == "extra_forbidden":
        message = unknown_field_message(model, loc)
    else:
        message = plain_message(error, message)
    more = f" (and {count - 1} more)" if count > 1 else ""
    return f"{field}: {message}{more}"
