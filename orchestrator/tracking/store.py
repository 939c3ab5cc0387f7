"""An embedded sqlite tracking store is whole or absent: built aside, checked on open, rebuilt if broken.

MLflow creates a sqlite store in place: ~1,700 statements of table creation and alembic
migrations over several seconds, not one transaction. A process killed meanwhile leaves a file
that every later open rejects (`index ... already exists`), so tracking would stay broken for
good. Here a new store is created and migrated under a temporary name beside its final one
(`layout.store_under_construction`) and hard-linked into place only once it is at MLflow's head
schema revision; a kill leaves the temporary file, which the next build removes.

A file already in place that is not at the head revision (half-migrated by an older version of
this code, truncated, not a database, or from another MLflow version) is moved aside, never
deleted, and replaced by a new store. Its runs are not copied: the trial directories are the
source of truth, and the callers (`open_sweep` + `reconcile`, `lottery sync`) log every trial
again, under a new parent run.

Only sqlite URIs are touched; a server or database URI is the server's business.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from orchestrator import layout

LOCK_WAIT_S = 5.0  # how long to wait for a writer's lock (sqlite's and MLflow's default)


@dataclass(frozen=True)
class Rebuilt:
    """A store that was replaced: where the old file went and why."""

    db: Path
    aside: Path
    reason: str


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI; None for any other store (or an in-memory one)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


def embedded_uri(sweep_dir: Path) -> str:
    """The sweep directory's own sqlite store, whatever MLFLOW_TRACKING_URI says."""
    return f"sqlite:///{layout.tracking_db(sweep_dir).resolve()}"


def head_revision() -> str:
    """The schema revision this MLflow creates and expects (the head of its alembic migrations)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def store_revision(db: Path) -> str | None:
    """The alembic revision recorded in `db`, or None if it has none or is not a readable database.

    A read-write connection, so that sqlite rolls back a transaction a killed writer left in
    its journal before we look (a read-only one would report the healthy file as unreadable).
    A store that is locked or cannot be opened raises: it is busy or unreachable, not broken.
    """
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=LOCK_WAIT_S)) as conn:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # an empty file, or killed before alembic's first step
            return None
        raise
    except sqlite3.DatabaseError:  # not a database, or malformed
        return None
    return row[0] if row else None


def prepare_store(uri: str, console: Console | None = None) -> Rebuilt | None:
    """Make `uri`'s sqlite store whole before anything opens it: build it if absent, rebuild it if
    it is not at MLflow's head revision. Returns what was replaced, or None."""
    db = sqlite_file(uri)
    if db is None:
        return None
    rebuilt = None
    if os.path.lexists(db):
        found, head = store_revision(db), head_revision()
        if found == head:
            return None
        reason = f"schema revision {found or 'missing'}, expected {head}"
        rebuilt = Rebuilt(db, move_aside(db, layout.BROKEN), reason)
        (console or Console(stderr=True)).print(
            f"[yellow]tracking: the store {db} is not a complete MLflow store ({reason}); moved it to "
            f"{rebuilt.aside} and logging every trial again from the trial directories[/]",
            highlight=False,
            soft_wrap=True,
        )
    build_store(db)
    if rebuilt is not None:
        _drop_open_connections(db)
    return rebuilt


def move_aside(db: Path, reason: str) -> Path:
    """Rename a store and its sqlite side files (a hot journal must never meet a new file of that name)."""
    aside = layout.set_aside(db, reason)
    os.replace(db, aside)
    for suffix in layout.SQLITE_SIDE_FILES:
        side = db.with_name(db.name + suffix)
        if side.exists():
            os.replace(side, aside.with_name(aside.name + suffix))
    return aside


def build_store(db: Path) -> None:
    """Create and migrate a new store beside `db`, then link it into place (unless one appeared)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db.parent.mkdir(parents=True, exist_ok=True)
    for stale in layout.stores_under_construction(db):  # left by a killed build
        if not _alive(stale.name.rpartition("-")[2]):
            _remove_with_side_files(stale)
    tmp = layout.store_under_construction(db)
    quiet = logging.getLogger("mlflow.store.db.utils")  # "Creating initial MLflow database tables..."
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        store = SqlAlchemyStore(f"sqlite:///{tmp}", layout.artifacts_dir(db.parent).resolve().as_uri())
    finally:
        quiet.setLevel(level)
    store.engine.dispose()
    SqlAlchemyStore._engine_map.pop(f"sqlite:///{tmp}", None)  # MLflow caches an engine per URI
    if store_revision(tmp) != head_revision():  # MLflow raises first; this is the contract, stated
        raise RuntimeError(f"tracking: the new store {tmp} did not reach MLflow's head revision")
    with contextlib.suppress(FileExistsError):  # another process finished first: keep its store
        os.link(tmp, db)  # atomic, and never over an existing file
    _remove_with_side_files(tmp)


def _drop_open_connections(db: Path) -> None:
    """MLflow keeps one engine per store URI for the life of the process; its pooled connections
    still reach the file that was moved aside, so they are closed (the next one opens the new file)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    for uri, engine in list(SqlAlchemyStore._engine_map.items()):
        found = sqlite_file(uri)
        if found is not None and found.resolve() == db.resolve():
            engine.dispose()


def _alive(pid: str) -> bool:
    """Whether the process that names a store under construction still runs (this one counts as dead)."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_with_side_files(path: Path) -> None:
    for suffix in ("", *layout.SQLITE_SIDE_FILES):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
