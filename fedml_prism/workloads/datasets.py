"""Offline loaders for real datasets kept as local files (nothing is ever downloaded).

Every loader returns :class:`Arrays`: whole train/test tensors, the number of classes and, for the
naturally partitioned FedML h5 datasets, the per-client index lists into ``x_train``.

Supported on-disk layouts:

* CIFAR-10 — the official python pickle batches (``data_batch_1..5``, ``test_batch``), as a folder,
  a folder holding ``cifar-10-batches-py/``, or a tar archive of it (extracted once into a cache).
  The md5 of the files is not checked, so re-packed copies are accepted.
* MNIST / Fashion-MNIST — the four ``*-idx?-ubyte`` files, gzipped or not.
* IMDB — the raw ``aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt`` reviews (folder or tar archive).
* FedML's federated h5 files (TFF-derived): ``femnist``, ``fed_cifar100`` and ``fed_shakespeare``.

Archives are extracted into ``cache_dir`` (default ``~/.cache/fedml_prism``) under a folder named after
the archive plus a short hash of its absolute path, size and modification time; a marker file written
after a complete extraction lets later calls reuse the folder without touching the archive again.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import re
import shutil
import struct
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_CACHE_DIR = Path("~/.cache/fedml_prism")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tar")
_EXTRACTED_MARKER = ".fedml_prism_extracted"

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049

# The 86 characters of TFF's (and FedML's) Shakespeare character vocabulary, in their id order.
SHAKESPEARE_CHARS = "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
SHAKESPEARE_PAD = 0
SHAKESPEARE_BOS = len(SHAKESPEARE_CHARS) + 1
SHAKESPEARE_EOS = len(SHAKESPEARE_CHARS) + 2
SHAKESPEARE_OOV = len(SHAKESPEARE_CHARS) + 3
SHAKESPEARE_VOCAB_SIZE = len(SHAKESPEARE_CHARS) + 4
SHAKESPEARE_SEQ_LEN = 80

_CIFAR_LAYOUT = (
    "expected a folder holding data_batch_1..5 and test_batch (python pickle layout, optionally inside "
    "cifar-10-batches-py/), or the .tar.gz/.tar.xz archive of it"
)
_IMDB_LAYOUT = (
    "expected aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt (raw text layout): the folder holding aclImdb/, "
    "the aclImdb folder itself, or the .tar.gz archive of it"
)


@dataclass
class Arrays:
    """A dataset as whole tensors; ``natural_clients[i]`` indexes ``x_train`` rows of natural client ``i``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    natural_clients: list[np.ndarray] | None = None


# ---------------------------------------------------------------------------------------------------------
# Archives and cache


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for member in tar.getmembers():
        target = (dest / member.name).resolve()
        if not target.is_relative_to(root) or member.issym() or member.islnk() or member.isdev():
            raise ValueError(f"refusing to extract unsafe archive member {member.name!r}")
    tar.extractall(dest)


def extract_once(archive: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Extract a tar archive into ``cache_dir`` unless an earlier call already did; returns the folder."""
    archive = Path(archive)
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    stat = archive.stat()
    key = f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    dest = cache / f"{_archive_stem(archive)}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (dest / _EXTRACTED_MARKER).exists():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=cache))
    tmp.chmod(0o755)
    try:
        try:
            with tarfile.open(archive) as tar:
                _safe_extract(tar, tmp)
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"cannot extract archive {archive}: {err}") from err
        (tmp / _EXTRACTED_MARKER).write_text(str(archive.resolve()) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / _EXTRACTED_MARKER).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _find_root(
    path: Path,
    candidates: Callable[[Path], Iterable[Path]],
    is_root: Callable[[Path], bool],
    archive_globs: tuple[str, ...],
    cache_dir: str | os.PathLike[str] | None,
    allow_archives: bool = True,
) -> Path | None:
    """The first folder accepted by ``is_root`` reachable from ``path`` (a folder or an archive)."""
    if allow_archives and _is_archive(path):
        return _find_root(extract_once(path, cache_dir), candidates, is_root, archive_globs, cache_dir, False)
    if not path.is_dir():
        return None
    for candidate in candidates(path):
        if is_root(candidate):
            return candidate
    if allow_archives:
        for pattern in archive_globs:
            for archive in sorted(path.glob(pattern)):
                if _is_archive(archive):
                    found = _find_root(archive, candidates, is_root, archive_globs, cache_dir, True)
                    if found is not None:
                        return found
    return None


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10


def _normalize_images(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 N×C×H×W → float32, scaled to [0, 1] then normalized per channel."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    x.div_(torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    return x


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
    root = _find_root(
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
        x_train=_normalize_images(x_train, CIFAR10_MEAN, CIFAR10_STD),
        y_train=torch.from_numpy(y_train),
        x_test=_normalize_images(x_test.reshape(-1, 3, 32, 32), CIFAR10_MEAN, CIFAR10_STD),
        y_test=torch.from_numpy(y_test),
        num_classes=10,
    )


# ---------------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (idx files)


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


# ---------------------------------------------------------------------------------------------------------
# IMDB (aclImdb raw text)

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
    root = _find_root(path, lambda p: (p, p / "aclImdb"), _is_imdb_root, ("aclImdb*.tar*", "aclImdb*.tgz"), cache_dir)
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


# ---------------------------------------------------------------------------------------------------------
# FedML federated h5 datasets

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
        x = _normalize_images(images.astype(np.uint8, copy=False).transpose(0, 3, 1, 2), CIFAR100_MEAN, CIFAR100_STD)
        splits.append((x, torch.from_numpy(labels), sizes))
    (x_train, y_train, sizes), (x_test, y_test, _) = splits
    return Arrays(x_train, y_train, x_test, y_test, num_classes=100, natural_clients=_ranges(sizes))


def _char_table() -> np.ndarray:
    """Code point (capped at 128) → id; anything outside the 86 characters is OOV."""
    table = np.full(129, SHAKESPEARE_OOV, dtype=np.int64)
    for i, char in enumerate(SHAKESPEARE_CHARS):
        table[ord(char)] = i + 1
    return table


def shakespeare_chunks(snippets: Iterable[str | bytes], seq_len: int = SHAKESPEARE_SEQ_LEN) -> np.ndarray:
    """Each snippet → ``[bos] + char ids + [eos]``, cut into rows of ``seq_len + 1``, the last padded with 0."""
    table = _char_table()
    width = seq_len + 1
    pieces = []
    for snippet in snippets:
        text = snippet.decode("utf-8", errors="replace") if isinstance(snippet, bytes) else str(snippet)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = table[np.minimum(codes, 128)]
        total = len(ids) + 2
        padded = np.full(-(-total // width) * width, SHAKESPEARE_PAD, dtype=np.int64)
        padded[0] = SHAKESPEARE_BOS
        padded[1 : len(ids) + 1] = ids
        padded[len(ids) + 1] = SHAKESPEARE_EOS
        pieces.append(padded)
    if not pieces:
        return np.zeros((0, width), dtype=np.int64)
    return np.concatenate(pieces).reshape(-1, width)


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


# ---------------------------------------------------------------------------------------------------------
# Registry

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
