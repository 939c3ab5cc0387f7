"""Typed, validated configuration of one trial.

Every knob lives here so a trial is fully described by one JSON document: the
trial key (run identity) and the config hash (identity minus the seed) are
hashes of it. New knobs must default to a no-op so old keys stay valid.

Longer than the ~450 lines a module usually gets, on purpose: every knob of a trial and the identities
hashed from them (trial key, arm, pair, pack) are one contract, and a knob split from its validators
and its place in those hashes is how a key silently changes.
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
    tau: float = Field(DEFAULT_TAU, ge=0.0)  # CGN threshold, in the units cgn_reduction names
    active_fraction: float = Field(1.0, ge=0.0, le=1.0)  # P: resets allowed while epoch < P * epochs
    # Which CGN tau is compared with. sum: the CGN of the minibatch's summed loss (B x that of the mean
    # loss), the MXNet reference's convention (trainers/cgn.py). mean: the CGN of the mean loss (CGN / B),
    # what a framework that averages the loss (the paper's crater nets ran in Deeplearning4j) computes.
    cgn_reduction: Literal["sum", "mean"] = "sum"
    # step: after every minibatch on that batch's CGN (the reference code). epoch: once per epoch, after
    # its evaluation, on each filter's mean CGN over the epoch (as the paper's Fig. 8 reads CGN); the
    # check after the last epoch is skipped (nothing would train or be evaluated after it).
    check_every: Literal["step", "epoch"] = "step"
    reset_optimizer_state: bool = False
    reset_bias: bool = False
    # keep: as the paper; zero: also zero the weights that read a reset filter, with their optimizer state
    outgoing: Literal["keep", "zero"] = "keep"


# What ReDo and continual backprop reset: conv filters only, or also the hidden linear layers' units
# (every linear layer's outputs but the last one's), unit-wise, as both papers do for dense layers.
ResetUnits = Literal["filters", "all"]


class RedoScheme(Strict):
    """ReDo (Sokar, Agarwal, Castro, Evci, ICML 2023; trainers/schemes/redo.py): every `every` steps a
    filter (and, with `units: all`, hidden linear unit) whose normalised mean |activation|
    s_i = a_i / mean_k a_k is <= `tau` (dormant) gets fresh incoming weights and zero outgoing ones.
    Defaults: the paper's period (1000 steps) and its tau for high replay ratios (0.1; 0.025 in its
    default setting), as timoklein/redo's src/config.py has them."""

    resets_filters: ClassVar[bool] = True
    name: Literal["redo"] = "redo"
    tau: float = Field(0.1, ge=0.0)  # dormant when the normalised score s_i <= tau (0: exactly dead)
    every: int = Field(1000, ge=1)  # optimizer steps between checks (the reference's reset_period)
    units: ResetUnits = "filters"  # filters: convs only; all: also hidden linear units (as the paper)


class CbpScheme(Strict):
    """Continual backprop (Dohare et al., Nature 2024; trainers/schemes/cbp.py): a running contribution
    utility per filter (and, with `units: all`, per hidden linear unit); each step a fraction
    `replacement_rate` of the filters older than `maturity`
    steps (fractions accumulate) with the lowest utility get fresh incoming and zero outgoing weights.
    Defaults: the reference's conv generate-and-test (lop/algos/convGnT.py)."""

    resets_filters: ClassVar[bool] = True
    name: Literal["cbp"] = "cbp"
    replacement_rate: float = Field(1e-4, ge=0.0, le=1.0)  # rho, per eligible filter per step
    maturity: int = Field(100, ge=0)  # m: filters of age <= m are never replaced
    decay: float = Field(0.99, ge=0.0, lt=1.0)  # eta of the utility's running average
    units: ResetUnits = "filters"  # filters: convs only; all: also hidden linear units (as the paper)


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

    The papers' conventions are options, each off by default (docs/schemes.md gives the sources):
    per-kind rates (`conv_rate`, `linear_rate`; Frankle & Carbin's Conv-2/4/6 prune conv layers
    slower than fc layers), the output layer (the last linear layer) at half the linear rate (their
    Fig. 2) or not pruned at all (OpenLTH's `pruning_layers_to_ignore`), and rewound rounds that end
    where round 0 ended (`round_steps: remaining`, OpenLTH's start step).
    """

    name: Literal["imp"] = "imp"
    rounds: int = Field(3, ge=1)  # pruning rounds after the dense round 0
    rate: float = Field(0.2, gt=0.0, lt=1.0)  # fraction of the remaining weights pruned per round
    scope: Literal["layer", "global"] = "layer"  # rank within each layer, or over all pruned layers
    layers: Literal["all", "conv", "linear"] = "all"  # which weights are pruned (biases never are)
    rewind_step: int = Field(0, ge=0)  # 0: the original initialisation (the LTH setting)
    reinit: bool = False  # the ticket control: same masks, fresh init from seed + reinit_offset
    reinit_offset: int = Field(1_000_003, ge=1)
    conv_rate: float | None = Field(None, gt=0.0, lt=1.0)  # each conv layer's rate; null: `rate`
    linear_rate: float | None = Field(None, gt=0.0, lt=1.0)  # each linear layer's rate; null: `rate`
    # The output layer (the last linear layer): pruned like the others (same), at half the linear
    # rate (half; Frankle & Carbin 2019) or never (exclude; OpenLTH's LeNet and VGG).
    output_layer: Literal["same", "half", "exclude"] = "same"
    # A rewound round trains all of round 0's T steps again from the rewind point (full), or the
    # T - rewind_step steps left, ending where round 0 ended (remaining; OpenLTH).
    round_steps: Literal["full", "remaining"] = "full"

    @field_validator("conv_rate", "linear_rate")
    @classmethod
    def _kind_rate_applies(cls, value: float | None, info: ValidationInfo) -> float | None:
        kind = (info.field_name or "").removesuffix("_rate")
        if value is not None and info.data.get("scope") == "global":
            raise ValueError(f"scope global ranks all layers at `rate`; set scope: layer or drop {kind}_rate")
        if value is not None and info.data.get("layers") not in ("all", kind):
            raise ValueError(f"layers {info.data.get('layers')} prunes no {kind} layer; drop {kind}_rate")
        return value

    @field_validator("output_layer")
    @classmethod
    def _output_layer_pruned(cls, value: str, info: ValidationInfo) -> str:
        if value != "same" and info.data.get("layers") == "conv":
            raise ValueError(
                "layers conv never prunes the output layer (the last linear layer); "
                "set output_layer: same or layers: all"
            )
        return value

    def kind_rate(self, kind: Literal["conv", "linear"]) -> float:
        """The per-round rate of a conv or linear layer (not the output layer's: see `output_rate`)."""
        rate = self.conv_rate if kind == "conv" else self.linear_rate
        return self.rate if rate is None else rate

    def output_rate(self) -> float | None:
        """The output layer's per-round rate; None when it is not pruned."""
        if self.output_layer == "exclude":
            return None
        return self.kind_rate("linear") / (2 if self.output_layer == "half" else 1)

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
# The trial's seeds besides the init seed `seed` (docs/seeds.md): the one list that the plan's rows,
# config.json, the trials table and the variance-by-source table take their columns from.
SOURCE_SEEDS: tuple[str, ...] = ("order_seed", "augment_seed", "replicate")
# A fate-clock child's columns in the plan, config.json and the trials tables (TrialConfig.lineage).
FORK_FIELDS: tuple[str, ...] = ("fork_at", "fork_child")
# Schemes that cannot fork: their trained state is not the net's weights (see TrialConfig._forkable).
UNFORKABLE_SCHEMES: tuple[str, ...] = ("imp", "edgepopup")
# Nets whose filters each feed one known layer (the next conv, or the first linear after the flatten),
# so a reset filter's outgoing weights can be zeroed (trainers/outgoing.py finds them). Skip paths
# (resnet20), concatenations (inception28) and custom nets are refused for it before training.
ZERO_OUTGOING_MODELS: tuple[str, ...] = ("crater_cnn", "vanilla_cnn")
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)  # trainers.models.MODELS builds each; a test checks
DATASET_NAMES: tuple[str, ...] = get_args(DatasetName)  # trainers.data loads each; a test checks


class ForkConfig(Strict):
    """A child of the fate clock (Frankle et al. 2020, "Linear mode connectivity and the lottery ticket
    hypothesis"): it trains its parent's first `at` fraction of steps exactly as the parent does (same
    init, batches and draws: bit-identical on CPU, so no checkpoint passes between trials), then goes
    on with batch order and augmentation of its own, drawn from `child` (trainers/fork.py)."""

    at: float = Field(ge=0.0, lt=1.0)  # fraction of the trial's optimizer steps shared with the parent
    child: int = Field(ge=1, le=1000)  # which child: its own streams after the fork


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
    seed: int = Field(0, ge=0, le=MAX_SEED)  # initialization and the scheme's random draws (the init seed)
    data_seed: int = Field(0, ge=0, le=MAX_SEED)  # split and batch order; kept apart from seed on purpose
    # The seed split by source (docs/seeds.md). None: batch order comes from data_seed's stream, as
    # before the split (so old trial keys hold). Set, data_seed is the split's seed alone.
    order_seed: int | None = Field(None, ge=0, le=MAX_SEED)
    # None: augmentation draws come from the batch-order stream (one stream, as before the split).
    augment_seed: int | None = Field(None, ge=0, le=MAX_SEED)
    # Repeats of identical seeds: changes no number, only the trial key, so nondeterminism shows.
    replicate: int = Field(0, ge=0, le=10_000)
    # A fate-clock child (ForkConfig); None: an ordinary trial, a parent of its children if forked.
    fork: ForkConfig | None = None
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
        if self.augment_seed is not None and self.data.augment == "none":
            raise ValueError(
                "augment_seed: data.augment is none, so an augmentation seed changes nothing; "
                "set data.augment: crop_flip or leave augment_seed out"
            )
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

    @model_validator(mode="after")
    def _forkable(self) -> TrialConfig:
        """A child is compared with its sibling along the straight line between their weights: a scheme
        whose weights are not the net's (edge-popup's scores, IMP's masks and rounds) has no such line."""
        if self.fork is not None and self.scheme.name in UNFORKABLE_SCHEMES:
            raise ValueError(
                f"fork: scheme {self.scheme.name} cannot fork (its trained state is not the net's weights); "
                "fork baseline, batchnorm, randomout or repr arms"
            )
        return self

    @property
    def total_epochs(self) -> int:
        """Epochs the trial trains: `epochs` per IMP phase (see ImpScheme.phases), else `epochs`. IMP
        with `round_steps: remaining` skips a later round's epochs before its rewind point (not
        trained or recorded), so its epoch numbers run to this count with gaps."""
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
        """The trial's one CGN threshold: RandomOut's reset tau (so Fig. 8 counts its resets), else `tau`;
        compared in `count_reduction` units."""
        return self.scheme.tau if isinstance(self.scheme, RandomOutScheme) else self.tau

    @property
    def count_reduction(self) -> Literal["sum", "mean"]:
        """The units `count_tau` is compared in: RandomOut's `cgn_reduction` (its counts and its resets
        read the same CGN), else summed-loss units."""
        return self.scheme.cgn_reduction if isinstance(self.scheme, RandomOutScheme) else "sum"

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

    def lineage(self) -> dict[str, float | int | None]:
        """FORK_FIELDS: where a fate-clock child forks and which child it is (None for a parent)."""
        return {
            "fork_at": self.fork.at if self.fork else None,
            "fork_child": self.fork.child if self.fork else None,
        }

    def source_seeds(self) -> dict[str, int | None]:
        """The seeds besides the init seed that a trial varies by source (SOURCE_SEEDS), as set."""
        return {name: getattr(self, name) for name in SOURCE_SEEDS}

    def scheme_hparams(self) -> dict:
        return self.scheme.model_dump(mode="json", exclude={"name"})

    def hparam_label(self) -> str:
        """Short label of the scheme's non-default hyperparameters ("" for none)."""
        changed = self.scheme.model_dump(mode="json", exclude={"name"}, exclude_defaults=True)
        return " ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(changed.items())
        )

    def pair_key(self) -> str:
        """Identity minus init seed and scheme: trials with equal pair_key and seed are paired across
        schemes. It keeps the order/augment seeds and replicate: a pair shares every source but the scheme."""
        doc = self.identity(include_seed=False)
        doc.pop("scheme", None)
        return _short_hash(doc)

    def trial_key(self) -> str:
        return _short_hash(self.identity(include_seed=True))

    def config_hash(self) -> str:
        """The arm: identity minus every seed (init, order, augment), replicate and fork, so an arm pools
        the trials of a seed factorial and holds its fate-clock children (aggregated apart from it).
        Equal to pack_hash for a trial that splits no seed and is no child."""
        doc = self.identity(include_seed=False)
        for name in (*SOURCE_SEEDS, "fork"):
            doc.pop(name, None)
        return _short_hash(doc)

    def pack_hash(self) -> str:
        """Identity minus the init seed: trials with equal pack_hash see the same batches and can
        train in one pack (a pack shares one batch order and one augmentation stream)."""
        return _short_hash(self.identity(include_seed=False))


def _short_hash(doc: dict) -> str:
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
