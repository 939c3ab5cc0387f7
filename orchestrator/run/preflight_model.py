"""Before a sweep starts, each distinct model meets its data's shape once on the driver.

A model that cannot take its input (crater_cnn with `padding: 0` on a 4x4 image) otherwise fails
inside every trial: Ray starts, every unit is retried `max_failures` times and the sweep ends with
every trial errored. The check builds each distinct (model, data shape) on torch's meta device and
runs one batch of zeros of the data's shape through it: shapes are checked, no memory is allocated
and nothing is initialised, so a model too large to train still costs nothing to check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.errors import UserError

if TYPE_CHECKING:
    from orchestrator.spec import SweepPlan
    from trainers.config import DataConfig, TrialConfig
    from trainers.data import LoadedData

PROBE_BATCH = 2  # two images, so a layer that mixes the batch (BatchNorm) sees a real batch


@dataclass(frozen=True)
class DataShape:
    in_channels: int
    image_size: int
    num_classes: int

    @classmethod
    def of(cls, data: LoadedData) -> DataShape:
        return cls(data.in_channels, data.image_size, data.num_classes)

    @classmethod
    def known(cls, cfg: DataConfig) -> DataShape | None:
        """A dataset's shape without loading it (trainers.data.NATIVE_SHAPES), or None if it varies."""
        from trainers.data import NATIVE_SHAPES

        if cfg.name not in NATIVE_SHAPES:
            return None
        channels, side, classes = NATIVE_SHAPES[cfg.name]
        return cls(channels, cfg.image_size or side, classes)


def known_shapes(plan: SweepPlan) -> dict[str, DataShape]:
    """The shapes of the plan's datasets that have a fixed one, keyed as check_models expects."""
    shapes = {}
    for trial in plan.trials:
        key = trial.data.model_dump_json()
        if key not in shapes and (shape := DataShape.known(trial.data)) is not None:
            shapes[key] = shape
    return shapes


def check_models(plan: SweepPlan, shapes: dict[str, DataShape]) -> None:
    """Each distinct model of the plan against its data's shape (`shapes`, keyed by the trial's data
    config as JSON; a dataset missing there is not checked). Raises UserError naming base.model."""
    seen: set[tuple[str, bool, DataShape]] = set()
    for trial in plan.trials:
        shape = shapes.get(trial.data.model_dump_json())
        if shape is None or trial.model.name == "custom":  # built and run for real: preflight_custom.py
            continue
        key = (trial.model.model_dump_json(), trial.uses_batchnorm, shape)
        if key in seen:
            continue
        seen.add(key)
        problem = model_problem(trial, shape, "base.")
        if problem is not None:
            raise UserError(problem)


def model_problem(trial: TrialConfig, shape: DataShape, where: str = "") -> str | None:
    """Why the trial's model cannot take a batch of `shape` (`<where>model.FIELD: cause; fix`), else None;
    `where` is where the trial's fields are written: "base." in a spec, "" for `lottery train`."""
    import torch

    from trainers.models import MODELS

    cfg = trial.model
    if cfg.name == "custom":  # the user's builder may not run on the meta device: preflight_custom.py
        return None
    size = f"{shape.in_channels}x{shape.image_size}x{shape.image_size}"
    try:
        with torch.device("meta"):
            model = MODELS[cfg.name](
                cfg,
                in_channels=shape.in_channels,
                image_size=shape.image_size,
                num_classes=shape.num_classes,
                batchnorm=trial.uses_batchnorm,
            )
            model.eval()
            with torch.no_grad():
                out = model(torch.zeros(PROBE_BATCH, shape.in_channels, shape.image_size, shape.image_size))
    except ValueError as exc:  # the builder's own check, already in the config's terms (model.padding: ...)
        return where + str(exc).splitlines()[0]
    except RuntimeError as exc:  # a layer that cannot take what the one before it gives
        cause = " ".join(str(exc).split())[:200]
        return (
            f"{where}model: {cfg.name} cannot take the {size} images of {trial.data.name} ({cause}); "
            f"change {where}model or {where}data.image_size"
        )
    if tuple(out.shape) != (PROBE_BATCH, shape.num_classes):
        return (
            f"{where}model: {cfg.name} gives {tuple(out.shape)[1:]} per {size} image of {trial.data.name}, "
            f"not {shape.num_classes} class scores; change {where}model or {where}data.image_size"
        )
    return None
