"""Loaders by dataset name: the built-in ones, and :func:`register` for more."""

from __future__ import annotations

import os
from collections.abc import Callable

from .arrays import Arrays
from .cifar import load_cifar10
from .fedml_h5 import load_fedml_h5
from .idx import MNIST_MEAN, MNIST_STD, load_idx_images
from .imdb import load_imdb

Loader = Callable[..., Arrays]


def _h5_loader(name: str) -> Loader:
    def load(path: str | os.PathLike[str]) -> Arrays:
        return load_fedml_h5(name, path)

    load.__name__ = f"load_{name}"
    load.__doc__ = f"FedML's federated h5 dataset {name!r}; see :func:`load_fedml_h5`."
    return load


def _load_mnist(path: str | os.PathLike[str], prefix: tuple[str, str] = ("train", "t10k")) -> Arrays:
    """MNIST idx files, normalized with MNIST's own mean/std (0.1307, 0.3081)."""
    return load_idx_images(path, prefix, mean=MNIST_MEAN, std=MNIST_STD)


LOADERS: dict[str, Loader] = {
    "cifar10": load_cifar10,
    "fashion_mnist": load_idx_images,
    "mnist": _load_mnist,
    "imdb": load_imdb,
    "femnist": _h5_loader("femnist"),
    "fed_cifar100": _h5_loader("fed_cifar100"),
    "fed_shakespeare": _h5_loader("fed_shakespeare"),
}


def register(name: str, loader: Loader) -> Loader:
    """Add (or replace) a loader ``(path, **kwargs) -> Arrays`` under ``name``; returns it."""
    LOADERS[name] = loader
    return loader


def load(name: str, path: str | os.PathLike[str], **kwargs: object) -> Arrays:
    """Dispatch to ``LOADERS[name]``."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {sorted(LOADERS)}")
    return LOADERS[name](path, **kwargs)
