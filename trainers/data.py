"""Datasets as normalised tensors on the device, loaded once per trial.

Every dataset here fits in memory, so indexing tensors replaces a DataLoader: no worker processes, no
per-batch decoding, and the split is a pure function of `data_seed`. Random draws all come from one
generator seeded by `data_seed`, consumed in a fixed order (generation, train/test split, val split).

Longer than the ~450 lines a module usually gets, on purpose: that draw order spans the per-dataset
loaders (generation) and the one pipeline after them (split, resize, normalise), and a dataset's identity
(its files and fingerprint) is read where its files are; one file keeps the order, and so every
trial's split, in one place.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trainers.config import DataConfig
from trainers.errors import DataError
from trainers.recordio import RecordIOError, iter_records

if TYPE_CHECKING:
    from torchvision import datasets

# scikit-learn and torchvision are imported by the loaders that need them: together they add
# about 2.5 s to every process that imports this module (the CLI, each Ray worker).

CRATER_FILES = ("All-Fold1-train.rec", "All-Fold1-test.rec")
# Records in the published folds (the RandomOut reference's data/crater): a file cut at a record
# boundary still parses, so its count is the check.
CRATER_RECORDS = {"All-Fold1-train.rec": 4374, "All-Fold1-test.rec": 486}
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
SYNTHETIC_SIZE = 16
SYNTHETIC_CLASSES = 4
# (channels, side, classes) of each dataset of a fixed shape, before data.image_size resizes it: what
# a sweep's model check uses where the data is not loaded on the driver (a cluster's workers hold it).
# imagefolder's depend on its folder. tests/test_preflight_model.py keeps them equal to the loaded data.
NATIVE_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 10),
    "synthetic": (1, SYNTHETIC_SIZE, SYNTHETIC_CLASSES),
    "craters": (1, 28, 2),
    "cifar10": (3, 32, 10),
    "mnist": (1, 28, 10),
}


@dataclass
class LoadedData:
    x_train: torch.Tensor  # float32 NCHW, normalised, on the target device
    y_train: torch.Tensor  # int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_val: torch.Tensor  # (0, C, H, W) when data.val_fraction is 0
    y_val: torch.Tensor
    num_classes: int
    in_channels: int
    image_size: int
    variant: str  # exactly which data produced a number, for the record
    majority: float = 0.0  # share of the test split's most common class
    # What was read, per file: bytes, records, sha256 (computed once, at load); {} for generated data.
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """A short hash of `files`: equal for the same bytes, whatever the directory they were read from.

        Stored in every result; a stored result with another fingerprint was trained on other data."""
        return fingerprint_of(self.files)

    @property
    def chance(self) -> float:
        """Accuracy of the best constant predictor on the test split: the majority-class share.

        Not 1/C: on the crater test set 59.7 % of images are non-craters, so a net collapsed to that
        one answer scores 59.7 %, and a rule of 1/C + margin would count it as a success."""
        return self.majority or 1.0 / self.num_classes


@dataclass
class _Raw:
    """A dataset at its original pixel scale (float32 NCHW), before resize, val split and normalisation."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    description: str
    seeded: bool  # whether data_seed shaped the dataset itself (generation or train/test split)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # see LoadedData.files


def load_data(cfg: DataConfig, data_seed: int, device: torch.device) -> LoadedData:
    """Load, resize, hold out val, then normalise with statistics of the remaining train images only,
    so neither val nor test leaks into the inputs the model is trained on."""
    generator = torch.Generator().manual_seed(data_seed)
    raw = _LOADERS[cfg.name](cfg, generator)
    x_train, y_train, x_test = raw.x_train, raw.y_train, raw.x_test
    native = x_train.shape[-1]
    size = cfg.image_size or native
    if size != native:
        x_train, x_test = _resize(x_train, size), _resize(x_test, size)
    x_train, y_train, x_val, y_val = _carve_val(x_train, y_train, cfg.val_fraction, generator)
    x_train, x_val, x_test = (x.to(device) for x in _normalize(cfg.normalize, x_train, x_val, x_test))
    majority = majority_share(raw.y_test, raw.num_classes)
    y_train, y_val, y_test = (y.to(device) for y in (y_train, y_val, raw.y_test))

    resized = f" (resized from {native}x{native})" if size != native else ""
    details = [f"{raw.description} {size}x{size}{resized}", f"{len(y_train)}/{len(y_test)}"]
    if len(y_val):
        details.append(f"{len(y_val)} val held out of train")
    if raw.seeded or len(y_val):
        details.append(f"data_seed {data_seed}")
    details.append(NORMALIZE_TEXT[cfg.normalize])
    return LoadedData(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        x_val=x_val,
        y_val=y_val,
        num_classes=raw.num_classes,
        in_channels=x_train.shape[1],
        image_size=size,
        variant=", ".join(details),
        majority=majority,
        files=raw.files,
    )


def fingerprint_of(files: dict[str, dict[str, Any]]) -> str:
    canonical = json.dumps(files, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def file_entry(path: Path, records: int | None) -> dict[str, Any]:
    """One file of a dataset: its size, how many records were read from it and its content hash."""
    with path.open("rb") as stream:
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "records": records, "sha256": digest}


def check_batch_size(batch_size: int, full_batch: bool, data: LoadedData) -> None:
    """A minibatch larger than the training set is a mistake, not a silent full batch: the two would
    train alike under different trial keys (use full_batch: true for one step per epoch)."""
    check_batch_fits(batch_size, full_batch, len(data.y_train), data.variant)


def check_batch_fits(batch_size: int, full_batch: bool, n_train: int, variant: str) -> None:
    if not full_batch and batch_size > n_train:
        raise DataError(
            f"batch_size: {batch_size} is larger than the training set ({n_train} images: {variant}); "
            "lower it, or set full_batch: true for one step per epoch"
        )


def majority_share(labels: torch.Tensor, num_classes: int) -> float:
    """Share of the most common label (on the host, once per load)."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes)
    return float(counts.max()) / max(len(labels), 1)


NORMALIZE_TEXT = {
    "standard": "normalised by train mean/std",
    "mean_image": "train mean image subtracted, pixel scale kept",
}


def _normalize(
    how: str, x_train: torch.Tensor, x_val: torch.Tensor, x_test: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of the train split only, applied in place (the tensors are the caller's own, and
    CIFAR-10 in float32 is 600 MB).

    `mean_image` is what the RandomOut reference feeds its nets: 0..255 pixels minus the per-pixel
    mean image. The CGN is linear in the input scale, so standardising (crater std ~8, CIFAR ~64)
    shrinks every CGN by that factor and the paper's tau (1e-8, 1e-12) would no longer mean what it
    meant there (measured at init on Inception-28, standardised CIFAR-10: 946 of 1,712 filters below
    1e-8 instead of 162 on the reference scale; not re-measured here, CIFAR-10 is not on this machine).
    """
    if how == "mean_image":
        mean = x_train.mean(dim=0, keepdim=True)
        return x_train.sub_(mean), x_val.sub_(mean), x_test.sub_(mean)
    std, mean = torch.std_mean(x_train, dim=(0, 2, 3), keepdim=True)
    std = std.clamp_min(1e-12)  # a constant channel stays constant instead of becoming NaN
    return tuple(x.sub_(mean).div_(std) for x in (x_train, x_val, x_test))


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _carve_val(
    x: torch.Tensor, y: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if fraction <= 0:
        return x, y, x[:0], y[:0]
    n_val = max(1, round(fraction * len(y)))
    order = torch.randperm(len(y), generator=generator)
    val, train = order[:n_val], order[n_val:].sort().values  # train keeps its original order
    return x[train], y[train], x[val], y[val]


def _split(
    x: torch.Tensor, y: torch.Tensor, test_fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    order = torch.randperm(len(y), generator=generator)
    n_test = round(test_fraction * len(y))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _data_dir(cfg: DataConfig) -> Path:
    if cfg.data_dir is not None:
        return Path(cfg.data_dir).expanduser()
    if env := os.environ.get("LOTTERY_DATA_DIR"):
        return Path(env).expanduser()
    raise DataError(
        f"data.data_dir: dataset '{cfg.name}' reads files but no directory is set; "
        "pass --data-dir or set LOTTERY_DATA_DIR"
    )


def _load_digits(cfg: DataConfig, generator: torch.Generator) -> _Raw:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float()[:, None]
    y = torch.from_numpy(digits.target).long()
    return _Raw(*_split(x, y, 0.25, generator), 10, "digits (sklearn, 75/25 split)", seeded=True)


def _load_synthetic(cfg: DataConfig, generator: torch.Generator) -> _Raw:
    x, y = _synthetic_bars(cfg.synthetic_samples, generator)
    description = f"synthetic bars ({cfg.synthetic_samples} samples, 80/20 split)"
    return _Raw(*_split(x, y, 0.2, generator), SYNTHETIC_CLASSES, description, seeded=True)


def _synthetic_bars(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Bars in one of four orientations (0, 45, 90, 135 degrees), the class, plus distractors.

    Random position, length, jitter of +-15 degrees, a class-independent blob and pixel noise make
    the task need translation-invariant orientation detectors (a CNN's job) rather than a fixed
    template, so a small CNN learns it well while a linear model does not.
    """

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    y = torch.randint(0, SYNTHETIC_CLASSES, (n,), generator=generator)
    angle = y * (math.pi / SYNTHETIC_CLASSES) + uniform(-math.pi / 12, math.pi / 12)
    centre, half_length, amplitude = uniform(4.0, 12.0, 2), uniform(3.0, 6.0), uniform(0.6, 1.4)
    blob_centre, blob_amplitude = uniform(2.0, 14.0, 2), uniform(0.0, 1.2)
    noise = 0.35 * torch.randn(n, SYNTHETIC_SIZE, SYNTHETIC_SIZE, generator=generator)

    grid = torch.arange(SYNTHETIC_SIZE, dtype=torch.float32)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    dx = cols - centre[:, 0, None, None]
    dy = rows - centre[:, 1, None, None]
    ux, uy = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    along = (dx * ux + dy * uy).clamp(-half_length[:, None, None], half_length[:, None, None])
    bar_dist2 = (dx - along * ux) ** 2 + (dy - along * uy) ** 2
    blob_dist2 = (cols - blob_centre[:, 0, None, None]) ** 2 + (rows - blob_centre[:, 1, None, None]) ** 2
    x = (
        amplitude[:, None, None] * torch.exp(-bar_dist2 / (2 * 0.8**2))
        + blob_amplitude[:, None, None] * torch.exp(-blob_dist2 / (2 * 1.5**2))
        + noise
    )
    return x[:, None], y


def _load_craters(cfg: DataConfig, generator: torch.Generator) -> _Raw:
    root = _data_dir(cfg)
    folder = next((d for d in (root, root / "craters") if all((d / f).is_file() for f in CRATER_FILES)), None)
    if folder is None:
        raise DataError(
            f"data.data_dir: no crater files at {root} (expected {' and '.join(CRATER_FILES)} there "
            f"or in {root / 'craters'}); pass --data-dir or set LOTTERY_DATA_DIR"
        )
    x_train, y_train = _read_crater_file(folder / CRATER_FILES[0])
    x_test, y_test = _read_crater_file(folder / CRATER_FILES[1])
    files = {}
    for name, labels in zip(CRATER_FILES, (y_train, y_test), strict=True):
        if len(labels) != CRATER_RECORDS[name]:
            raise DataError(
                f"data.data_dir: {folder / name} holds {len(labels):,} records, the published fold "
                f"{CRATER_RECORDS[name]:,} (the file is cut short or from another fold); restore the "
                "published file"
            )
        files[name] = file_entry(folder / name, len(labels))
    return _Raw(x_train, y_train, x_test, y_test, 2, "craters All-Fold1", seeded=False, files=files)


def _read_crater_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    try:
        for index, (label, payload) in enumerate(iter_records(path)):
            try:
                with Image.open(io.BytesIO(payload)) as image:
                    images.append(np.asarray(image.convert("L")))
            except OSError as error:
                raise DataError(
                    f"data.data_dir: record {index} of {path} is not a readable image ({error})"
                ) from error
            labels.append(label)
    except RecordIOError as error:
        raise DataError(f"data.data_dir: {error}") from error
    shapes = {image.shape for image in images}
    if len(shapes) != 1 or not set(labels) <= {0.0, 1.0}:
        raise DataError(
            f"data.data_dir: {path} is not a crater pack (image sizes {sorted(shapes)}, "
            f"labels {sorted(set(labels))}; expected one size and labels 0/1)"
        )
    return torch.from_numpy(np.stack(images)).float()[:, None], torch.tensor(labels).long()


def _load_cifar10(cfg: DataConfig, generator: torch.Generator) -> _Raw:
    root = _data_dir(cfg)
    if cfg.download:
        from torchvision import datasets

        datasets.CIFAR10(root, train=False, download=True)  # fetches and md5-checks the archive
    folder = root / CIFAR_FOLDER
    missing = [name for name in CIFAR_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"data.data_dir: CIFAR-10 python batches missing in {folder} ({', '.join(missing)}); "
            "set data.download: true or place the files there"
        )
    # Parsed here rather than by torchvision's CIFAR10, which rejects any file whose md5 is not the
    # official one even when download is off: the format is all this needs.
    train = [_read_pickle(folder / name) for name in CIFAR_FILES[:5]]
    test = _read_pickle(folder / "test_batch")
    classes = _read_pickle(folder / "batches.meta")["label_names"]

    def images(batches: list[dict]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([b["data"] for b in batches])).reshape(-1, 3, 32, 32).float()

    def labels(batches: list[dict]) -> torch.Tensor:
        return torch.tensor([label for b in batches for label in b["labels"]]).long()

    sizes = dict(zip(CIFAR_FILES, [len(b["labels"]) for b in [*train, test]] + [None], strict=True))
    files = {name: file_entry(folder / name, sizes[name]) for name in CIFAR_FILES}
    return _Raw(
        images(train),
        labels(train),
        images([test]),
        labels([test]),
        len(classes),
        "cifar10",
        seeded=False,
        files=files,
    )


def _read_pickle(path: Path) -> dict:
    with path.open("rb") as stream:
        return pickle.load(stream, encoding="latin1")


def _load_mnist(cfg: DataConfig, generator: torch.Generator) -> _Raw:
    from torchvision import datasets

    root = _data_dir(cfg)
    try:
        train, test = (datasets.MNIST(root, train=split, download=cfg.download) for split in (True, False))
    except RuntimeError as error:
        if cfg.download:
            raise
        raise DataError(
            f"data.data_dir: MNIST idx files not found in {root / 'MNIST' / 'raw'} ({error}); "
            "set data.download: true or place the files there"
        ) from error
    x_train, x_test = train.data[:, None].float(), test.data[:, None].float()
    raw_dir = Path(train.raw_folder)
    files = {p.name: file_entry(p, None) for p in sorted(raw_dir.iterdir()) if p.is_file()}
    return _Raw(
        x_train, train.targets.long(), x_test, test.targets.long(), 10, "mnist", seeded=False, files=files
    )


def _load_imagefolder(cfg: DataConfig, generator: torch.Generator) -> _Raw:
    from torchvision import datasets
    from torchvision.transforms.functional import pil_to_tensor

    root = _data_dir(cfg)
    splits = {}
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(
                f"data.data_dir: {root / split} not found; imagefolder expects "
                f"{root}/train/<class>/* and {root}/test/<class>/*"
            )
        try:
            splits[split] = datasets.ImageFolder(root / split)
        except FileNotFoundError as error:
            raise DataError(f"data.data_dir: {root / split}: {error}") from error
    train, test = splits["train"], splits["test"]
    if train.classes != test.classes:
        raise DataError(
            f"data.data_dir: test classes {test.classes} differ from train classes {train.classes} in {root}"
        )
    train_images = [_open_image(path) for path, _ in train.samples]
    test_images = [_open_image(path) for path, _ in test.samples]
    gray = all(image.mode == "L" for image in train_images + test_images)
    width, height = train_images[0].size
    if cfg.image_size is None and width != height:
        raise DataError(
            f"data.image_size: images in {root} are {width}x{height}, not square; set data.image_size"
        )
    size = cfg.image_size or width

    def stack(images: list[Image.Image]) -> torch.Tensor:
        tensors = [pil_to_tensor(image if gray else image.convert("RGB")).float()[None] for image in images]
        return torch.cat([t if t.shape[-2:] == (size, size) else _resize(t, size) for t in tensors])

    def labels(folder: datasets.ImageFolder) -> torch.Tensor:
        return torch.tensor(folder.targets).long()

    description = f"imagefolder {root} ({'L' if gray else 'RGB'})"
    x_train, x_test = stack(train_images), stack(test_images)
    files = {split: _folder_entry(root / split, folder) for split, folder in splits.items()}
    return _Raw(
        x_train,
        labels(train),
        x_test,
        labels(test),
        len(train.classes),
        description,
        seeded=False,
        files=files,
    )


def _folder_entry(root: Path, folder: datasets.ImageFolder) -> dict[str, Any]:
    """One entry per split (not per image): total bytes, images, and a hash over (path, image hash)."""
    digest = hashlib.sha256()
    total = 0
    for path, _ in folder.samples:
        entry = file_entry(Path(path), 1)
        total += entry["bytes"]
        digest.update(f"{Path(path).relative_to(root)}\0{entry['sha256']}\n".encode())
    return {"bytes": total, "records": len(folder.samples), "sha256": digest.hexdigest()}


def _open_image(path: str) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


def _load_custom(cfg: DataConfig, generator: torch.Generator) -> _Raw:
    """The user's loader (trainers/custom.py). Its record, and so the data fingerprint, is the SHA-256
    of the tensors it returned plus its identity (target, kwargs, source hash): new data or an edited
    loader is changed data."""
    from trainers.custom import CustomCodeError, load_tensors

    try:
        (x_train, y_train, x_test, y_test), classes, target, digest = load_tensors(cfg)
    except CustomCodeError as error:
        raise DataError(str(error)) from None
    record = {"records": len(y_train) + len(y_test), "sha256": digest} | target.identity(cfg.kwargs)
    description = f"custom {target.text}"
    files = {"loader": record}
    return _Raw(x_train, y_train, x_test, y_test, classes, description, seeded=False, files=files)


_LOADERS: dict[str, Callable[[DataConfig, torch.Generator], _Raw]] = {
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    "craters": _load_craters,
    "cifar10": _load_cifar10,
    "mnist": _load_mnist,
    "imagefolder": _load_imagefolder,
    "custom": _load_custom,
}
