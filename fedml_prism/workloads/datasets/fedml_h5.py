"""FedML's federated h5 files (TFF-derived): ``femnist``, ``fed_cifar100`` and ``fed_shakespeare``, with
their natural clients."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .arrays import Arrays, normalize_images
from .cifar import CIFAR100_MEAN, CIFAR100_STD
from .shakespeare import SHAKESPEARE_SEQ_LEN, SHAKESPEARE_VOCAB_SIZE, shakespeare_chunks

H5_FILES = {
    "femnist": ("fed_emnist_train.h5", "fed_emnist_test.h5", "examples/<client_id>/{pixels,label}"),
    "fed_cifar100": ("fed_cifar100_train.h5", "fed_cifar100_test.h5", "examples/<client_id>/{image,label}"),
    "fed_shakespeare": ("shakespeare_train.h5", "shakespeare_test.h5", "examples/<client_id>/snippets"),
}


def _client_groups(file: Path, h5: Any) -> list[tuple[str, Any]]:
    if "examples" not in h5:
        raise ValueError(f"{file} has no 'examples' group: expected examples/<client_id>/... (FedML/TFF h5 layout)")
    examples = h5["examples"]
    return [(client_id, examples[client_id]) for client_id in sorted(examples.keys())]


def _dataset(file: Path, client_id: str, group: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in group:
            return group[key]
    raise ValueError(f"{file}: client {client_id!r} has none of the datasets {list(keys)} (FedML/TFF h5 layout)")


def _read_image_clients(
    file: Path, image_key: str, label_keys: tuple[str, ...], image_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Images and labels of every client (sorted ids), filled into preallocated arrays."""
    import h5py

    with h5py.File(file, "r") as h5:
        clients = _client_groups(file, h5)
        pairs = []
        for client_id, group in clients:
            images = _dataset(file, client_id, group, (image_key,))
            labels = _dataset(file, client_id, group, label_keys)
            if tuple(images.shape[1:]) != image_shape or labels.shape != (images.shape[0],):
                raise ValueError(
                    f"{file}: client {client_id!r} has {image_key} {images.shape} and labels {labels.shape}; "
                    f"expected N×{'×'.join(map(str, image_shape))} and (N,)"
                )
            pairs.append((images, labels))
        sizes = [int(images.shape[0]) for images, _ in pairs]
        x = np.empty((sum(sizes), *image_shape), dtype=pairs[0][0].dtype if pairs else np.float32)
        y = np.empty(sum(sizes), dtype=np.int64)
        start = 0
        for (images, labels), size in zip(pairs, sizes, strict=True):
            x[start : start + size] = images[()]
            y[start : start + size] = labels[()]
            start += size
    return x, y, sizes


def _ranges(sizes: list[int]) -> list[np.ndarray]:
    offsets = np.cumsum([0, *sizes], dtype=np.int64)
    return [np.arange(offsets[i], offsets[i + 1], dtype=np.int64) for i in range(len(sizes))]


def _load_femnist(train: Path, test: Path) -> Arrays:
    """Ink is bright: ``1 - pixels`` in [0, 1]; the normalization is the identity (mean 0, std 1)."""
    splits = []
    for file in (train, test):
        pixels, labels, sizes = _read_image_clients(file, "pixels", ("label",), (28, 28))
        x = torch.from_numpy(pixels.astype(np.float32, copy=False)).unsqueeze(1).neg_().add_(1.0)
        splits.append((x, torch.from_numpy(labels), sizes))
    (x_train, y_train, sizes), (x_test, y_test, _) = splits
    return Arrays(x_train, y_train, x_test, y_test, num_classes=62, natural_clients=_ranges(sizes))


def _load_fed_cifar100(train: Path, test: Path) -> Arrays:
    splits = []
    for file in (train, test):
        images, labels, sizes = _read_image_clients(file, "image", ("label", "fine_label"), (32, 32, 3))
        x = normalize_images(images.astype(np.uint8, copy=False).transpose(0, 3, 1, 2), CIFAR100_MEAN, CIFAR100_STD)
        splits.append((x, torch.from_numpy(labels), sizes))
    (x_train, y_train, sizes), (x_test, y_test, _) = splits
    return Arrays(x_train, y_train, x_test, y_test, num_classes=100, natural_clients=_ranges(sizes))


def _read_shakespeare(file: Path) -> tuple[np.ndarray, list[int]]:
    import h5py

    with h5py.File(file, "r") as h5:
        chunks, sizes = [], []
        for client_id, group in _client_groups(file, h5):
            snippets = _dataset(file, client_id, group, ("snippets",))[()]
            client = shakespeare_chunks(np.atleast_1d(snippets).tolist())
            chunks.append(client)
            sizes.append(len(client))
    data = np.concatenate(chunks) if chunks else np.zeros((0, SHAKESPEARE_SEQ_LEN + 1), dtype=np.int64)
    return data, sizes


def _load_fed_shakespeare(train: Path, test: Path) -> Arrays:
    """Next-character prediction: x = chunk[:-1], y = chunk[1:] (int64 N×80)."""
    train_chunks, sizes = _read_shakespeare(train)
    test_chunks, _ = _read_shakespeare(test)
    return Arrays(
        x_train=torch.from_numpy(np.ascontiguousarray(train_chunks[:, :-1])),
        y_train=torch.from_numpy(np.ascontiguousarray(train_chunks[:, 1:])),
        x_test=torch.from_numpy(np.ascontiguousarray(test_chunks[:, :-1])),
        y_test=torch.from_numpy(np.ascontiguousarray(test_chunks[:, 1:])),
        num_classes=SHAKESPEARE_VOCAB_SIZE,
        natural_clients=_ranges(sizes),
    )


_H5_READERS: dict[str, Callable[[Path, Path], Arrays]] = {
    "femnist": _load_femnist,
    "fed_cifar100": _load_fed_cifar100,
    "fed_shakespeare": _load_fed_shakespeare,
}


def load_fedml_h5(name: str, path: str | os.PathLike[str]) -> Arrays:
    """One of FedML's federated h5 datasets (``femnist``, ``fed_cifar100``, ``fed_shakespeare``).

    Clients are taken in sorted id order; ``natural_clients[i]`` indexes ``x_train`` rows of train
    client ``i``; the test split concatenates every test client.

    * ``femnist``: x float32 N×1×28×28 = ``1 - pixels`` (ink bright, in [0, 1], no further normalization), 62 classes.
    * ``fed_cifar100``: x float32 N×3×32×32 normalized with the CIFAR-100 mean/std; labels from ``label``
      (or ``fine_label``), 100 classes.
    * ``fed_shakespeare``: x, y int64 N×80 over :data:`SHAKESPEARE_VOCAB_SIZE` ids (pad 0, the 86
      characters of :data:`SHAKESPEARE_CHARS` as 1..86, bos 87, eos 88, oov 89); y is x shifted by one.
    """
    if name not in H5_FILES:
        raise ValueError(f"unknown FedML h5 dataset {name!r}: expected one of {sorted(H5_FILES)}")
    folder = Path(path).expanduser()
    train_name, test_name, layout = H5_FILES[name]
    train, test = folder / train_name, folder / test_name
    if not (train.is_file() and test.is_file()):
        raise FileNotFoundError(
            f"{name} not found at {folder}: expected a folder holding {train_name} and {test_name} "
            f"(FedML/TFF h5 layout: {layout})"
        )
    return _H5_READERS[name](train, test)
