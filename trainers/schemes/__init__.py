"""Scheme registry: config -> callback object. Unknown names fail loudly."""

from __future__ import annotations

from collections.abc import Callable

from trainers.config import (
    SCHEMES,
    CbpScheme,
    EdgePopupScheme,
    ImpScheme,
    RandomOutScheme,
    RedoScheme,
    ReprScheme,
)
from trainers.schemes.base import Scheme, TrainContext
from trainers.schemes.cbp import Cbp
from trainers.schemes.edgepopup import EdgePopup
from trainers.schemes.imp import Imp
from trainers.schemes.randomout import RandomOut
from trainers.schemes.redo import Redo
from trainers.schemes.repr import RePr

# The one list of scheme names: a new scheme is its config class (in trainers/config.py's Scheme union),
# its module here and one line below. The CLI and spec validation take the names from
# trainers.config.SCHEMES (no torch import), which must list the same names.
REGISTRY: dict[str, Callable[..., Scheme]] = {
    "baseline": lambda cfg: Scheme(),
    "batchnorm": lambda cfg: Scheme(),  # the model differs (BN after every conv), not the loop
    "randomout": lambda cfg: RandomOut(cfg),
    "repr": lambda cfg: RePr(cfg),
    "imp": lambda cfg: Imp(cfg),
    "edgepopup": lambda cfg: EdgePopup(cfg),
    "redo": lambda cfg: Redo(cfg),
    "cbp": lambda cfg: Cbp(cfg),
}
assert tuple(REGISTRY) == SCHEMES, "trainers.config's Scheme union and REGISTRY must list the same schemes"


def build_scheme(cfg: object) -> Scheme:
    name = getattr(cfg, "name", None)
    if name not in REGISTRY:
        raise ValueError(f"scheme: unknown scheme {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name](cfg)


__all__ = [
    "REGISTRY",
    "Cbp",
    "CbpScheme",
    "EdgePopup",
    "EdgePopupScheme",
    "Imp",
    "ImpScheme",
    "SCHEMES",
    "RandomOut",
    "RandomOutScheme",
    "RePr",
    "Redo",
    "RedoScheme",
    "ReprScheme",
    "Scheme",
    "TrainContext",
    "build_scheme",
]
