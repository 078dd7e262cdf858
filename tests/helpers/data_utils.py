"""Random datasets written in the offline loaders' real on-disk formats, sized for end-to-end runs.

Each writer fills a folder the matching loader in :mod:`fedml_prism.workloads.datasets` reads unchanged, with
seeded random content (pixels, labels, words, characters), so a tiny federated run trains on it.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np

from fedml_prism.workloads.datasets import SHAKESPEARE_CHARS

IMDB_WORDS = ("good", "great", "fun", "bad", "awful", "boring", "film", "plot", "actor", "scene", "music", "ending")


def write_cifar10(folder: Path, per_batch: int = 8, test: int = 8, seed: int = 0) -> Path:
    """``data_batch_1..5`` (``per_batch`` images each) and ``test_batch``: pickled dicts with
    ``b'data'`` (uint8 N×3072, channel-major) and ``b'labels'`` (ints 0..9)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def write_imdb(parent: Path, per_label: int = 12, words: int = 10, seed: int = 0) -> Path:
    """``parent/aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt``: ``per_label`` reviews of
    ``words`` random words each per split and label (ratings 7..10 positive, 1..4 negative)."""
    rng = np.random.default_rng(seed)
    root = parent / "aclImdb"
    for split in ("train", "test"):
        for label, ratings in (("pos", (7, 11)), ("neg", (1, 5))):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_label):
                text = " ".join(rng.choice(IMDB_WORDS, words))
                rating = int(rng.integers(*ratings))
                (folder / f"{i}_{rating}.txt").write_text(text.capitalize() + ".<br />The end", encoding="utf-8")
    return parent


def write_fed_shakespeare(folder: Path, clients: int = 4, snippets: int = 2, chars: int = 100, seed: int = 0) -> Path:
    """FedML's ``shakespeare_{train,test}.h5``: ``examples/<client_id>/snippets``, variable-length
    strings of random vocabulary characters (``chars`` each: 2 rows of 81 after bos/eos)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = np.array(list(SHAKESPEARE_CHARS))
    for split in ("train", "test"):
        with h5py.File(folder / f"shakespeare_{split}.h5", "w") as h5:
            for c in range(clients):
                texts = ["".join(rng.choice(alphabet, chars)) for _ in range(snippets)]
                h5.create_dataset(f"examples/client_{c:03d}/snippets", data=np.array(texts, dtype=object),
                                  dtype=h5py.string_dtype())
    return folder


def write_femnist(folder: Path, clients: int = 4, per_client: int = 10, seed: int = 0) -> Path:
    """FedML's ``fed_emnist_{train,test}.h5``: ``examples/<client_id>/{pixels (N×28×28 float32 in
    [0, 1]), label (N ints in 0..61)}``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        with h5py.File(folder / f"fed_emnist_{split}.h5", "w") as h5:
            for c in range(clients):
                h5.create_dataset(f"examples/f{c:04d}/pixels", data=rng.random((per_client, 28, 28), dtype=np.float32))
                h5.create_dataset(f"examples/f{c:04d}/label", data=rng.integers(0, 62, per_client, dtype=np.int32))
    return folder


class Interrupted(Exception):
    """Raised by :func:`interrupt_at_round` to stop a method's run as a crash would."""


def interrupt_at_round(monkeypatch, module, round_idx: int) -> None:
    """Make the round driver's ``select_clients`` raise :class:`Interrupted` when round ``round_idx``
    (0-based) of ``module``'s run opens: the run stops after its checkpoint of the rounds before."""
    from fedml_prism.strategies import driver

    module = driver  # every in-process method's rounds open in the driver
    real = module.select_clients

    def stop(seed, r, total, per_round):
        if r == round_idx:
            raise Interrupted
        return real(seed, r, total, per_round)

    monkeypatch.setattr(module, "select_clients", stop)
