"""Where a report's numbers come from: when it was built, which code and libraries, seeds, the run.

Read from the sweep directory (spec.json, sweep.json) and the checkout; package versions come
from installed metadata, so nothing heavy (torch) is imported to state them.
"""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from orchestrator import layout
from orchestrator.tracking.record import SweepRecord
from orchestrator.tracking.source import LIBRARIES, git_state


def report_provenance(sweep_dir: Path) -> dict[str, str]:
    """Label -> value, in reading order, for the report's provenance block."""
    spec = layout.read_spec(sweep_dir)
    git = git_state(Path(__file__).resolve().parent)
    revision = git.get("git_revision", "not a git checkout")
    if git.get("git_dirty") == "true":
        revision += " (uncommitted changes)"
    versions = []
    for lib in LIBRARIES:
        try:
            versions.append(f"{lib} {metadata.version(lib)}")
        except metadata.PackageNotFoundError:
            continue
    record = SweepRecord.load(sweep_dir)
    original = record.written_elsewhere(sweep_dir) if record else None
    if original is not None:  # the copied record names the original's run and store, not this one's
        record = None
    run = f"{record.parent_run_id} (experiment {record.experiment_id})" if record else "not tracked"
    if original is not None:
        run = f"none of its own: a copy of {original} (`lottery sync` gives it one)"
    return {
        "built (UTC)": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "git revision": revision,
        "python": platform.python_version(),
        "versions": ", ".join(versions),
        "seeds": json.dumps(spec.get("seeds")) if spec.get("seeds") is not None else "not recorded",
        "plan fingerprint": str(spec.get("fingerprint", "not recorded")),
        "MLflow parent run": run,
        "tracking store": record.tracking_uri if record else "none",
    }
