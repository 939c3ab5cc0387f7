"""sweep.json: where a sweep's runs live (store, experiment, parent run), read without MLflow or Ray.

Written by `open_sweep` (orchestrator/tracking/sweep.py) once the parent run exists; read by the
driver on resume, by the logging process, by `lottery sync/ui/aggregate` and by the report's
provenance. Reading it needs only the sweep directory, so this module imports neither MLflow nor
Ray: a report or a logging process that only reads where the runs are starts without them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator import layout
from orchestrator.errors import UserError
from orchestrator.formats import FORMAT, RECORD_FORMAT, upgrade_record


@dataclass(frozen=True)
class SweepRecord:
    """sweep.json: where this sweep's runs live, and the directory it was written for.

    The tracking URI is absolute, so a copied (or moved) sweep directory would log into the
    original's store; `sweep_dir` tells a copy apart (None when not recorded: see orchestrator/formats.py).
    """

    name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_dir: str | None = None

    def save(self, sweep_dir: Path) -> None:
        layout.atomic_write_json(layout.record_file(sweep_dir), asdict(self) | {FORMAT: RECORD_FORMAT})

    @classmethod
    def load(cls, sweep_dir: Path) -> SweepRecord | None:
        path = layout.record_file(sweep_dir)
        if not path.exists():
            return None
        doc = upgrade_record(layout.read_json(path))
        return cls(**{k: v for k, v in doc.items() if k != FORMAT})

    def written_elsewhere(self, sweep_dir: Path) -> str | None:
        """The directory this record was written for, when `sweep_dir` is another one (a copy)."""
        if self.sweep_dir is None or self.sweep_dir == str(layout.location(sweep_dir).resolve()):
            return None
        return self.sweep_dir


class CopiedSweep(UserError):
    """A sweep directory whose sweep.json was written for another directory: logging is refused."""


def check_own_record(record: SweepRecord, sweep_dir: Path) -> None:
    """Refuse to log a copied sweep into the store and parent run of the directory it was copied from."""
    original = record.written_elsewhere(sweep_dir)
    if original is not None:
        here = layout.location(sweep_dir).resolve()
        raise CopiedSweep(
            f"tracking: {here} is a copy of {original} ({layout.RECORD} names that directory and its "
            f"store), so nothing is logged; run `lottery sync {here}` to make the copy its own store, "
            "or pass --tracking-uri to `lottery sync` for another one"
        )
