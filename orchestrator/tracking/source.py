"""The code that ran, as MLflow's own source tags, so the runs table's Source and Version columns fill.

MLflow reads `mlflow.source.name`, `mlflow.source.type` and `mlflow.source.git.commit` for those
columns; the commit is looked up once per process (every run of a driver logs the same code).
"""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

SOURCE_NAME = "filter-lottery"
# The libraries whose versions a sweep's parent run and its report state (from installed metadata).
LIBRARIES = ("torch", "ray", "mlflow", "pandas", "pyarrow", "pydantic", "numpy")


def git_state(where: Path) -> dict[str, str]:
    """Revision and dirty flag of the code that ran, if it is a git checkout."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_revision": rev, "git_dirty": str(bool(dirty)).lower()}


@cache
def source_tags() -> dict[str, str]:
    """mlflow.source.* of this checkout (no commit tag outside a git checkout)."""
    tags = {"mlflow.source.name": SOURCE_NAME, "mlflow.source.type": "LOCAL"}
    rev = git_state(Path(__file__).resolve().parent).get("git_revision")
    return tags | ({"mlflow.source.git.commit": rev} if rev else {})
