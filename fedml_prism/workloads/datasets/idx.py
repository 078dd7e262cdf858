"""MNIST / Fashion-MNIST: the four ``*-idx?-ubyte`` files, gzipped or not."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from .arrays import Arrays

FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


def _open_idx(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(file: Path, magic: int, dims: int) -> np.ndarray:
    """Parse an idx file with unsigned-byte payload: big-endian magic, ``dims`` big-endian sizes, data."""
    opener = gzip.open if file.name.endswith(".gz") else open
    try:
        with opener(file, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read idx file {file}: {err}") from err
    header = 4 * (1 + dims)
    if len(raw) < header:
        raise ValueError(f"idx file {file} is truncated: {len(raw)} bytes, header needs {header}")
    found = struct.unpack(">i", raw[:4])[0]
    if found != magic:
        raise ValueError(f"idx file {file} has magic number {found}, expected {magic}")
    shape = struct.unpack(f">{dims}i", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(
            f"idx file {file} holds {len(raw) - header} data bytes, its header {tuple(shape)} announces {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_idx_images(
    path: str | os.PathLike[str],
    prefix: tuple[str, str] = ("train", "t10k"),
    mean: float = FASHION_MNIST_MEAN,
    std: float = FASHION_MNIST_STD,
) -> Arrays:
    """MNIST-style idx files: x float32 N×1×H×W, scaled to [0, 1] then ``(x - mean) / std``; 10 classes.

    Reads ``<prefix>-images-idx3-ubyte[.gz]`` and ``<prefix>-labels-idx1-ubyte[.gz]`` for the train
    and test prefixes; the magic numbers (2051 images, 2049 labels) and counts are validated.
    """
    folder = Path(path).expanduser()
    splits: list[tuple[torch.Tensor, torch.Tensor]] = []
    for split in prefix:
        names = (f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte")
        files = [_open_idx(folder, name) for name in names]
        if any(f is None for f in files):
            expected = ", ".join(f"{name}[.gz]" for p in prefix for name in (f"{p}-images-idx3-ubyte", f"{p}-labels-idx1-ubyte"))
            raise FileNotFoundError(
                f"idx images not found at {folder}: expected a folder holding {expected} (MNIST idx format, gzipped or not)"
            )
        images = _read_idx(files[0], IDX_IMAGES_MAGIC, 3)
        labels = _read_idx(files[1], IDX_LABELS_MAGIC, 1)
        if len(images) != len(labels):
            raise ValueError(f"{files[0]} holds {len(images)} images but {files[1]} holds {len(labels)} labels")
        if labels.size and labels.max() > 9:
            raise ValueError(f"{files[1]} has labels outside 0..9")
        x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1).div_(255.0).sub_(mean).div_(std)
        splits.append((x, torch.from_numpy(labels.astype(np.int64))))
    (x_train, y_train), (x_test, y_test) = splits
    return Arrays(x_train, y_train, x_test, y_test, num_classes=10)
