"""Whether a custom net's seeds can share a pack, decided once per net when a sweep is planned.

The built-in nets pack by name (trainers/pack.py `can_pack`). A user's net is code the planner has
not seen: it packs generically (trainers/funcpack.py) only if `vmap` batches it, which
`generic_pack_problem` finds out by building the net against its data and running a two-seed pack
forward and backward on one batch. That is done here, once per distinct (net, data, BatchNorm)
in a process, so planning, the dry run's one line about it and `pack_size: auto`'s size (which
counts the net's parameters) all read the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainers.config import TrialConfig


@dataclass(frozen=True)
class PackCheck:
    problem: str | None  # why the net trains one seed per trial (one line), None when it packs
    parameters: int  # one seed's parameter count (0 when the net could not be built here)


def custom_pack_check(config: TrialConfig) -> PackCheck:
    """The pack verdict of a custom net (`model.name == "custom"`), cached per net (with its source's
    hash: an edited file is checked again) and data."""
    key = (
        _source_sha256(config),
        config.model.model_dump_json(),
        config.data.model_dump_json(),
        config.data_seed,
        config.uses_batchnorm,
    )
    return _check(key, config)


_RESULTS: dict[tuple, PackCheck] = {}


def _source_sha256(config: TrialConfig) -> str:
    from trainers.custom import CustomCodeError, resolve

    try:
        return resolve(config.model.builder or "", config.model.base_dir, "model.builder").sha256
    except CustomCodeError:
        return ""  # the preflight refuses it in one line


def _check(key: tuple, config: TrialConfig) -> PackCheck:
    if key not in _RESULTS:
        _RESULTS[key] = _run_check(config)
    return _RESULTS[key]


def _run_check(config: TrialConfig) -> PackCheck:
    import torch

    from trainers.custom import CustomCodeError
    from trainers.data import load_data
    from trainers.errors import DataError
    from trainers.loop import pack_problem
    from trainers.pack import build_pack

    try:
        data = load_data(config.data, config.data_seed, torch.device("cpu"))
    except (DataError, CustomCodeError) as exc:
        reason = " ".join(str(exc).split())
        why = f"its data cannot be loaded here to check that vmap batches it ({reason})"
        return PackCheck(f"{why}; it trains one seed per trial", 0)
    try:
        model = build_pack(config, [config.seed], data)
    except Exception as exc:  # noqa: BLE001 - the preflight reports a broken builder in one line
        why = f"the net could not be built ({type(exc).__name__})"
        return PackCheck(f"{why}; it trains one seed per trial", 0)
    return PackCheck(pack_problem(config, data, model), sum(p.numel() for p in model.parameters()))
