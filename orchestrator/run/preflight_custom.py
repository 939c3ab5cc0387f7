"""Checks of the user's own network (`model: {name: custom, builder: ...}`) before anything starts.

Each distinct custom net is built once against its data, with the first seed of the plan, and run on
one batch: an import error, a builder that fails or returns no Module, logits of the wrong shape,
or a filter scheme on a net without nn.Conv2d (baseline still runs) is one line naming the field
(exit 2), instead of every trial failing inside Ray. The loader's own checks run when the data is loaded
(`check_local_data`, trainers/custom.py).

The builder's source hash is provenance, not identity: a finished trial whose stored hash differs
from the file now on disk was trained by other code, and is refused (or, with --retrain-changed,
set aside and trained again) as a result of changed data is.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import layout
from orchestrator.errors import UserError

if TYPE_CHECKING:
    from orchestrator.spec import SweepPlan
    from trainers.config import TrialConfig

ONE_BATCH = 2  # images run through a freshly built net to check its output shape
NO_FILTER_SCHEMES = ("baseline",)  # schemes that run on a net without nn.Conv2d


def check_custom_models(
    plan: SweepPlan, sweep_dir: Path, *, local: bool, retrain_changed: bool
) -> list[tuple[Path, str]]:
    """Build and run each custom net once; returns the finished trials trained by an edited builder
    (only with `retrain_changed`; otherwise they are refused in one line)."""
    return check_custom_trials(list(plan.trials), sweep_dir, local=local, retrain_changed=retrain_changed)


def check_custom_trials(
    trials: list[TrialConfig], sweep_dir: Path, *, local: bool, retrain_changed: bool
) -> list[tuple[Path, str]]:
    """check_custom_models for any trials whose directories live under `sweep_dir` (`lottery train`'s
    own directory included)."""
    custom = [t for t in trials if t.model.name == "custom"]
    if not custom:
        return []
    seen: dict[str, str] = {}
    for trial in custom:
        key = trial.model.model_dump_json() + trial.data.model_dump_json() + str(trial.uses_batchnorm)
        if key not in seen:
            seen[key] = _check_net(trial, local=local)
        _check_filters(trial, seen[key])
    return _stored_on_other_code(custom, sweep_dir, retrain_changed=retrain_changed)


def _check_net(trial: TrialConfig, *, local: bool) -> str:
    """Build the net against its data and run one batch; returns the net's conv summary ("" if none)."""
    import torch

    from trainers.custom import CustomCodeError, conv_count
    from trainers.data import load_data
    from trainers.errors import DataError
    from trainers.models import build_model, derive_seeds

    field = "base.model.builder"
    try:
        data = load_data(trial.data, trial.data_seed, torch.device("cpu"))
    except DataError as exc:
        if local or trial.data.name == "custom":
            raise UserError(f"base.{exc}" if not str(exc).startswith("base.") else str(exc)) from None
        return "unchecked"  # a cluster's data may live on its workers only: they check it there
    try:
        model = build_model(
            trial.model,
            in_channels=data.in_channels,
            image_size=data.image_size,
            num_classes=data.num_classes,
            batchnorm=trial.uses_batchnorm,
            generator=torch.Generator().manual_seed(derive_seeds(trial.seed)[0]),
        )
    except (CustomCodeError, ValueError, TypeError) as exc:
        raise UserError(f"base.{exc}" if not str(exc).startswith("base.") else str(exc)) from None
    x = data.x_train[:ONE_BATCH]
    shape = f"{len(x)} x {data.in_channels} x {data.image_size} x {data.image_size}"
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:
        message = " ".join(str(exc).split())
        raise UserError(f"{field}: the net fails on one batch of {shape} images: {message}") from None
    wanted = (len(x), data.num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != wanted:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(
            f"{field}: the net maps {shape} images to {got}, not N x K logits {wanted} "
            f"({data.num_classes} classes); end it in a layer with num_classes outputs"
        )
    convs, filters = conv_count(model)
    return f"{convs} conv layers, {filters} filters" if convs else ""


def _check_filters(trial: TrialConfig, convs: str) -> None:
    """A filter scheme needs filters; baseline does not: on a net without nn.Conv2d it trains with an
    empty per-layer filter record (no CGN, no traces), which is still a seed's accuracy."""
    if convs == "" and trial.scheme.name not in NO_FILTER_SCHEMES:
        raise UserError(
            f"base.model.builder: {trial.model.builder} has no nn.Conv2d, so scheme {trial.scheme.name} "
            f"has no filters to work on; add a conv layer, or run only {', '.join(NO_FILTER_SCHEMES)}"
        )


def _stored_on_other_code(
    trials: list[TrialConfig], sweep_dir: Path, *, retrain_changed: bool
) -> list[tuple[Path, str]]:
    from trainers.custom import CustomCodeError, file_path, is_file_target, resolve

    if not layout.trials_root(sweep_dir).exists():
        return []
    current: dict[str, str] = {}
    changed: list[tuple[Path, str]] = []
    for trial in trials:
        builder = trial.model.builder or ""
        where = str(file_path(builder, trial.model.base_dir)) if is_file_target(builder) else builder
        if where not in current:
            try:
                current[where] = resolve(builder, trial.model.base_dir, "model.builder").sha256
            except CustomCodeError as exc:
                raise UserError(f"base.{exc}") from None
        directory = layout.trial_dir(sweep_dir, trial.trial_key())
        result = layout.trial_status(directory).result if directory.exists() else None
        if result is not None and result.get("builder_sha256") != current[where]:
            changed.append((directory, str(result.get("builder_sha256", ""))))
    if changed and not retrain_changed:
        directory, old = changed[0]
        others = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise UserError(
            f"base.model.builder: the stored result of trial {directory.name}{others} was trained by other "
            f"code (source sha256 {old[:12] or 'not recorded'}, {where} now: {current[where][:12]}); "
            "pass --retrain-changed to set those results aside and train again, or restore that file"
        )
    return changed
