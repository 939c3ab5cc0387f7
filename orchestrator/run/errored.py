"""How a sweep that ended with errored trials says so: exit 4 and a last line naming the first error.

An errored trial (error.txt, no result: `layout.trial_status`) is a result the sweep did not get;
a sweep that exits 0 over one reads as a success in a script or a scheduler. The line names how
many trials errored and the first one in plan order, with its exception line and its error.txt, so
the cause is one `cat` away.
"""

from __future__ import annotations

from orchestrator import layout
from orchestrator.errors import ERRORED_EXIT


def last_line(error: str, limit: int = 300) -> str:
    """The exception line of a traceback (its last non-empty line), shortened to one line."""
    lines = [" ".join(line.split()) for line in error.splitlines() if line.strip()]
    text = lines[-1] if lines else "an error"
    return text[:limit] + ("..." if len(text) > limit else "")


def first_error(sweep_dir: layout.Location, keys: list[str]) -> tuple[str, str, layout.Location] | None:
    """(trial key, exception line, error.txt) of the first errored trial in `keys`' order, if any."""
    for key in keys:
        trial_dir = layout.trial_dir(sweep_dir, key)
        if layout.trial_status(trial_dir).errored:
            path = trial_dir / layout.ERROR
            try:
                text = path.read_text()
            except OSError as exc:
                text = f"({layout.ERROR} unreadable: {exc})"
            return key, last_line(text), path
    return None


def errored_line(sweep_dir: layout.Location, keys: list[str], count: int) -> str:
    """The sweep's last line when `count` trials errored."""
    line = f"ended with {count} errored trial(s) (exit {ERRORED_EXIT})"
    found = first_error(sweep_dir, keys)
    if found is None:
        return line
    key, error, path = found
    return f"{line}; first error: {key}: {error}; see {path}"
