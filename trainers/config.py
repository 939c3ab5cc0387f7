"""Typed, validated configuration of one trial.

Every knob lives here so a trial is fully described by one JSON document: the
trial key (run identity) and the config hash (identity minus the seed) are
hashes of it. New knobs must default to a no-op so old keys stay valid.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# "custom": the user's own loader / builder, named by `loader` / `builder` (trainers/custom.py).
DatasetName = Literal["digits", "synthetic", "craters", "cifar10", "mnist", "imagefolder", "custom"]
ModelName = Literal["crater_cnn", "inception28", "vanilla_cnn", "resnet20", "custom"]
InitName = Literal["uniform0.01", "xavier", "kaiming"]
ReprMetric = Literal["ortho", "weight", "cgn", "taylor", "apoz", "activation", "random", "oracle"]


DEFAULT_TAU = 1e-8  # RandomOut's "tau = 10^-8 yielded good results" (§2)
# The largest seed or data_seed: results are tables with int64 columns (a seed of 2**63 trained, then
# failed writing its first epoch's metrics).
MAX_SEED = 2**63 - 1


class Strict(BaseModel):
    """Base for every config: unknown fields are errors, not silently ignored; no number is infinite
    or NaN (`lr: .inf` passed `gt=0` and every trial "diverged" into the failure rate)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(Strict):
    name: DatasetName = "digits"
    data_dir: Path | None = None  # where craters/cifar10/mnist/imagefolder live; env LOTTERY_DATA_DIR
    image_size: int | None = Field(None, ge=4, le=256)  # resize (craters: 15 as in the paper, 28 native)
    val_fraction: float = Field(0.0, ge=0.0, lt=0.9)  # held out of train by data_seed (RePr oracle)
    download: bool = False  # torchvision datasets only; never implicit
    synthetic_samples: int = Field(2000, ge=20)  # size of the generated dataset
    # standard: (x - train mean) / train std per channel. mean_image: the RandomOut reference's input,
    # the train split's per-pixel mean image subtracted on the pixel scale, no division, so CGN and
    # the paper's tau keep the reference's scale (see trainers/data.py).
    normalize: Literal["standard", "mean_image"] = "standard"
    # Training minibatches only, drawn from data_seed so schemes stay paired (trainers/augment.py).
    augment: Literal["none", "crop_flip"] = "none"
    # name: custom. "package.module:function" or "path/to/file.py:function", called as
    # function(**kwargs) -> (train_x, train_y, test_x, test_y); see trainers/custom.py.
    loader: str | None = Field(None, validate_default=True)
    kwargs: dict[str, Any] = {}  # passed to the loader; part of the trial key
    # Where a relative `loader` file resolves: the spec's folder (set when the spec is loaded). Where
    # the code is, not what it is, so it is no part of the trial key (as data_dir is not).
    base_dir: Path | None = None

    @field_validator("loader", "kwargs")
    @classmethod
    def _custom_parts(cls, value: Any, info: ValidationInfo) -> Any:
        return _check_custom("data", value, info)


class ModelConfig(Strict):
    name: ModelName = "crater_cnn"
    filters: int = Field(20, ge=1, le=4096)  # crater_cnn: filters per conv; vanilla_cnn: X in C^n(X)
    depth: int = Field(3, ge=1, le=64)  # vanilla_cnn: n in C^n(X)
    hidden_fc: int = Field(500, ge=0)  # crater_cnn: hidden FC width (0 = none)
    padding: int = Field(1, ge=0, le=3)  # crater_cnn conv padding
    init: InitName = "uniform0.01"  # the reference code's default initializer
    batchnorm: bool = False  # BN after every conv under any scheme (the `batchnorm` scheme implies it)
    # name: custom. "package.module:function" or "path/to/file.py:function", called as
    # function(in_channels=C, num_classes=K, image_size=S, **kwargs) -> nn.Module; see trainers/custom.py.
    builder: str | None = Field(None, validate_default=True)
    kwargs: dict[str, Any] = {}  # passed to the builder; part of the trial key
    base_dir: Path | None = None  # where a relative `builder` file resolves (see DataConfig.base_dir)

    @field_validator("builder", "kwargs")
    @classmethod
    def _custom_parts(cls, value: Any, info: ValidationInfo) -> Any:
        return _check_custom("model", value, info)


def _check_custom(section: str, value: Any, info: ValidationInfo) -> Any:
    """A data or model section's `builder`/`loader` and `kwargs`: both belong to `name: custom` only."""
    name = info.data.get("name")
    if info.field_name == "kwargs":
        return _check_kwargs(section, name, value)
    return _check_target(section, name, str(info.field_name), value)


def _check_target(section: str, name: str | None, field: str, target: str | None) -> str | None:
    """`name: custom` and its `builder`/`loader` come together; built-ins take neither."""
    if name == "custom" and not target:
        raise ValueError(
            f"{section} 'custom' needs a {field}, as \"package.module:function\" or "
            '"path/to/file.py:function"'
        )
    if name != "custom" and target:
        raise ValueError(f"only {section} 'custom' takes a {field}; set {section}.name: custom")
    if target is not None and (target.count(":") != 1 or not all(target.split(":"))):
        raise ValueError(f'{target!r} is not "package.module:function" or "path/to/file.py:function"')
    return target


def _check_kwargs(section: str, name: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    if kwargs and name != "custom":
        raise ValueError(f"only {section} 'custom' takes kwargs; set {section}.name: custom")
    return kwargs


class OptimConfig(Strict):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)  # sgd only
    weight_decay: float = Field(0.0, ge=0.0)


class BaselineScheme(Strict):
    name: Literal["baseline"] = "baseline"


class BatchNormScheme(Strict):
    """The same model with BatchNorm after every conv (reference BN: gamma fixed at 1, eps 1e-3)."""

    name: Literal["batchnorm"] = "batchnorm"


class RandomOutScheme(Strict):
    resets_filters: ClassVar[bool] = True  # acts only by resets: 0 resets means it never acted
    name: Literal["randomout"] = "randomout"
    tau: float = Field(DEFAULT_TAU, ge=0.0)  # CGN threshold, in summed-loss units (see trainers/cgn.py)
    active_fraction: float = Field(1.0, ge=0.0, le=1.0)  # P: resets allowed while epoch < P * epochs
    reset_optimizer_state: bool = False
    reset_bias: bool = False
    # keep: as the paper; zero: also zero the weights that read a reset filter, with their optimizer state
    outgoing: Literal["keep", "zero"] = "keep"


class RedoScheme(Strict):
    """ReDo (Sokar, Agarwal, Castro, Evci, ICML 2023; trainers/schemes/redo.py): every `every` steps a
    filter whose normalised mean |activation| s_i = a_i / mean_k a_k is <= `tau` (dormant) gets fresh
    incoming weights and zero outgoing ones. Defaults: the paper's period (1000 steps) and its tau for
    high replay ratios (0.1; 0.025 in its default setting), as timoklein/redo's src/config.py has them."""

    resets_filters: ClassVar[bool] = True
    name: Literal["redo"] = "redo"
    tau: float = Field(0.1, ge=0.0)  # dormant when the normalised score s_i <= tau (0: exactly dead)
    every: int = Field(1000, ge=1)  # optimizer steps between checks (the reference's reset_period)


class CbpScheme(Strict):
    """Continual backprop (Dohare et al., Nature 2024; trainers/schemes/cbp.py): a running contribution
    utility per filter; each step a fraction `replacement_rate` of the filters older than `maturity`
    steps (fractions accumulate) with the lowest utility get fresh incoming and zero outgoing weights.
    Defaults: the reference's conv generate-and-test (lop/algos/convGnT.py)."""

    resets_filters: ClassVar[bool] = True
    name: Literal["cbp"] = "cbp"
    replacement_rate: float = Field(1e-4, ge=0.0, le=1.0)  # rho, per eligible filter per step
    maturity: int = Field(100, ge=0)  # m: filters of age <= m are never replaced
    decay: float = Field(0.99, ge=0.0, lt=1.0)  # eta of the utility's running average


class ReprScheme(Strict):
    name: Literal["repr"] = "repr"
    s1: int = Field(20, ge=1)  # epochs of full training before each drop
    s2: int = Field(10, ge=1)  # epochs of sub-network training while filters are dropped
    n_iter: int = Field(3, ge=1)  # N drop/re-introduce cycles
    drop_fraction: float = Field(0.3, gt=0.0, lt=1.0)  # p, ranked globally
    # p counts the eligible filters (first layer excluded unless include_first_layer) or all of them;
    # only eligible filters are dropped either way.
    drop_fraction_of: Literal["eligible", "all"] = "eligible"
    metric: ReprMetric = "ortho"
    include_first_layer: bool = False
    reset_optimizer_state: bool = True
    # Filter layers (module paths, trainers/filters.py) never dropped, as fnmatch globs: ["stem.*", "head"].
    # Their filters still count for drop_fraction_of "all". Each pattern must match some conv layer.
    exclude_layers: list[str] = []


class ImpScheme(Strict):
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; trainers/schemes/imp.py).

    A trial trains `rounds + 1` rounds of `epochs` each: round 0 dense, then each round prunes
    `rate` of the remaining conv/linear weights by magnitude, rewinds the survivors to their values
    after `rewind_step` optimizer steps of round 0 and retrains with a fresh optimizer state.
    `reinit: true` is the ticket control: the same masks (found by the rewound path, retrained
    inside the trial) with a fresh initialisation, the one a trial of seed + `reinit_offset` starts from.
    """

    name: Literal["imp"] = "imp"
    rounds: int = Field(3, ge=1)  # pruning rounds after the dense round 0
    rate: float = Field(0.2, gt=0.0, lt=1.0)  # fraction of the remaining weights pruned per round
    scope: Literal["layer", "global"] = "layer"  # rank within each layer, or over all pruned layers
    layers: Literal["all", "conv", "linear"] = "all"  # which weights are pruned (biases never are)
    rewind_step: int = Field(0, ge=0)  # 0: the original initialisation (the LTH setting)
    reinit: bool = False  # the ticket control: same masks, fresh init from seed + reinit_offset
    reinit_offset: int = Field(1_000_003, ge=1)

    def phases(self) -> list[tuple[int, bool]]:
        """(round, from a fresh init) per phase of `epochs` epochs. The control retrains the rewound
        path (which finds the next mask) between its own fresh-init rounds: 0, 1*, 1, 2*, ..., R*."""
        if not self.reinit:
            return [(r, False) for r in range(self.rounds + 1)]
        path = [(0, False)]
        for r in range(1, self.rounds + 1):
            path += [(r, True)] + ([(r, False)] if r < self.rounds else [])
        return path


class EdgePopupScheme(Strict):
    """Edge-popup (Ramanujan et al. 2020; trainers/schemes/edgepopup.py): frozen random weights, a
    trained score per weight, and in each conv/linear layer the top `k` fraction of |score| kept."""

    name: Literal["edgepopup"] = "edgepopup"
    k: float = Field(0.5, gt=0.0, le=1.0)  # fraction of each layer's weights KEPT (their `prune_rate`)
    weights: Literal["signed_constant", "kaiming_normal"] = "signed_constant"


Scheme = Annotated[
    BaselineScheme
    | BatchNormScheme
    | RandomOutScheme
    | ReprScheme
    | ImpScheme
    | EdgePopupScheme
    | RedoScheme
    | CbpScheme,
    Field(discriminator="name"),
]
# The scheme configs and their names, in the union's order, without importing torch (the CLI's help, spec
# checks and docs/spec-reference.md need only these); trainers.schemes.REGISTRY holds an
# implementation for each, and a test keeps them equal.
SCHEME_MODELS: tuple[type[Strict], ...] = get_args(get_args(Scheme)[0])
SCHEMES: tuple[str, ...] = tuple(c.model_fields["name"].default for c in SCHEME_MODELS)
# Schemes that act on the net only by re-initialising filters: an arm of one that made no reset in any
# trial trained exactly as its baseline, and its gains are 0 by construction (said with every summary).
# Not RePr: it also acts by dropping filters, which its reset count does not see.
RESETTING_SCHEMES: tuple[str, ...] = tuple(
    c.model_fields["name"].default for c in SCHEME_MODELS if getattr(c, "resets_filters", False)
)
# Nets whose filters each feed one known layer (the next conv, or the first linear after the flatten),
# so a reset filter's outgoing weights can be zeroed (trainers/outgoing.py finds them). Skip paths
# (resnet20), concatenations (inception28) and custom nets are refused for it before training.
ZERO_OUTGOING_MODELS: tuple[str, ...] = ("crater_cnn", "vanilla_cnn")
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)  # trainers.models.MODELS builds each; a test checks
DATASET_NAMES: tuple[str, ...] = get_args(DatasetName)  # trainers.data loads each; a test checks


def zeroes_outgoing(scheme: BaseModel) -> bool:
    """Whether the scheme zeroes a reset filter's outgoing weights (redo, cbp, randomout `outgoing: zero`)."""
    return isinstance(scheme, RedoScheme | CbpScheme) or getattr(scheme, "outgoing", "keep") == "zero"


class TrialConfig(Strict):
    """One (scheme, hyperparameters, seed): the unit of work and of MLflow runs."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    scheme: Scheme = BaselineScheme()
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)  # 0 is not allowed; use full_batch for one step per epoch
    full_batch: bool = False  # RandomOut Fig. 6: one update per epoch
    seed: int = Field(0, ge=0, le=MAX_SEED)  # initialization and the scheme's random draws
    data_seed: int = Field(0, ge=0, le=MAX_SEED)  # split and batch order; kept apart from seed on purpose
    # The CGN threshold of the "below tau" counts. A randomout trial has one threshold for its resets
    # and its counts, and it lives in scheme.tau: `_one_tau` routes a tau given in the other place.
    tau: float = Field(DEFAULT_TAU, ge=0.0)
    failure_margin: float = Field(0.05, ge=0.0, lt=1.0)  # failed if test acc <= chance + margin
    trace_every: int = Field(0, ge=0)  # 0: per-epoch mean CGN per filter; K: also every K steps
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("scheme", mode="before")
    @classmethod
    def _scheme_from_name(cls, value: object) -> object:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _one_tau(cls, doc: object) -> object:
        """Each trial holds its threshold in exactly one field: scheme.tau for randomout (which resets
        at it), the trial's `tau` otherwise. A trial-level `tau` on a randomout trial (`lottery train
        --scheme randomout --tau X`) moves into scheme.tau; given in both places with different values
        it is an error rather than a silent choice."""
        if not isinstance(doc, dict) or "tau" not in doc:
            return doc
        scheme = doc.get("scheme")
        scheme = {"name": scheme} if isinstance(scheme, str) else scheme
        if not isinstance(scheme, dict) or scheme.get("name") != "randomout":
            return doc
        doc, scheme = dict(doc), dict(scheme)
        value = doc.pop("tau")
        # A saved config (model_dump) carries the default trial-level tau beside scheme.tau: not a second one.
        if "tau" not in scheme:
            scheme["tau"] = value
        elif value not in (scheme["tau"], DEFAULT_TAU):
            raise ValueError(f"tau: given twice ({value} and {scheme['tau']}); set it once, as scheme.tau")
        doc["scheme"] = scheme
        return doc

    @model_validator(mode="after")
    def _check_consistency(self) -> TrialConfig:
        scheme = self.scheme
        if isinstance(scheme, ReprScheme):
            cycle_end = scheme.n_iter * (scheme.s1 + scheme.s2)
            if cycle_end > self.epochs:
                raise ValueError(
                    f"scheme.n_iter * (s1 + s2) = {cycle_end} exceeds epochs = {self.epochs}; "
                    "raise epochs or shorten the RePr schedule"
                )
            if scheme.metric == "oracle" and self.data.val_fraction <= 0:
                raise ValueError("scheme.metric 'oracle' needs data.val_fraction > 0 (a held-out split)")
        if zeroes_outgoing(scheme) and self.model.name not in ZERO_OUTGOING_MODELS:
            nets = " or ".join(ZERO_OUTGOING_MODELS)
            if isinstance(scheme, RandomOutScheme):
                raise ValueError(
                    f"scheme.outgoing: 'zero' needs a net whose filters each feed one known layer "
                    f"(model.name {nets}), not {self.model.name}; use outgoing: keep"
                )
            raise ValueError(
                f"scheme: {scheme.name} zeroes a reset filter's outgoing weights, which needs a net whose "
                f"filters each feed one known layer (model.name {nets}), not {self.model.name}"
            )
        return self

    @property
    def total_epochs(self) -> int:
        """Epochs the trial trains: `epochs` per IMP phase (see ImpScheme.phases), else `epochs`."""
        if isinstance(self.scheme, ImpScheme):
            return self.epochs * len(self.scheme.phases())
        return self.epochs

    def reference_hash(self) -> str | None:
        """config_hash of the trial this one is compared with seed by seed, when it is not the
        `baseline` of its pair_key: the IMP ticket control is compared with the rewound IMP."""
        if isinstance(self.scheme, ImpScheme) and self.scheme.reinit:
            rewound = self.scheme.model_copy(update={"reinit": False})
            return self.model_copy(update={"scheme": rewound}).config_hash()
        return None

    @property
    def count_tau(self) -> float:
        """The trial's one CGN threshold: RandomOut's reset tau (so Fig. 8 counts its resets), else `tau`."""
        return self.scheme.tau if isinstance(self.scheme, RandomOutScheme) else self.tau

    @property
    def uses_batchnorm(self) -> bool:
        """resnet20 always has BN (part of the architecture), so it is true there under every scheme."""
        return self.scheme.name == "batchnorm" or self.model.batchnorm or self.model.name == "resnet20"

    def with_seed(self, seed: int) -> TrialConfig:
        return self.model_copy(update={"seed": seed})

    def identity(self, *, include_seed: bool = True) -> dict:
        """The fields that define the result; data_dir and device are where/how, not what."""
        doc = self.model_dump(mode="json", exclude_defaults=True, exclude={"device": True})
        doc.setdefault("data", {}).pop("data_dir", None)
        doc.get("data", {}).pop("download", None)
        doc.get("data", {}).pop("base_dir", None)
        doc.get("model", {}).pop("base_dir", None)
        doc["scheme"] = self.scheme.model_dump(mode="json", exclude_defaults=True) | {
            "name": self.scheme.name
        }
        doc.pop("seed", None)
        if include_seed:
            doc["seed"] = self.seed  # always present: a default-valued seed must still name its trial
        return doc

    def scheme_hparams(self) -> dict:
        return self.scheme.model_dump(mode="json", exclude={"name"})

    def hparam_label(self) -> str:
        """Short label of the scheme's non-default hyperparameters ("" for none)."""
        changed = self.scheme.model_dump(mode="json", exclude={"name"}, exclude_defaults=True)
        return " ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(changed.items())
        )

    def pair_key(self) -> str:
        """Identity minus seed and scheme: trials with equal pair_key and seed are paired across schemes."""
        doc = self.identity(include_seed=False)
        doc.pop("scheme", None)
        return _short_hash(doc)

    def trial_key(self) -> str:
        return _short_hash(self.identity(include_seed=True))

    def config_hash(self) -> str:
        return _short_hash(self.identity(include_seed=False))


def _short_hash(doc: dict) -> str:
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
