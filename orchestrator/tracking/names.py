"""What a trial's MLflow run is called: shared by the driver (run names) and the trial itself
(the title of the CGN figure it draws), so this module imports no MLflow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dashboards.setting import SHORT, arm_text

FAILED_SUFFIX = " [lottery-failed]"  # a failed trial's run name ends so, to stand out unfiltered
# The `outcome` tag: what a child run's table row says first (MLflow's status reads "Finished" for a
# lottery failure too, which is a finished run that lost the lottery).
LOTTERY_FAILED, OK, ERRORED = "lottery-failed", "ok", "errored"
WIDTH_AXIS = "model.filters"  # said as '8f' in every arm and run name


def run_name(meta: dict[str, Any], result: dict[str, Any] | None) -> str:
    """'randomout seed=3 8f tau=1e-08 P=0.5': scheme and seed first, where the table cuts names."""
    label = f" {meta['hparam_label']}" if meta["hparam_label"] else ""
    width = f" {meta['filters']}f" if meta.get("filters") is not None else ""
    failed = FAILED_SUFFIX if result is not None and result.get("failed") else ""
    return f"{meta['scheme']} seed={meta['seed']}{width}{label}{failed}"


def outcome(result: dict[str, Any] | None) -> str:
    """lottery-failed, ok, or errored (no result: the trial raised)."""
    if result is None:
        return ERRORED
    return LOTTERY_FAILED if result.get("failed") else OK


def grid_axes(spec_doc: dict[str, Any]) -> list[str]:
    """TrialConfig paths a sweep's grid varies besides the width and the scheme's own hyperparameters
    (`optim.lr`, `epochs`, `model.kwargs.depth`): the top-level grid's keys and the dotted keys of
    each scheme entry's grid and params, in the order written."""
    keys = list(spec_doc.get("grid") or {})
    for entry in spec_doc.get("schemes") or []:
        for part in ("params", "grid"):
            keys += [k for k in (entry.get(part) or {}) if "." in k]
    return [k for k in dict.fromkeys(keys) if k != WIDTH_AXIS]


def _at(doc: Any, path: str) -> Any:
    for part in path.split("."):
        doc = doc.get(part) if isinstance(doc, dict) else None
    return doc


def arm(meta: dict[str, Any], axes: Sequence[str] = ()) -> str:
    """The `arm` tag of a trial's run, from its config.json: 'randomout 8f P=1 tau=1e-08'. Runs of one
    arm differ only in their seed; the runs table groups by it."""
    trial = meta.get("trial", {})
    values = {SHORT.get(p.split(".")[-1], p.split(".")[-1]): _at(trial, p) for p in axes}
    return arm_text(meta["scheme"], meta.get("filters"), meta.get("hparams") or {}, values)
