"""A storage fault: the sweep directory is full or read-only, so no retry of any trial can succeed.

Tune retries a failed trial from its last checkpoint, which is right for a crashed worker and wrong
here: every retry fails the same way (minutes of identical tracebacks) until someone frees space or
remounts the disk. So a write that fails with one of STORAGE_ERRNOS is raised as a `StorageFault`
(orchestrator/layout.py converts at the file layer; the trainable converts whatever else its unit
raised), which the driver recognises and stops the whole sweep on at once (orchestrator/run/
storage_stop.py): one line naming the path, what is wrong and the free space, exit code 5.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

# errno -> what the one line calls it
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}


class StorageFault(Exception):
    """A write to the sweep directory failed because its storage is full or read-only.

    Carries plain values only (path, errno, free bytes where the write failed), so it pickles from a
    Ray worker to the driver unchanged.
    """

    def __init__(self, path: str, code: int, free: int | None = None) -> None:
        super().__init__(path, code, free)
        self.path, self.code, self.free = path, code, free

    def __str__(self) -> str:
        return self.line()

    def line(self) -> str:
        """The one line: path, errno meaning, free space."""
        what = STORAGE_ERRNOS.get(self.code, os.strerror(self.code))
        free = "free space unknown" if self.free is None else f"{human_bytes(self.free)} free"
        return f"storage: cannot write {self.path} ({what}; {free})"


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system holding `path` (its nearest existing folder); None for a URI."""
    if "://" in str(path):
        return None
    here = Path(path)
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return shutil.disk_usage(here).free
    except OSError:
        return None


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # not reached


def storage_fault(exc: BaseException, path: str | Path) -> StorageFault | None:
    """The storage fault `exc` is or was caused by (its chain walked), else None.

    `path` names the write when the error itself names no file (pyarrow's errors often do not)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StorageFault):
            return current
        code = getattr(current, "errno", None)
        if isinstance(current, OSError) and code in STORAGE_ERRNOS:
            where = str(current.filename) if current.filename else str(path)
            return StorageFault(where, code, free_bytes(where))
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    return None
