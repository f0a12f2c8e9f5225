"""Datasets held as tensors, and a loader that shuffles and augments on their device.

Two datasets are registered:

- ``digits``: the 8x8 handwritten digits that scikit-learn ships (1,797 images, one
  channel, 10 classes), split 80/20 stratified by class with a fixed seed and
  normalized with the training set's mean and standard deviation. It needs no
  download, so it is the default.
- ``cifar10``: the official python-pickle layout (``cifar-10-batches-py/`` with
  ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``). Training batches may be a
  subset (only ``data_batch_1``, say). Training uses pad-4 random crops and
  horizontal flips; both splits use the standard per-channel normalization.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
# MD5 of each file of the official release, to tell it from a subset.
CIFAR10_FILE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_FOLDER = "cifar-10-batches-py"


class DatasetError(RuntimeError):
    """A dataset is missing, corrupt or cannot be downloaded."""


@dataclass
class ImageDataset:
    """Train and test images as NCHW tensors, with what the loader needs to know.

    ``uint8`` images are scaled to [0, 1] and normalized with ``mean`` and ``std``
    per batch; float images are used as stored.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    augment: bool
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    source: str = ""

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    def to(self, device: torch.device | str) -> "ImageDataset":
        """Move every tensor to ``device`` (the whole set lives there)."""
        for field in ("train_x", "train_y", "test_x", "test_y"):
            setattr(self, field, getattr(self, field).to(device))
        return self


def load_digits_dataset(test_fraction: float = 0.2, split_seed: int = 0) -> ImageDataset:
    """Load scikit-learn's 8x8 digits with a fixed stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, stratify=digits.target, random_state=split_seed
    )
    mean, std = float(x_train.mean()), float(x_train.std())
    to_tensor = lambda a: torch.from_numpy((a - mean) / std).unsqueeze(1)  # (N, 1, 8, 8)
    return ImageDataset(
        name="digits",
        train_x=to_tensor(x_train),
        train_y=torch.from_numpy(y_train.astype(np.int64)),
        test_x=to_tensor(x_test),
        test_y=torch.from_numpy(y_test.astype(np.int64)),
        num_classes=10,
        augment=False,
        source="sklearn.datasets.load_digits",
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds only dicts, lists, bytes and numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")
        return super().find_class(module, name)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file and check its structure; return (N, 3, 32, 32) uint8 and labels."""
    fix = f"replace {path} with the file from the official CIFAR-10 archive ({CIFAR10_URL})"
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except Exception as error:  # any decoding failure means the file is corrupt
        raise DatasetError(f"corrupt CIFAR-10 batch {path}: {error}; {fix}") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DatasetError(f"corrupt CIFAR-10 batch {path}: no b'data' and b'labels' entries; {fix}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(
            f"corrupt CIFAR-10 batch {path}: data has dtype {data.dtype} and shape {data.shape}, "
            f"expected uint8 (N, 3072); {fix}"
        )
    if labels.shape != (data.shape[0],) or labels.size == 0:
        raise DatasetError(f"corrupt CIFAR-10 batch {path}: {labels.size} labels for {data.shape[0]} images; {fix}")
    if labels.min() < 0 or labels.max() > 9:
        raise DatasetError(
            f"corrupt CIFAR-10 batch {path}: labels range {labels.min()}..{labels.max()}, expected 0..9; {fix}"
        )
    return data.reshape(-1, 3, 32, 32), labels


MANIFEST = "checksums.md5"


def verify_checksums(folder: Path, paths: list[Path]) -> bool:
    """Check each file's MD5 before anything is unpickled; return whether all are official.

    A file is accepted when its MD5 is the official release's, or when ``checksums.md5``
    in the folder (``md5sum`` format) lists it with a matching MD5. A listed file that
    does not match raises :class:`DatasetError`. Files neither official nor listed are
    read anyway, with the array-only unpickler and a logged warning.
    """
    manifest = {}
    if (folder / MANIFEST).is_file():
        for line in (folder / MANIFEST).read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                manifest[parts[1].lstrip("*")] = parts[0].lower()
    official, unverified = True, []
    for path in paths:
        checksum = _md5(path)
        if checksum == CIFAR10_FILE_MD5.get(path.name):
            continue
        official = False
        if path.name in manifest:
            if manifest[path.name] != checksum:
                raise DatasetError(
                    f"corrupt CIFAR-10 batch {path}: MD5 {checksum}, but {folder / MANIFEST} lists "
                    f"{manifest[path.name]}; restore the file or regenerate the manifest with md5sum"
                )
            continue
        unverified.append(path.name)
    if unverified:
        log.warning(
            "CIFAR-10 files %s in %s match neither the official MD5 nor a %s entry; they are read with an "
            "unpickler that builds only arrays", unverified, folder, MANIFEST,
        )
    return official


def find_cifar10(root: Path) -> Path | None:
    """Return the folder holding the batch files under ``root``, or None."""
    for candidate in (root / CIFAR10_FOLDER, root):
        if (candidate / "test_batch").is_file() and (candidate / "data_batch_1").is_file():
            return candidate
    return None


def download_cifar10(root: Path, timeout: float = 60.0) -> Path:
    """Download the official archive into ``root``, verify its MD5 and extract it."""
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-python.tar.gz"
    if not archive.is_file():
        partial = archive.with_suffix(".part")
        log.info("downloading %s to %s", CIFAR10_URL, archive)
        try:
            with urllib.request.urlopen(CIFAR10_URL, timeout=timeout) as response, open(partial, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise DatasetError(
                f"CIFAR-10 not found under {root} and the download from {CIFAR10_URL} failed ({error}); "
                f"download the archive by hand and extract it there, or pass --data-root with the "
                f"folder that holds {CIFAR10_FOLDER}/"
            ) from error
        os.replace(partial, archive)
    checksum = _md5(archive)
    if checksum != CIFAR10_ARCHIVE_MD5:
        raise DatasetError(
            f"corrupt CIFAR-10 archive {archive}: MD5 {checksum}, expected {CIFAR10_ARCHIVE_MD5}; delete it and retry"
        )
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, filter="data")
    return root / CIFAR10_FOLDER


def load_cifar10_dataset(root: str | os.PathLike, download: bool = False) -> ImageDataset:
    """Load CIFAR-10 from ``root`` (the folder that holds ``cifar-10-batches-py/``, or it).

    Files that match the official MD5 are used as they are; other files (a subset) are
    read with an unpickler that builds nothing but arrays, and their structure is
    checked. Raises :class:`DatasetError` naming the folder when files are missing or
    corrupt.
    """
    root = Path(root).expanduser()
    folder = find_cifar10(root)
    if folder is None:
        if not download:
            raise DatasetError(
                f"CIFAR-10 not found: looked for {root / CIFAR10_FOLDER}/test_batch and {root}/test_batch. "
                f"Pass --data-root with the folder that holds {CIFAR10_FOLDER}/ (the official python "
                f"archive from {CIFAR10_URL}, extracted), or add --download (download=True in code) to fetch it there"
            )
        folder = download_cifar10(root)

    train_files = [folder / f"data_batch_{i}" for i in range(1, 6) if (folder / f"data_batch_{i}").is_file()]
    subset = not verify_checksums(folder, [*train_files, folder / "test_batch"])
    parts = [_read_cifar_batch(path) for path in train_files]
    test_x, test_y = _read_cifar_batch(folder / "test_batch")
    train_x = np.concatenate([x for x, _ in parts])
    train_y = np.concatenate([y for _, y in parts])
    if subset:
        log.info("CIFAR-10 at %s is not the official release: %d training images", folder, len(train_y))
    return ImageDataset(
        name="cifar10",
        train_x=torch.from_numpy(train_x),
        train_y=torch.from_numpy(train_y),
        test_x=torch.from_numpy(test_x),
        test_y=torch.from_numpy(test_y),
        num_classes=10,
        augment=True,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        source=f"{folder}{' (subset)' if subset else ''}",
    )


def load_dataset(name: str, data_root: str | os.PathLike | None = None, download: bool = False) -> ImageDataset:
    """Load a registered dataset by name."""
    if name == "digits":
        return load_digits_dataset()
    if name == "cifar10":
        return load_cifar10_dataset(data_root if data_root is not None else "data", download=download)
    raise ValueError(f"unknown dataset {name!r}: known datasets are {list(DATASETS)}")


class TensorLoader:
    """Iterate over (images, labels) batches of tensors that already sit on a device.

    Shuffling and augmentation (pad-4 random crop, horizontal flip) draw only from
    this loader's own ``torch.Generator``, so the batch order depends on ``seed`` and
    on nothing else that runs in the process.

    With ``world_size`` > 1 (one loader per rank under ``torch.distributed``, all with
    the same ``seed``) every rank draws the same permutation and takes every
    ``world_size``-th image from position ``rank``, so the ranks split each epoch
    without overlap. Each rank's batches hold ``batch_size`` images. The last
    ``len % world_size`` images of each epoch's permutation are left out, so every
    rank takes the same number of steps.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        augment: bool = False,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"invalid batch_size={batch_size}: expected an integer >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"invalid rank={rank} for world_size={world_size}: expected 0 <= rank < world_size")
        self.rank, self.world_size = rank, world_size
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.generator = torch.Generator().manual_seed(seed)
        shape = (1, -1, 1, 1)
        self.mean = None if mean is None else torch.tensor(mean, device=x.device).view(shape)
        self.std = None if std is None else torch.tensor(std, device=x.device).view(shape)

    def __len__(self) -> int:
        n = len(self.y) // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def prepare(self, x: torch.Tensor, augment: bool) -> torch.Tensor:
        """Scale uint8 images to [0, 1], augment if asked, then normalize."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        if augment:
            x = self._random_crop_flip(x)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x

    def _random_crop_flip(self, x: torch.Tensor, pad: int = 4) -> torch.Tensor:
        batch, channels, height, width = x.shape
        offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=self.generator).to(x.device)
        flips = (torch.rand(batch, generator=self.generator) < 0.5).to(x.device)
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        rows = offsets[0, :, None] + torch.arange(height, device=x.device)  # (batch, height)
        cols = offsets[1, :, None] + torch.arange(width, device=x.device)  # (batch, width)
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        index = torch.arange(batch, device=x.device)[:, None, None, None]
        channel = torch.arange(channels, device=x.device)[None, :, None, None]
        return padded[index, channel, rows[:, None, :, None], cols[:, None, None, :]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        usable = n - n % self.world_size  # equal shards, so no rank waits for a step the others never take
        order = order[:usable][self.rank :: self.world_size].to(self.x.device)
        n = len(order)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            if self.drop_last and len(index) < self.batch_size:
                break
            yield self.prepare(self.x[index], self.augment), self.y[index]
