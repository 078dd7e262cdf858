"""IMDB: the raw ``aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt`` reviews (folder or tar archive),
tokenized and encoded against a vocabulary of the train split."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from .archives import find_root
from .arrays import Arrays

_IMDB_LAYOUT = (
    "expected aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt (raw text layout): the folder holding aclImdb/, "
    "the aclImdb folder itself, or the .tar.gz archive of it"
)

_TOKEN_RE = re.compile(r"[a-z0-9']+")


def tokenize(text: str) -> list[str]:
    """Lowercase, turn ``<br />`` into a space, and keep the runs of ``[a-z0-9']``."""
    return _TOKEN_RE.findall(text.lower().replace("<br />", " "))


def _rank(counts: Counter[str], size: int) -> dict[str, int]:
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]
    return {word: i + 1 for i, (word, _) in enumerate(ranked)}


def build_vocab(texts: Iterable[str], size: int) -> dict[str, int]:
    """The ``size`` most frequent words (ties alphabetical) mapped to ids ``1..size``; 0 is pad/OOV."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(tokenize(text))
    return _rank(counts, size)


def _encode_tokens(token_lists: Iterable[list[str]], vocab: dict[str, int], max_len: int) -> np.ndarray:
    rows = [[vocab.get(word, 0) for word in tokens[:max_len]] for tokens in token_lists]
    out = np.zeros((len(rows), max_len), dtype=np.int64)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = ids
    return out


def encode(texts: Iterable[str], vocab: dict[str, int], max_len: int) -> np.ndarray:
    """int64 N×max_len: the first ``max_len`` token ids of each text (OOV → 0), right-padded with 0."""
    return _encode_tokens((tokenize(text) for text in texts), vocab, max_len)


def _is_imdb_root(folder: Path) -> bool:
    return all((folder / split / label).is_dir() for split in ("train", "test") for label in ("pos", "neg"))


def _review_key(file: Path) -> tuple[int, str]:
    head = file.stem.split("_", 1)[0]
    return (int(head) if head.isdigit() else -1, file.name)


def _read_imdb_split(root: Path, split: str) -> tuple[list[str], np.ndarray]:
    texts: list[str] = []
    labels: list[int] = []
    for label_name, label in (("neg", 0), ("pos", 1)):
        files = sorted((root / split / label_name).glob("*.txt"), key=_review_key)
        if not files:
            raise ValueError(f"IMDB folder {root / split / label_name} holds no <id>_<rating>.txt reviews; {_IMDB_LAYOUT}")
        texts.extend(f.read_text(encoding="utf-8", errors="replace") for f in files)
        labels.extend([label] * len(files))
    return texts, np.asarray(labels, dtype=np.int64)


def load_imdb(
    path: str | os.PathLike[str],
    vocab_size: int = 1000,
    max_len: int = 200,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Arrays:
    """IMDB reviews as token ids: x int64 N×max_len, y int64 (neg=0, pos=1), 2 classes.

    The vocabulary is the ``vocab_size`` most frequent words of the train split (ties alphabetical),
    ids ``1..vocab_size``; id 0 is both padding and out-of-vocabulary, so an embedding needs
    ``vocab_size + 1`` rows. Each review keeps its first ``max_len`` tokens (OOV tokens stay, as 0)
    and is right-padded with 0. Within a split the reviews are ordered neg then pos, each by id.
    """
    path = Path(path).expanduser()
    root = find_root(path, lambda p: (p, p / "aclImdb"), _is_imdb_root, ("aclImdb*.tar*", "aclImdb*.tgz"), cache_dir)
    if root is None:
        raise FileNotFoundError(f"IMDB not found at {path}: {_IMDB_LAYOUT}")
    train_texts, y_train = _read_imdb_split(root, "train")
    test_texts, y_test = _read_imdb_split(root, "test")
    train_tokens = [tokenize(text) for text in train_texts]
    counts: Counter[str] = Counter()
    for tokens in train_tokens:
        counts.update(tokens)
    vocab = _rank(counts, vocab_size)
    return Arrays(
        x_train=torch.from_numpy(_encode_tokens(train_tokens, vocab, max_len)),
        y_train=torch.from_numpy(y_train),
        x_test=torch.from_numpy(encode(test_texts, vocab, max_len)),
        y_test=torch.from_numpy(y_test),
        num_classes=2,
    )
