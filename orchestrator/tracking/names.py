"""What a trial's MLflow run is called: shared by the driver (run names) and the trial itself
(the title of the CGN figure it draws), so this module imports no MLflow."""

from __future__ import annotations

from typing import Any

FAILED_SUFFIX = " [lottery-failed]"  # a failed trial's run name ends so, to stand out unfiltered


def run_name(meta: dict[str, Any], result: dict[str, Any] | None) -> str:
    """'randomout seed=3 8f tau=1e-08 P=0.5': scheme and seed first, where the table cuts names."""
    label = f" {meta['hparam_label']}" if meta["hparam_label"] else ""
    width = f" {meta['filters']}f" if meta.get("filters") is not None else ""
    failed = FAILED_SUFFIX if result is not None and result.get("failed") else ""
    return f"{meta['scheme']} seed={meta['seed']}{width}{label}{failed}"
