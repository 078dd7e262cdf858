"""CIFAR-10 from the official python pickle batches (``data_batch_1..5``, ``test_batch``), as a folder,
a folder holding ``cifar-10-batches-py/``, or a tar archive of it (extracted once into a cache).
The md5 of the files is not checked, so re-packed copies are accepted. Also the CIFAR-100 channel
mean/std, used for FedML's ``fed_cifar100``."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .archives import find_root
from .arrays import Arrays, normalize_images

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_CIFAR_LAYOUT = (
    "expected a folder holding data_batch_1..5 and test_batch (python pickle layout, optionally inside "
    "cifar-10-batches-py/), or the .tar.gz/.tar.xz archive of it"
)


def _is_cifar10_root(folder: Path) -> bool:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return all((folder / name).is_file() for name in names)


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    layout = "expected a pickled dict with b'data' (uint8 N×3072) and b'labels' (N ints in 0..9)"
    try:
        with open(file, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as err:
        raise ValueError(f"CIFAR-10 batch {file} is malformed ({err}): {layout}") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"CIFAR-10 batch {file} is malformed: {layout}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
        raise ValueError(
            f"CIFAR-10 batch {file} is malformed: data {data.dtype} {data.shape}, labels {labels.shape}; {layout}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"CIFAR-10 batch {file} is malformed: labels outside 0..9; {layout}")
    return data, labels


def load_cifar10(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Arrays:
    """CIFAR-10 from the python pickle batches: x float32 N×3×32×32 (normalized), y int64, 10 classes.

    ``path`` is a folder holding the batches, a folder holding ``cifar-10-batches-py/`` (or a
    ``cifar-10*.tar*`` archive), or a tar archive containing ``cifar-10-batches-py/``.
    """
    path = Path(path).expanduser()
    root = find_root(
        path,
        lambda p: (p, p / "cifar-10-batches-py"),
        _is_cifar10_root,
        ("cifar-10*.tar*", "cifar-10*.tgz"),
        cache_dir,
    )
    if root is None:
        raise FileNotFoundError(f"CIFAR-10 not found at {path}: {_CIFAR_LAYOUT}")
    train = [_read_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = _read_cifar_batch(root / "test_batch")
    x_train = np.concatenate([x for x, _ in train]).reshape(-1, 3, 32, 32)
    y_train = np.concatenate([y for _, y in train])
    return Arrays(
        x_train=normalize_images(x_train, CIFAR10_MEAN, CIFAR10_STD),
        y_train=torch.from_numpy(y_train),
        x_test=normalize_images(x_test.reshape(-1, 3, 32, 32), CIFAR10_MEAN, CIFAR10_STD),
        y_test=torch.from_numpy(y_test),
        num_classes=10,
    )
