"""Offline loaders for real datasets kept as local files (nothing is ever downloaded).

Every loader returns :class:`Arrays`: whole train/test tensors, the number of classes and, for the
naturally partitioned FedML h5 datasets, the per-client index lists into ``x_train``.

Supported on-disk layouts, one module each:

* ``cifar`` — CIFAR-10, the official python pickle batches (``data_batch_1..5``, ``test_batch``), as a
  folder, a folder holding ``cifar-10-batches-py/``, or a tar archive of it (extracted once into a cache).
  The md5 of the files is not checked, so re-packed copies are accepted.
* ``idx`` — MNIST / Fashion-MNIST, the four ``*-idx?-ubyte`` files, gzipped or not.
* ``imdb`` — IMDB, the raw ``aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt`` reviews (folder or tar archive).
* ``fedml_h5`` — FedML's federated h5 files (TFF-derived): ``femnist``, ``fed_cifar100`` and
  ``fed_shakespeare`` (its character ids in ``shakespeare``).

``archives`` extracts archives into ``cache_dir`` (default ``~/.cache/fedml_prism``) under a folder named
after the archive plus a short hash of its absolute path, size and modification time; a marker file
written after a complete extraction lets later calls reuse the folder without touching the archive
again. ``registry`` maps dataset names to loaders (:data:`LOADERS`, :func:`register`, :func:`load`).
"""

from __future__ import annotations

from .archives import ARCHIVE_SUFFIXES, DEFAULT_CACHE_DIR, extract_once
from .arrays import Arrays
from .cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, load_cifar10
from .fedml_h5 import H5_FILES, load_fedml_h5
from .idx import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    MNIST_MEAN,
    MNIST_STD,
    load_idx_images,
)
from .imdb import build_vocab, encode, load_imdb, tokenize
from .registry import LOADERS, Loader, load, register
from .shakespeare import (
    SHAKESPEARE_BOS,
    SHAKESPEARE_CHARS,
    SHAKESPEARE_EOS,
    SHAKESPEARE_OOV,
    SHAKESPEARE_PAD,
    SHAKESPEARE_SEQ_LEN,
    SHAKESPEARE_VOCAB_SIZE,
    shakespeare_chunks,
)

__all__ = [
    "ARCHIVE_SUFFIXES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DEFAULT_CACHE_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "H5_FILES",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "LOADERS",
    "MNIST_MEAN",
    "MNIST_STD",
    "SHAKESPEARE_BOS",
    "SHAKESPEARE_CHARS",
    "SHAKESPEARE_EOS",
    "SHAKESPEARE_OOV",
    "SHAKESPEARE_PAD",
    "SHAKESPEARE_SEQ_LEN",
    "SHAKESPEARE_VOCAB_SIZE",
    "Arrays",
    "Loader",
    "build_vocab",
    "encode",
    "extract_once",
    "load",
    "load_cifar10",
    "load_fedml_h5",
    "load_idx_images",
    "load_imdb",
    "register",
    "shakespeare_chunks",
    "tokenize",
]
