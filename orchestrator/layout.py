"""The sweep directory: every file and folder name in it, how files are written, and a trial's status.

Everything below is named here and nowhere else; other modules ask for paths by function. Longer than
the ~450 lines a module usually gets, on purpose: it is the one owner of the sweep directory's contract
(tests/test_architecture.py fails when a name is spelled elsewhere), and a trial's status is read from
those same names; split, the contract would have two owners.

Results root (`$LOTTERY_HOME` or `./runs`, or a spec's `storage_path`), then `<root>/<sweep>/`:
  spec.json     the spec with explicit seeds, plus the plan fingerprint (ordered trial keys)
  trials.json   the planned trials in order (what aggregation treats as the denominator)
  sweep.json    tracking URI, experiment id and parent run id (reused on resume)
  sequential.json  a sequential study's state: seed batches opened, each look and why it stopped
  trials/<trial_key>/  one trial's durable record, written before anything reaches MLflow:
    config.json        resolved trial config plus its identities (trial_key, config_hash, pair_key)
    metrics.parquet    one row per completed epoch (EpochRecord.flat)
    layers.parquet     one row per (epoch, conv layer)
    cgn_trace.parquet  per-filter CGN: epoch, step, layer, filter, cgn, reset (step -1 = epoch mean)
    trace_parts/       the trace one file per epoch while the trial runs (joined into cgn_trace.parquet)
    cgn_filters.png    per-filter CGN figure, drawn by the trial just before result.json (for MLflow)
    result.json        written last: its presence means the trial finished
    error.txt          the last error, when a try failed
    checkpoint.pt      a lone seed's latest epoch checkpoint (removed once result.json exists)
    attempts.jsonl     one line per attempt: pid, the epoch it resumed from, the checkpoint it used
  packs/<pack_key>/checkpoint.pt  a seed pack's checkpoint (its seeds' records are in their trial dirs)
  failure.json  in a unit's directory (a lone seed's trial dir, or its pack's): its last failed attempt,
                the error's digest and the epoch it had reached (orchestrator/run/repeats.py)
  tune/         Tune's experiment state and per-epoch marker checkpoints (epoch.json): what
                `Tuner.restore` reads; an unreadable one is moved aside to tune.unreadable-<time>/.
                A sequential study runs one Tune experiment per seed batch: tune/batch-<i>/
  damaged/<trial_key>-<time>/  a trial directory whose files were damaged, moved here when the
                next `lottery sweep` trains that trial again
  aggregate/    <table>.parquet for the trials, epochs and summary tables (`lottery aggregate`)
  report/       report.html and its figures (`lottery report`)
  mlflow.db, mlartifacts/  the default embedded tracking store; a new one is built as
                .mlflow.db.building-<pid> and linked into place once migrated; one that is not at
                MLflow's schema head is kept as mlflow.db.broken-<time>, a copied sweep's as
                mlflow.db.copied-<time>
  driver.lock   locked by the driver running the sweep (`driver_lock`); says which host and pid
`lottery train` keeps its trials in `<root>/train/trials/<trial_key>/` and its store in `<root>/`.

Every file is written to a temporary name and renamed, so a kill at any point leaves either
the old or the new version, never a torn file.

The results root (and so a sweep directory) is a local path or a URI (`s3://bucket/prefix`, anything
pyarrow.fs resolves; orchestrator/storage.py). On an object store a file is written whole to a local
temporary file and then PUT in one request, which is its atomic commit; result.json is PUT last, so a
trial directory without it is unfinished wherever it lives. What cannot live on an object store
lives in the sweep's local mirror (`local_dir`): the embedded sqlite tracking store and its
artifacts, and the report while it is built (then copied to the store's `report/`).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias, get_args

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import UserError
from orchestrator.formats import FormatError, upgrade_result
from orchestrator.storage import StorePath, is_uri, location
from orchestrator.storage_fault import STORAGE_ERRNOS, StorageFault, free_bytes, human_bytes, storage_fault

Location: TypeAlias = Path | StorePath  # a local path, or a file or folder on an object store

# Results root and sweep directory
RESULTS_ROOT = "runs"  # default results root, relative to the working directory
TRAIN = "train"  # `lottery train`'s sweep directory in the results root
SPEC, PLAN, RECORD = "spec.json", "trials.json", "sweep.json"
SEQUENTIAL = "sequential.json"
BATCH = "batch"  # tune/batch-<i>/: a sequential study's Tune experiment for seed batch i
TRIALS, PACKS, TUNE, AGGREGATE, REPORT = "trials", "packs", "tune", "aggregate", "report"
TRACKING_DB, ARTIFACTS = "mlflow.db", "mlartifacts"
STORES = "stores"  # <local root>/stores/<scheme>/<bucket>/<prefix>/<sweep>/: a URI sweep's local mirror
UNREADABLE = "unreadable"  # tune.unreadable-<time>/
BROKEN = "broken"  # mlflow.db.broken-<time>: a store not at MLflow's schema head, kept
COPIED = "copied"  # mlflow.db.copied-<time>: a copied sweep's store, which was the original's
DAMAGED = "damaged"  # damaged/<trial_key>-<time>/: a damaged trial directory, kept when retrained
BUILDING = "building"  # .mlflow.db.building-<pid>: a new store while it is created and migrated
SQLITE_SIDE_FILES = ("-journal", "-wal", "-shm")  # sqlite's companions of a database file
REPACKED = "repacked"  # suffix of a Tune state set aside because the trials were packed anew
DRIVER_LOCK = "driver.lock"  # held by the running driver; names its host and pid
CHANGED_DATA = "changed-data"  # trials/<key>.changed-data-<time>/: a result set aside by --retrain-changed
# In a trial directory (a pack directory holds CHECKPOINT, FAILURE and FAULT_MARKER only)
CONFIG, METRICS, LAYERS, TRACE, RESULT, ERROR, CHECKPOINT = (
    "config.json",
    "metrics.parquet",
    "layers.parquet",
    "cgn_trace.parquet",
    "result.json",
    "error.txt",
    "checkpoint.pt",
)
TRACE_PARTS, ATTEMPTS = "trace_parts", "attempts.jsonl"
CGN_FIGURE = "cgn_filters.png"  # drawn where the trial runs: the driver only uploads it
FINAL_WEIGHTS = (
    "final_weights.pt"  # a fate-clock child's trained state dict (trainers/fork.py), before its result
)
FAILURE = "failure.json"  # a unit's last failed attempt: a repeat of it is not retried (run/repeats.py)
FAULT_MARKER = ".fault_injected"  # tests only: the injected fault has fired (orchestrator/run/trainable.py)
EPOCH_MARK = "epoch.json"  # the whole content of a checkpoint reported to Tune

Status = Literal["finished", "errored", "unfinished", "damaged"]


def results_root(environ: Mapping[str, str] = os.environ) -> Location:
    """Where results live unless a spec says otherwise: $LOTTERY_HOME (a path or a URI) or ./runs."""
    return location(environ.get("LOTTERY_HOME", RESULTS_ROOT))


def local_root(environ: Mapping[str, str] = os.environ) -> Path:
    """The local results root: $LOTTERY_HOME when it is a path, else ./runs."""
    home = environ.get("LOTTERY_HOME", RESULTS_ROOT)
    return Path(RESULTS_ROOT if is_uri(home) else home)


def sweep_location(storage_path: str | Path | None, name: str, root: Location) -> Location:
    """`<storage_path or root>/<name>`: a resolved local path, or a URI's StorePath."""
    base = location(storage_path) if storage_path is not None else root
    return (base / name).resolve()


def local_dir(sweep_dir: Location) -> Path:
    """Where a sweep keeps what must be on a local disk: the sweep directory itself when it is local,
    else its mirror `<local root>/stores/<scheme>/<bucket>/<prefix>/<sweep>/` (sqlite, the report build)."""
    if isinstance(sweep_dir, Path):
        return sweep_dir
    return local_root().joinpath(STORES, *sweep_dir.as_local_parts()).resolve()


def tune_storage(sweep_dir: Location) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Tune's RunConfig / Tuner.restore: Tune's state in the
    sweep directory, on the same store (None: Tune resolves a local path itself)."""
    if isinstance(sweep_dir, Path):
        return str(sweep_dir), None
    return sweep_dir.path, sweep_dir.fs


def spec_file(sweep_dir: Location) -> Location:
    return sweep_dir / SPEC


def plan_file(sweep_dir: Location) -> Location:
    return sweep_dir / PLAN


def record_file(sweep_dir: Location) -> Location:
    return sweep_dir / RECORD


def trials_root(sweep_dir: Location) -> Location:
    return sweep_dir / TRIALS


def trial_dir(sweep_dir: Location, trial_key: str) -> Location:
    return sweep_dir / TRIALS / trial_key


def pack_dir(sweep_dir: Location, pack_key: str) -> Location:
    return sweep_dir / PACKS / pack_key


def train_dir(root: Location) -> Location:
    """The sweep directory of `lottery train`'s single trials."""
    return root / TRAIN


def tune_dir(sweep_dir: Location, batch: int | None = None) -> Location:
    """Tune's experiment directory; a sequential study has one per seed batch inside it."""
    return sweep_dir / TUNE if batch is None else sweep_dir / TUNE / f"{BATCH}-{batch:03d}"


def sequential_file(sweep_dir: Location) -> Location:
    return sweep_dir / SEQUENTIAL


def unreadable_aside(path: Location) -> Location:
    """Where an unreadable Tune state at `path` is kept: beside it, named by the time."""
    return set_aside(path, UNREADABLE)


def set_aside(path: Location, reason: str) -> Location:
    """Where a Tune state that can no longer be restored is kept (never deleted): beside it, named
    by why and when."""
    return path.with_name(f"{path.name}.{reason}-{time.strftime('%Y%m%d-%H%M%S')}")


def aggregate_dir(sweep_dir: Location) -> Location:
    return sweep_dir / AGGREGATE


def aggregate_table(sweep_dir: Location, table: str) -> Location:
    return sweep_dir / AGGREGATE / f"{table}.parquet"


def report_dir(sweep_dir: Location) -> Location:
    return sweep_dir / REPORT


def tracking_db(root: Location) -> Path:
    """The embedded sqlite store of a sweep directory (or of `lottery train`'s results root); always on
    local disk (sqlite cannot live on an object store): a URI sweep's is in its local mirror."""
    return local_dir(root) / TRACKING_DB


def store_under_construction(db: Path) -> Path:
    """Where a new sqlite store is built before it is linked into place (one name per process)."""
    return db.with_name(f".{db.name}.{BUILDING}-{os.getpid()}")


def stores_under_construction(db: Path) -> list[Path]:
    return sorted(db.parent.glob(f".{db.name}.{BUILDING}-*"))


def artifacts_dir(root: Location) -> Path:
    return local_dir(root) / ARTIFACTS


def report_build_dir(sweep_dir: Location) -> Path:
    """Where `lottery report` builds the report: report_dir itself when local, else the local mirror's
    (then `publish` copies it to the store)."""
    return report_dir(local_dir(sweep_dir))


def trace_part(trial_dir: Location, epoch: int) -> Location:
    return trial_dir / TRACE_PARTS / f"epoch={epoch:05d}.parquet"


def trace_parts(trial_dir: Location) -> list[tuple[int, Location]]:
    """(epoch, file) of every per-epoch trace part, in epoch order."""
    parts = sorted((trial_dir / TRACE_PARTS).glob("epoch=*.parquet"))
    return [(int(p.stem.split("=")[1]), p) for p in parts]


def resolve_sweep_dir(name_or_path: str, root: Location) -> Location:
    """A sweep by name under the storage root, or by path or URI; one clear error otherwise."""
    try:
        candidates = [location(name_or_path)] + ([] if is_uri(name_or_path) else [root / name_or_path])
        for candidate in candidates:
            if spec_file(candidate).is_file():
                return candidate.resolve()
    except (OSError, ValueError) as exc:
        raise UserError(f"sweep: cannot read '{name_or_path}' ({' '.join(str(exc).split())[:300]})") from None
    raise UserError(
        f"sweep: no sweep '{name_or_path}' (no {SPEC} in {name_or_path} or {root / name_or_path})"
    )


def check_storage(sweep_dir: Location, field: str = "storage_path") -> None:
    """Before anything starts: the store answers and its bucket exists (a local path needs nothing)."""
    if isinstance(sweep_dir, Path):
        return
    bucket = StorePath(sweep_dir.scheme, sweep_dir.bucket)
    try:
        found = bucket.exists()
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{field}: cannot reach {bucket} ({' '.join(str(exc).split())[:300]}); set AWS_ENDPOINT_URL, "
            "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION for an S3 store"
        ) from None
    if not found:
        raise UserError(f"{field}: bucket {bucket} does not exist; create it first")


WRITE_PROBE = ".write-probe"  # <nearest existing folder>/.write-probe-<pid>: written and removed at start
PROBE_BYTES = 64 * 1024  # more than a few blocks: a disk with less free cannot hold one epoch's files


def check_writable(sweep_dir: Location, field: str = "storage_path") -> None:
    """Before anything starts: a file can be written where the sweep directory is (or will be), and in
    its local mirror. A read-only or full disk is one line naming the place and the fix (exit 2),
    where it was minutes of trial retries or a traceback once Tune had started."""
    places: list[Location] = [sweep_dir] if isinstance(sweep_dir, Path) else [sweep_dir, local_dir(sweep_dir)]
    for place in places:
        if isinstance(place, Path):
            while not place.exists() and place != place.parent:
                place = place.parent  # the sweep directory is created later; its parent must take it
        probe = place / f"{WRITE_PROBE}-{os.getpid()}"
        try:
            probe.write_bytes(bytes(PROBE_BYTES))
            probe.unlink()
        except OSError as exc:
            with contextlib.suppress(OSError):  # a read-only file system refuses even that
                probe.unlink(missing_ok=True)
            raise UserError(f"{field}: {_unwritable(place, exc)}") from None


def _unwritable(place: Location, exc: OSError) -> str:
    code = exc.errno if isinstance(exc.errno, int) else None
    what = STORAGE_ERRNOS.get(code) or (os.strerror(code) if code else " ".join(str(exc).split())[:200])
    free = free_bytes(place) if isinstance(place, Path) else None
    where = f"{what}; {human_bytes(free)} free" if free is not None else what
    return (
        f"cannot write to {place} ({where}); free space there or make it writable, or point storage_path "
        "(or LOTTERY_HOME) at another directory"
    )


# One driver per sweep


@contextlib.contextmanager
def driver_lock(sweep_dir: Location) -> Iterator[None]:
    """Hold the sweep for this driver, or refuse with the running driver's host and pid.

    An OS file lock (fcntl.flock) on `driver.lock`: the kernel releases it when the driver dies, however
    it dies, so a stale lock never blocks a resume. It holds across processes of one host and on NFS
    (Linux emulates flock with NFS byte-range locks). A sweep directory on object storage has no file
    locks: its lock is the local mirror's (`local_dir`), which keeps out a second driver on this host
    only; across hosts this function is where a lease object (a conditional put with an expiry) would go.
    """
    name = sweep_dir.name
    sweep_dir = local_dir(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / DRIVER_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise UserError(
            f"sweep '{name}': another driver is running it ({holder}); wait for it to finish, "
            "or stop it and run this command again to resume"
        ) from None
    try:
        os.ftruncate(fd, 0)
        doc = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.write(fd, json.dumps(doc).encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock_holder(fd: int) -> str:
    try:
        doc = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"host {doc['host']}, pid {doc['pid']}, since {doc['started']}"
    except (ValueError, KeyError, OSError):
        return "a driver that has not written its host and pid yet"


# Writing: to a temporary name beside the file, then renamed over it


@contextlib.contextmanager
def writing(path: Location) -> Iterator[None]:
    """A write to `path` that fails because the storage is full or read-only raises StorageFault
    (orchestrator/storage_fault.py): the sweep stops on it at once instead of retrying."""
    try:
        yield
    except StorageFault:
        raise
    except OSError as exc:
        fault = storage_fault(exc, path)
        if fault is None:
            raise
        raise StorageFault(str(path), fault.code, fault.free) from exc  # the file, not its temporary name


def atomic_write(path: Location, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename tmp to `path`: readers see the old file or the new one, never a torn one.
    On an object store tmp is a local file and the rename is one PUT of it."""
    if isinstance(path, StorePath):
        with tempfile.TemporaryDirectory(prefix="lottery-put-") as staging, writing(path):
            tmp = Path(staging) / path.name
            write(tmp)
            path.upload(tmp)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with writing(path):  # inside: the free space is read while the part still holds its share
            write(tmp)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a part written to a full disk holds the space it took
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Location, payload: bytes) -> None:
    if isinstance(path, StorePath):
        with writing(path):
            path.write_bytes(payload)  # one PUT: atomic already
        return
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))


def atomic_write_json(path: Location, doc: Any) -> None:
    atomic_write_bytes(path, json.dumps(doc, indent=2, sort_keys=True, default=str).encode())


def atomic_write_table(path: Location, table: pa.Table) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def append_line(path: Location, line: str) -> None:
    """Append one line (attempts.jsonl). An object cannot be appended to: it is read and PUT again,
    which is safe because one unit's attempts never run at once."""
    if isinstance(path, Path):
        with writing(path), open(path, "a") as f:
            f.write(line + "\n")
        return
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = b""
    with writing(path):
        path.write_bytes(old + (line + "\n").encode())


def publish(local: Path, target: Location) -> None:
    """Copy a locally built folder (the report) to its place in the sweep directory (nothing if local)."""
    if isinstance(target, Path):
        return
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        (target / file.relative_to(local).as_posix()).upload(file)


@contextlib.contextmanager
def local_copy(path: Location) -> Iterator[Path]:
    """A local file with `path`'s content (itself when local), for APIs that take a file name (MLflow's
    log_artifact)."""
    if isinstance(path, Path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="lottery-get-") as staging:
        local = Path(staging) / path.name
        path.download(local)
        yield local


# Reading


def read_json(path: Location) -> Any:
    return json.loads(path.read_bytes())


def read_table(path: Location) -> pa.Table:
    """A Parquet file as one table (ParquetFile.read skips the dataset machinery of pq.read_table)."""
    if isinstance(path, Path):
        return pq.ParquetFile(path).read()
    with path.fs.open_input_file(path.path) as f:
        return pq.ParquetFile(f).read()


def parquet_source(path: Location) -> tuple[str, Any]:
    """(path, filesystem) for readers that take both (pandas.read_parquet): None is the local disk."""
    return (str(path), None) if isinstance(path, Path) else (path.path, path.fs)


def parquet_rows(path: Location) -> int:
    """A Parquet file's row count, from its footer alone."""
    if isinstance(path, Path):
        return pq.read_metadata(path).num_rows
    with path.fs.open_input_file(path.path) as f:
        return pq.read_metadata(f).num_rows


def read_checkpoint_bytes(path: Location) -> io.BytesIO | None:
    """A checkpoint's bytes for torch.load, or None if there is none."""
    try:
        return io.BytesIO(path.read_bytes())
    except FileNotFoundError:
        return None


def trial_dirs_present(sweep_dir: Location) -> set[str]:
    """The names of the trial directories that exist (one listing, local or on a store)."""
    root = trials_root(sweep_dir)
    if isinstance(root, StorePath):
        return set(root.dirs())
    return {e.name for e in os.scandir(root) if e.is_dir()} if root.is_dir() else set()


def read_result(trial_dir: Location) -> dict[str, Any] | None:
    """result.json if the trial finished and its files are sound (see `trial_status`), else None."""
    return trial_status(trial_dir).result


def read_spec(sweep_dir: Location) -> dict[str, Any]:
    """spec.json: the spec with its seeds spelled out, its fingerprint and trial count."""
    return read_json(spec_file(sweep_dir))


def read_plan(sweep_dir: Location) -> list[dict[str, Any]]:
    """trials.json: one row per planned trial, in plan order."""
    return read_json(plan_file(sweep_dir))


def planned_keys(sweep_dir: Location) -> list[str]:
    return [row["trial_key"] for row in read_plan(sweep_dir)]


class ResultSchema(BaseModel):
    """What every result.json holds (trainers.events.TrialResult) once brought to the current format
    (orchestrator/formats.py): checked on every read, so a damaged file (`{}`, a field lost or mistyped)
    is never counted as a finished trial."""

    model_config = ConfigDict(strict=True, extra="allow")

    format: int = Field(ge=1)

    epochs_done: int = Field(ge=0)
    final_test_acc: float  # NaN when the loss diverged
    final_train_acc: float
    best_test_acc: float
    failed: bool
    diverged: bool
    total_resets: int = Field(ge=0)
    reinit_fallbacks: int = Field(ge=0)
    chance: float
    failure_margin: float
    failure_rule: str
    wall_s: float


class DamagedFile(Exception):
    """A trial file that exists but cannot be what its name says; the message names it and why."""


@dataclass(frozen=True)
class TrialStatus:
    """What a trial directory says about its trial (see `trial_status`)."""

    kind: Status
    result: dict[str, Any] | None = None  # result.json, for a finished trial
    problem: str | None = None  # for a damaged trial: which file, and what is wrong with it

    @property
    def finished(self) -> bool:
        return self.kind == "finished"

    @property
    def failed(self) -> bool:
        """Finished, and failed by the failure rule (a lottery loss; it counts in the failure rate)."""
        return self.result is not None and bool(self.result["failed"])

    @property
    def errored(self) -> bool:
        return self.kind == "errored"

    @property
    def damaged(self) -> bool:
        return self.kind == "damaged"


def trial_status(trial_dir: Location) -> TrialStatus:
    """The one reading of a trial's state: damaged (a file it needs is missing, config.json,
    metrics.parquet or result.json is unreadable, or the result fails its schema), finished
    (result.json, failed or not), errored (error.txt and no result: its last try raised), else
    unfinished (never started, running or interrupted).

    What a trial needs once it has an outcome: config.json (its identity: aggregation groups by it,
    MLflow names the run by it) for a result or an error, and metrics.parquet (its epochs) for a
    result of at least one epoch. Without them a result cannot be reported, so it is damage and the
    trial trains again; before an outcome their absence only means the trial has not got that far."""
    try:
        config = _checked_json(trial_dir / CONFIG, lambda doc: "trial_key" in doc or "no trial_key")
        metrics = _checked_table(trial_dir / METRICS, required=("epoch",))
        result = _checked_json(trial_dir / RESULT, _result_problem)
        if result is not None:
            result = upgrade_result(result)
            _required(config is not None, trial_dir / CONFIG)
            _required(metrics or result["epochs_done"] == 0, trial_dir / METRICS)
        elif (trial_dir / ERROR).exists():
            _required(config is not None, trial_dir / CONFIG)
            return TrialStatus("errored")
    except DamagedFile as exc:
        return TrialStatus("damaged", problem=str(exc))
    if result is not None:
        return TrialStatus("finished", result)
    return TrialStatus("unfinished")


def _required(present: bool, path: Location) -> None:
    if not present:
        raise DamagedFile(f"{path}: missing")


def _result_problem(doc: dict[str, Any]) -> bool | str:
    try:
        ResultSchema.model_validate(upgrade_result(doc))
    except FormatError as exc:
        return str(exc)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        return f"{field}: {first['msg']}" + (
            f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        )
    return True


def _checked_json(path: Location, check: Callable[[dict[str, Any]], bool | str]) -> dict[str, Any] | None:
    """The JSON object at `path` if it passes `check` (True, or a problem), None if there is no file."""
    if not _lexists(path):
        return None
    try:
        doc = read_json(path)
    except FileNotFoundError:
        raise DamagedFile(f"{path}: {_vanished(path)}") from None
    except (OSError, ValueError) as exc:  # truncated, empty, garbage, not UTF-8
        what = "empty" if _size(path) == 0 else f"not JSON ({' '.join(str(exc).split())[:120]})"
        raise DamagedFile(f"{path}: {what}") from None
    verdict = check(doc) if isinstance(doc, dict) else f"a JSON {type(doc).__name__}, not an object"
    if verdict is not True:
        raise DamagedFile(f"{path}: {verdict}")
    return doc


def _checked_table(path: Location, required: tuple[str, ...]) -> bool:
    """A Parquet file's footer is readable and has the `required` columns (a footer read, no data);
    False if there is no file."""
    if not _lexists(path):
        return False
    try:
        names = _read_schema(path).names
    except FileNotFoundError:
        raise DamagedFile(f"{path}: {_vanished(path)}") from None
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        what = "empty" if _size(path) == 0 else f"not Parquet ({' '.join(str(exc).split())[:120]})"
        raise DamagedFile(f"{path}: {what}") from None
    missing = [name for name in required if name not in names]
    if missing:
        raise DamagedFile(f"{path}: no {', '.join(missing)} column")
    return True


def _size(path: Location) -> int:
    try:
        return path.stat().st_size if isinstance(path, Path) else path.fs.get_file_info(path.path).size
    except (OSError, TypeError):
        return -1


def _lexists(path: Location) -> bool:
    """Exists, or is a symlink (a dangling one is damage, not absence); an object store has no links."""
    return os.path.lexists(path) if isinstance(path, Path) else path.exists()


def _vanished(path: Location) -> str:
    return f"a dangling symlink (to {os.readlink(path)})" if isinstance(path, Path) else "removed while read"


def _read_schema(path: Location) -> pa.Schema:
    if isinstance(path, Path):
        return pq.read_schema(path)
    with path.fs.open_input_file(path.path) as f:
        return pq.read_schema(f)


def count_trials(sweep_dir: Location, keys: list[str]) -> dict[str, int]:
    """planned, finished (failed included), failed, errored, damaged and unfinished, from the trial dirs."""
    counts = {"planned": len(keys), "failed": 0} | dict.fromkeys(get_args(Status), 0)
    for key in keys:
        status = trial_status(trial_dir(sweep_dir, key))
        counts[status.kind] += 1
        counts["failed"] += status.failed
    return counts


def damaged_aside(sweep_dir: Path, trial_key: str) -> Path:
    """Where a damaged trial directory is kept when its trial is trained again: outside trials/."""
    return sweep_dir / DAMAGED / f"{trial_key}-{time.strftime('%Y%m%d-%H%M%S')}"
