"""The user's own network builder and data loader: found, imported, hashed and checked here.

A target is "package.module:function" (imported from sys.path, with the spec's folder and the
working directory added) or "path/to/file.py:function" (imported from that file; a relative path
resolves against the spec's folder, `base_dir`). What a target is, for the record, is its string,
its kwargs and the SHA-256 of the source file it comes from: the string and kwargs are in the trial
key, the source hash is provenance stored with every result, so editing the file is detected at
resume (as changed data is) without renaming every trial.

On a Ray cluster the driver ships each file with the job's runtime_env (`py_modules`) and names the
shipped copies in LOTTERY_SHIPPED_CODE; a worker then imports the copy the driver hashed, never a
file that happens to sit at the same path on its own disk.

Every error is one line that starts with the field it is about (`model.builder: ...`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from trainers.config import DataConfig, ModelConfig

SHIPPED_ENV = "LOTTERY_SHIPPED_CODE"  # {absolute source path: module name of the shipped copy}
_FILE_MODULES = "lottery_custom_code"  # prefix of the names files are imported under
_PROJECT_PACKAGES = ("trainers", "orchestrator")  # on every worker already


class CustomCodeError(ValueError):
    """The user's builder or loader cannot be used; the message names the field."""


@dataclass(frozen=True)
class Target:
    """A parsed "where:function" and the file it lives in, once imported."""

    text: str
    field: str  # "model.builder" or "data.loader", for messages
    function: Callable[..., Any]
    source: Path  # the file the function's module was imported from
    sha256: str  # of that file's bytes

    def identity(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"target": self.text, "kwargs": kwargs, "source_sha256": self.sha256}


def is_file_target(text: str) -> bool:
    return text.split(":", 1)[0].endswith(".py")


def file_path(text: str, base_dir: Path | None) -> Path:
    """The absolute path of a file target: relative paths resolve against the spec's folder."""
    path = Path(text.split(":", 1)[0]).expanduser()
    return (path if path.is_absolute() else (base_dir or Path.cwd()) / path).resolve()


def resolve(text: str, base_dir: Path | None, field: str) -> Target:
    """Import the target and return its function, source file and source hash."""
    where, _, name = text.partition(":")
    if is_file_target(text):
        module = _import_file(file_path(text, base_dir), field)
    else:
        module = _import_module(where, base_dir, field)
    function = getattr(module, name, None)
    if function is None:
        raise CustomCodeError(f"{field}: {where} has no attribute {name!r}; name a function defined there")
    if not callable(function):
        raise CustomCodeError(f"{field}: {text} is a {type(function).__name__}, not a callable function")
    source = Path(getattr(module, "__file__", "") or "")
    if not source.is_file():
        raise CustomCodeError(
            f"{field}: {where} has no source file to hash; use a module defined in a .py file"
        )
    return Target(text, field, function, source.resolve(), sha256_of(source))


def sha256_of(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def shipped() -> dict[str, str]:
    return json.loads(os.environ.get(SHIPPED_ENV) or "{}")


def _import_file(path: Path, field: str) -> ModuleType:
    copy = shipped().get(str(path))
    if copy is not None:
        return _import_module(copy, None, field)
    if not path.is_file():
        raise CustomCodeError(f"{field}: no file {path}; a relative path resolves against the spec's folder")
    # Named by path and content, so an edited file is imported afresh and two files named alike coexist.
    digest = hashlib.sha256(f"{path}\0{sha256_of(path)}".encode()).hexdigest()[:16]
    name = f"{_FILE_MODULES}_{_identifier(path.stem)}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CustomCodeError(f"{field}: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # The file's own folder first, so it can import its neighbours as a script would.
    with _on_path(path.parent):
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise CustomCodeError(f"{field}: importing {path} failed: {_one_line(exc)}") from None
    return module


def _import_module(where: str, base_dir: Path | None, field: str) -> ModuleType:
    with _on_path(*(p for p in (base_dir, Path.cwd()) if p is not None)):
        try:
            return importlib.import_module(where)
        except Exception as exc:
            raise CustomCodeError(f"{field}: cannot import {where}: {_one_line(exc)}") from None


class _on_path:
    """Folders at the front of sys.path while importing (a module imported later keeps working)."""

    def __init__(self, *folders: Path) -> None:
        self.folders = [str(f) for f in folders if str(f) not in sys.path]

    def __enter__(self) -> None:
        sys.path[:0] = self.folders

    def __exit__(self, *exc: object) -> None:
        for folder in self.folders:
            if folder in sys.path:
                sys.path.remove(folder)


def _identifier(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def top_package(where: str, base_dir: Path | None) -> Path | None:
    """The file or folder to ship for a "package.module" target: its top-level package (or module) when
    it is the user's code (under the spec's folder or the working directory), None when installed."""
    top = where.split(".", 1)[0]
    if top in _PROJECT_PACKAGES:
        return None
    with _on_path(*(p for p in (base_dir, Path.cwd()) if p is not None)):
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return None
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        return None
    origin = Path(spec.origin).resolve()
    path = origin.parent if spec.submodule_search_locations else origin
    roots = [p.resolve() for p in (base_dir, Path.cwd()) if p is not None]
    if "site-packages" in path.parts or not any(path.is_relative_to(root) for root in roots):
        return None
    return path


def build_network(
    cfg: ModelConfig, *, in_channels: int, num_classes: int, image_size: int, seed: int
) -> tuple[nn.Module, Target]:
    """The user's net, built with torch's RNG seeded from the trial's init seed and restored after, so
    its own default initialisation is a pure function of the seed and the caller's RNG is untouched."""
    import torch
    from torch import nn

    target = resolve(cfg.builder or "", cfg.base_dir, "model.builder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = target.function(
                in_channels=in_channels, num_classes=num_classes, image_size=image_size, **cfg.kwargs
            )
        except Exception as exc:
            raise CustomCodeError(
                f"model.builder: {target.text}(in_channels={in_channels}, num_classes={num_classes}, "
                f"image_size={image_size}, **model.kwargs) failed: {_one_line(exc)}"
            ) from None
    if not isinstance(model, nn.Module):
        raise CustomCodeError(
            f"model.builder: {target.text} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model, target


def conv_count(model: nn.Module) -> tuple[int, int]:
    """(conv layers, filters): every nn.Conv2d's output channels."""
    from torch import nn

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return len(convs), sum(m.out_channels for m in convs)


def load_tensors(cfg: DataConfig) -> tuple[list[torch.Tensor], int, Target, str]:
    """The loader's (train_x, train_y, test_x, test_y) checked and as float32 images / int64 labels,
    the number of classes (largest train label + 1), the loader's target and the SHA-256 of the
    tensors it returned."""
    target = resolve(cfg.loader or "", cfg.base_dir, "data.loader")
    try:
        returned = target.function(**cfg.kwargs)
    except Exception as exc:
        raise CustomCodeError(f"data.loader: {target.text}(**data.kwargs) failed: {_one_line(exc)}") from None
    check_split(returned, target.text)
    x = returned[0]
    if cfg.image_size is None and x.shape[-1] != x.shape[-2]:
        raise CustomCodeError(
            f"data.loader: images are {x.shape[-2]}x{x.shape[-1]}, not square; set data.image_size "
            "or return square images"
        )
    digest = tensors_sha256(list(returned))
    tensors = [t.float().contiguous() if i % 2 == 0 else t for i, t in enumerate(returned)]
    return tensors, int(tensors[1].max()) + 1, target, digest


_SPLITS = ("train_x", "train_y", "test_x", "test_y")


def check_split(returned: object, text: str) -> None:
    import torch

    field = "data.loader"
    if not isinstance(returned, tuple | list) or len(returned) != 4:
        raise CustomCodeError(
            f"{field}: {text} returned a {type(returned).__name__}; return the tuple "
            "(train_x, train_y, test_x, test_y)"
        )
    for name, value in zip(_SPLITS, returned, strict=True):
        if not isinstance(value, torch.Tensor):
            raise CustomCodeError(f"{field}: {name} is a {type(value).__name__}; return torch tensors")
    train_x, train_y, test_x, test_y = returned
    for name, x in (("train_x", train_x), ("test_x", test_x)):
        if x.dim() != 4:
            raise CustomCodeError(f"{field}: {name} has shape {tuple(x.shape)}; images are N x C x H x W")
        if not (x.is_floating_point() or x.dtype == torch.uint8):
            raise CustomCodeError(f"{field}: {name} is {x.dtype}; images are float or uint8")
        if len(x) == 0:
            raise CustomCodeError(f"{field}: {name} is empty; both splits need images")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise CustomCodeError(f"{field}: {name} holds NaN or inf values; clean the images")
    for name, y, x in (("train_y", train_y, train_x), ("test_y", test_y, test_x)):
        if y.dtype != torch.int64 or y.dim() != 1:
            raise CustomCodeError(
                f"{field}: {name} is {y.dtype} of shape {tuple(y.shape)}; labels are a 1-D int64 tensor"
            )
        if len(y) != len(x):
            raise CustomCodeError(f"{field}: {name} has {len(y)} labels for {len(x)} images")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise CustomCodeError(
            f"{field}: train images are {tuple(train_x.shape[1:])} but test images "
            f"{tuple(test_x.shape[1:])}; both splits need one channel count and size"
        )
    classes = int(train_y.max()) + 1
    low = int(min(train_y.min(), test_y.min()))
    high = int(test_y.max())
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        raise CustomCodeError(
            f"{field}: label {bad} is outside 0..{classes - 1} (the classes the train split holds); "
            "number classes from 0 and train on every class you test"
        )


def tensors_sha256(tensors: list[torch.Tensor]) -> str:
    """SHA-256 of the returned tensors' bytes (with their shapes and types), in split order."""
    digest = hashlib.sha256()
    for name, t in zip(_SPLITS, tensors, strict=True):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()
