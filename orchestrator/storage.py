"""Where a sweep directory lives: a local path, or a URI that pyarrow.fs resolves (s3://bucket/prefix, gs://...).

A local location is a plain `pathlib.Path`, so local behaviour is pathlib's, unchanged. A URI becomes a
`StorePath`: the few pathlib operations the sweep directory needs (join, name, exists, read, write,
list, unlink, rename), done through a pyarrow filesystem. orchestrator/layout.py is the only caller that
needs to know which one it holds; it names every file and folder, this module only moves bytes.

Object stores have no rename and no directories. So here:
- a write is one PUT of the whole object (layout.atomic_write stages it in a local temporary file
  first): readers see the old object or the new one, never a torn one; in a trial directory the
  final result.json PUT is the commit, and a trial without it is unfinished;
- `mkdir`/`rmdir` do nothing (a folder exists while an object lies under it);
- renaming a folder copies each object and then deletes the originals (only Tune's saved state is
  ever set aside that way, and it is kept, never deleted).

S3 takes its endpoint and credentials from the usual environment: AWS_ENDPOINT_URL (an
S3-compatible server such as SeaweedFS or MinIO), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION. Nothing here reads or stores a credential: a StorePath pickles as its URI alone and
re-resolves the filesystem where it is unpickled (a Ray worker resolves it from its own environment).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import posixpath
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

OBJECT_STORES = {"s3", "gcs", "abfs"}  # pyarrow type names of filesystems without real directories


def is_uri(text: str) -> bool:
    """'s3://bucket/x' and 'file:///x' are URIs; '/x', 'runs' and 'C:\\x' are paths."""
    scheme = urlsplit(text).scheme
    return "://" in text and len(scheme) > 1


def location(value: str | Path | StorePath) -> Path | StorePath:
    """A local Path, or a StorePath for a URI (file:// URIs are local paths)."""
    if isinstance(value, (Path, StorePath)):
        return value
    if "\0" in value:
        raise ValueError("embedded null byte")
    if not is_uri(value):
        return Path(value)
    if urlsplit(value).scheme == "file":
        return Path(pafs.FileSystem.from_uri(value)[1])
    return StorePath.from_uri(value)


@functools.lru_cache(maxsize=16)
def _filesystem(root_uri: str) -> pafs.FileSystem:
    """One filesystem per scheme and bucket per process (a new S3 client per file would cost a
    connection each time)."""
    return pafs.FileSystem.from_uri(root_uri)[0]


class StorePath:
    """A file or folder in a pyarrow filesystem, with the part of pathlib.Path a sweep directory uses."""

    __slots__ = ("scheme", "path")

    def __init__(self, scheme: str, path: str) -> None:
        self.scheme = scheme
        self.path = path.strip("/")  # "bucket/prefix/..." as pyarrow names it

    @classmethod
    def from_uri(cls, uri: str) -> StorePath:
        parts = urlsplit(uri)
        if not parts.netloc:
            raise ValueError(f"{uri}: no bucket")
        if parts.query or parts.password or parts.username:
            # Credentials and endpoints travel in the environment, never in a URI that is printed and stored.
            raise ValueError(f"{uri}: put endpoint and credentials in AWS_* variables, not in the URI")
        return cls(parts.scheme, posixpath.normpath(f"{parts.netloc}/{parts.path.strip('/')}"))

    # pathlib's naming
    def __truediv__(self, other: str) -> StorePath:
        return StorePath(self.scheme, f"{self.path}/{other}")

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"

    def __repr__(self) -> str:
        return f"StorePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StorePath) and (self.scheme, self.path) == (other.scheme, other.path)

    def __hash__(self) -> int:
        return hash((self.scheme, self.path))

    def __lt__(self, other: StorePath) -> bool:  # sorted(glob(...))
        return self.path < other.path

    def __reduce__(self) -> tuple[Any, ...]:
        return (StorePath, (self.scheme, self.path))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def parent(self) -> StorePath:
        return StorePath(self.scheme, posixpath.dirname(self.path))

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    def with_name(self, name: str) -> StorePath:
        return self.parent / name

    def resolve(self) -> StorePath:
        return self

    def as_local_parts(self) -> tuple[str, ...]:
        """scheme, then each path component: where a local mirror of this location goes."""
        return (self.scheme, *self.path.split("/"))

    # The filesystem
    @property
    def fs(self) -> pafs.FileSystem:
        return _filesystem(f"{self.scheme}://{self.bucket}")

    @property
    def object_store(self) -> bool:
        return self.fs.type_name in OBJECT_STORES

    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, payload: bytes) -> None:
        """One PUT of the whole object."""
        with self.fs.open_output_stream(self.path) as f:
            f.write(payload)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def upload(self, local: Path) -> None:
        """Copy a local file here in one stream (the object appears when the stream closes)."""
        with open(local, "rb") as src, self.fs.open_output_stream(self.path) as dst:
            shutil.copyfileobj(src, dst, 8 * 1024**2)

    def download(self, local: Path) -> None:
        with self.fs.open_input_stream(self.path) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 * 1024**2)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        if not self.object_store:
            self.fs.create_dir(self.path, recursive=parents)

    def rmdir(self) -> None:
        if not self.object_store:
            self.fs.delete_dir(self.path)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def iterdir(self) -> Iterator[StorePath]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        except FileNotFoundError:
            return
        for info in infos:
            yield StorePath(self.scheme, info.path)

    def dirs(self) -> list[str]:
        """Names of the folders directly under this one."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        except FileNotFoundError:
            return []
        return [info.base_name for info in infos if info.type == pafs.FileType.Directory]

    def glob(self, pattern: str) -> Iterator[StorePath]:
        """Names matching `pattern` directly in this folder (no '**', no '/': all the layout needs)."""
        if "/" in pattern:
            raise ValueError(f"{pattern}: only patterns within one folder are supported")
        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    def files(self) -> list[StorePath]:
        """Every file under this folder, at any depth."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        except FileNotFoundError:
            return []
        return [StorePath(self.scheme, i.path) for i in infos if i.type == pafs.FileType.File]

    def rename(self, target: StorePath) -> StorePath:
        """Move a file, or a folder object by object (an object store has no rename)."""
        if self.is_file():
            self.fs.move(self.path, target.path)
            return target
        for file in self.files():
            self.fs.move(file.path, f"{target.path}/{file.path[len(self.path) + 1 :]}")
        with contextlib.suppress(FileNotFoundError):  # a store with folder objects (SeaweedFS) keeps one
            self.fs.delete_dir(self.path)
        return target
