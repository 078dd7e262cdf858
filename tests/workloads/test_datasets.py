"""Offline dataset loaders, checked on tiny files written in each dataset's exact on-disk format."""

from __future__ import annotations

import gzip
import pickle
import struct
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fedml_prism.workloads.datasets import (
    LOADERS,
    SHAKESPEARE_BOS,
    SHAKESPEARE_CHARS,
    SHAKESPEARE_EOS,
    SHAKESPEARE_OOV,
    SHAKESPEARE_VOCAB_SIZE,
    Arrays,
    archives,
    build_vocab,
    load_cifar10,
    load_fedml_h5,
    load_idx_images,
    load_imdb,
    tokenize,
)

CIFAR_TRAIN_PER_BATCH = 2
CIFAR_TEST = 3


# ---------------------------------------------------------------------------------------------------------
# File builders


def _write_cifar(folder: Path) -> None:
    """5 train batches of 2 images and a test batch of 3; labels 0..9 in order, pixel values all 0."""
    folder.mkdir(parents=True, exist_ok=True)
    label = 0
    for name, n in [(f"data_batch_{i}", CIFAR_TRAIN_PER_BATCH) for i in range(1, 6)] + [("test_batch", CIFAR_TEST)]:
        data = np.zeros((n, 3072), dtype=np.uint8)
        labels = [(label + k) % 10 for k in range(n)]
        label += n
        if name == "data_batch_1":
            data[0, 1024 + 32 * 5 + 7] = 255  # green channel, row 5, column 7 of the first image
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f)


def _tar(source: Path, archive: Path, mode: str) -> Path:
    with tarfile.open(archive, mode) as tar:
        tar.add(source, arcname=source.name)
    return archive


def _idx(path: Path, magic: int, array: np.ndarray, zipped: bool = True) -> None:
    payload = struct.pack(f">i{array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()
    if zipped:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _write_idx_set(folder: Path, zipped: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 4), ("t10k", 2)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[0, 3, 4] = 255
        _idx(folder / f"{split}-images-idx3-ubyte", 2051, images, zipped)
        _idx(folder / f"{split}-labels-idx1-ubyte", 2049, np.arange(n) % 10, zipped)


IMDB_REVIEWS = {
    ("train", "pos"): {"1_9.txt": "Great great film.<br />Loved it", "0_7.txt": "good good fun"},
    ("train", "neg"): {"0_2.txt": "Bad film, bad acting", "10_1.txt": "awful"},
    ("test", "pos"): {"3_10.txt": "great fun zebra"},
    ("test", "neg"): {"5_3.txt": "bad"},
}


def _write_imdb(parent: Path) -> Path:
    root = parent / "aclImdb"
    for (split, label), files in IMDB_REVIEWS.items():
        (root / split / label).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (root / split / label / name).write_text(text, encoding="utf-8")
    (root / "imdb.vocab").write_text("great\nbad\n", encoding="utf-8")
    return root


CLIENT_SIZES = {"f0002": 3, "f0000": 1, "f0001": 2}  # written out of order on purpose


def _write_femnist(folder: Path) -> None:
    for split in ("train", "test"):
        with h5py.File(folder / f"fed_emnist_{split}.h5", "w") as h5:
            for i, (client, n) in enumerate(CLIENT_SIZES.items()):
                pixels = np.ones((n, 28, 28), dtype=np.float32)
                pixels[:, 10, 12] = 0.0
                h5.create_dataset(f"examples/{client}/pixels", data=pixels)
                h5.create_dataset(f"examples/{client}/label", data=np.full(n, 60 - i, dtype=np.int32))


def _write_fed_cifar100(folder: Path, label_keys: tuple[str, ...] = ("label",)) -> None:
    for split in ("train", "test"):
        with h5py.File(folder / f"fed_cifar100_{split}.h5", "w") as h5:
            for i, (client, n) in enumerate(CLIENT_SIZES.items()):
                images = np.zeros((n, 32, 32, 3), dtype=np.uint8)
                images[:, 1, 2, 0] = 255
                h5.create_dataset(f"examples/{client}/image", data=images)
                for k, key in enumerate(label_keys):
                    h5.create_dataset(f"examples/{client}/{key}", data=np.full(n, 90 + i + 5 * k, dtype=np.int64))


SNIPPETS = {"c2": ["To be~"], "c0": ["ab"], "c1": ["x" * 100, "Hi"]}


def _write_shakespeare(folder: Path) -> None:
    for split in ("train", "test"):
        with h5py.File(folder / f"shakespeare_{split}.h5", "w") as h5:
            for client, snippets in SNIPPETS.items():
                h5.create_dataset(
                    f"examples/{client}/snippets", data=np.array(snippets, dtype=object), dtype=h5py.string_dtype()
                )


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar10_folder_shapes_dtypes_and_labels(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    a = load_cifar10(tmp_path)
    assert isinstance(a, Arrays) and a.num_classes == 10 and a.natural_clients is None
    assert a.x_train.shape == (5 * CIFAR_TRAIN_PER_BATCH, 3, 32, 32) and a.x_train.dtype == torch.float32
    assert a.x_test.shape == (CIFAR_TEST, 3, 32, 32) and a.x_test.dtype == torch.float32
    assert a.y_train.dtype == torch.int64 and a.y_train.tolist() == list(range(10))
    assert a.y_test.tolist() == [0, 1, 2]


def test_cifar10_normalization(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    a = load_cifar10(tmp_path)
    assert a.x_train[0, 1, 5, 7].item() == pytest.approx((1.0 - 0.4822) / 0.2435, abs=1e-5)
    assert a.x_train[0, 0, 0, 0].item() == pytest.approx(-0.4914 / 0.2470, abs=1e-5)
    assert a.x_train[0, 2, 5, 7].item() == pytest.approx(-0.4465 / 0.2616, abs=1e-5)


def test_cifar10_accepts_parent_of_batches_folder(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "cifar-10-batches-py")
    assert load_cifar10(tmp_path).x_train.shape[0] == 10


def test_cifar10_tar_xz_extracts_once_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_cifar(tmp_path / "src" / "cifar-10-batches-py")
    archive = _tar(tmp_path / "src" / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py.tar.xz", "w:xz")
    cache = tmp_path / "cache"
    first = load_cifar10(archive, cache_dir=cache)
    extracted = list(cache.iterdir())
    assert len(extracted) == 1 and (extracted[0] / "cifar-10-batches-py" / "test_batch").is_file()

    def no_reextraction(*args: object, **kwargs: object) -> None:
        raise AssertionError("archive opened again")

    monkeypatch.setattr(archives.tarfile, "open", no_reextraction)
    second = load_cifar10(archive, cache_dir=cache)
    assert list(cache.iterdir()) == extracted
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.y_test, second.y_test)


def test_cifar10_archive_matches_folder(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "src" / "cifar-10-batches-py")
    archive = _tar(tmp_path / "src" / "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz", "w:gz")
    from_archive = load_cifar10(archive, cache_dir=tmp_path / "cache")
    from_folder = load_cifar10(tmp_path / "src")
    assert torch.equal(from_archive.x_train, from_folder.x_train)


def test_cifar10_missing_path_names_path_and_layout(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found at") as err:
        load_cifar10(missing)
    assert str(missing) in str(err.value) and "data_batch_1..5 and test_batch" in str(err.value)


def test_cifar10_malformed_batch(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="data_batch_3 is malformed"):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST


def test_idx_gz_shapes_labels_and_normalization(tmp_path: Path) -> None:
    _write_idx_set(tmp_path)
    a = load_idx_images(tmp_path)
    assert a.x_train.shape == (4, 1, 28, 28) and a.x_test.shape == (2, 1, 28, 28) and a.num_classes == 10
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert a.y_train.tolist() == [0, 1, 2, 3] and a.y_test.tolist() == [0, 1]
    assert a.x_train[0, 0, 3, 4].item() == pytest.approx((1.0 - 0.2860) / 0.3530, abs=1e-5)
    assert a.x_train[1, 0, 3, 4].item() == pytest.approx(-0.2860 / 0.3530, abs=1e-5)


def test_idx_uncompressed_files(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, zipped=False)
    assert load_idx_images(tmp_path).x_train.shape == (4, 1, 28, 28)


def test_idx_bad_magic(tmp_path: Path) -> None:
    _write_idx_set(tmp_path)
    _idx(tmp_path / "t10k-labels-idx1-ubyte", 2051, np.arange(2))
    with pytest.raises(ValueError, match="magic number 2051, expected 2049"):
        load_idx_images(tmp_path)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    _write_idx_set(tmp_path)
    _idx(tmp_path / "train-labels-idx1-ubyte", 2049, np.arange(3))
    with pytest.raises(ValueError, match="4 images but .* 3 labels"):
        load_idx_images(tmp_path)


def test_idx_missing_names_path_and_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_idx_images(tmp_path)
    assert str(tmp_path) in str(err.value) and "train-images-idx3-ubyte[.gz]" in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# IMDB


def test_tokenize() -> None:
    assert tokenize("It's GREAT!<br />Really, 10/10.") == ["it's", "great", "really", "10", "10"]


def test_build_vocab_order_ties_and_size() -> None:
    vocab = build_vocab(["b a c", "a b d", "a"], 3)
    assert vocab == {"a": 1, "b": 2, "c": 3}


def test_imdb_shapes_labels_vocab_and_padding(tmp_path: Path) -> None:
    _write_imdb(tmp_path)
    a = load_imdb(tmp_path, vocab_size=3, max_len=4)
    assert a.num_classes == 2 and a.x_train.dtype == torch.int64 and a.y_train.dtype == torch.int64
    assert a.x_train.shape == (4, 4) and a.x_test.shape == (2, 4)
    # neg (by id: 0_2, 10_1) then pos (by id: 0_7, 1_9)
    assert a.y_train.tolist() == [0, 0, 1, 1] and a.y_test.tolist() == [0, 1]
    # train counts: bad, film, good, great 2 each, the rest 1; ties alphabetical → bad=1, film=2, good=3
    assert a.x_train.tolist() == [
        [1, 2, 1, 0],  # bad film bad acting → acting is OOV
        [0, 0, 0, 0],  # awful (OOV) then right padding
        [3, 3, 0, 0],  # good good fun
        [0, 0, 2, 0],  # great great film loved (truncated to 4 tokens)
    ]
    assert a.x_test.tolist() == [[1, 0, 0, 0], [0, 0, 0, 0]]


def test_imdb_accepts_aclimdb_folder_itself(tmp_path: Path) -> None:
    root = _write_imdb(tmp_path)
    assert torch.equal(load_imdb(root, vocab_size=3, max_len=4).x_train, load_imdb(tmp_path, vocab_size=3, max_len=4).x_train)


def test_imdb_tar_gz_extracts_once_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _write_imdb(tmp_path / "src")
    archive = _tar(root, tmp_path / "aclImdb_v1.tar.gz", "w:gz")
    cache = tmp_path / "cache"
    first = load_imdb(archive, vocab_size=3, max_len=4, cache_dir=cache)
    monkeypatch.setattr(archives.tarfile, "open", lambda *a, **k: pytest.fail("archive opened again"))
    second = load_imdb(archive, vocab_size=3, max_len=4, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1 and torch.equal(first.x_train, second.x_train)


def test_imdb_missing_names_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_imdb(tmp_path / "imdb")
    assert str(tmp_path / "imdb") in str(err.value) and "aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt" in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# FedML h5


def test_femnist_shapes_inversion_and_clients(tmp_path: Path) -> None:
    _write_femnist(tmp_path)
    a = load_fedml_h5("femnist", tmp_path)
    assert a.num_classes == 62 and a.x_train.shape == (6, 1, 28, 28) and a.x_test.shape == (6, 1, 28, 28)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert a.x_train[:, 0, 10, 12].tolist() == [1.0] * 6 and a.x_train[:, 0, 0, 0].tolist() == [0.0] * 6
    # sorted ids f0000 (1, label 59), f0001 (2, label 58), f0002 (3, label 60)
    assert a.y_train.tolist() == [59, 58, 58, 60, 60, 60]
    assert [c.tolist() for c in a.natural_clients or []] == [[0], [1, 2], [3, 4, 5]]


def test_fed_cifar100_shapes_normalization_and_clients(tmp_path: Path) -> None:
    _write_fed_cifar100(tmp_path)
    a = load_fedml_h5("fed_cifar100", tmp_path)
    assert a.num_classes == 100 and a.x_train.shape == (6, 3, 32, 32) and a.x_test.shape == (6, 3, 32, 32)
    assert a.x_train[0, 0, 1, 2].item() == pytest.approx((1.0 - 0.5071) / 0.2673, abs=1e-5)
    assert a.x_train[0, 1, 1, 2].item() == pytest.approx(-0.4865 / 0.2564, abs=1e-5)
    assert a.y_train.tolist() == [91, 92, 92, 90, 90, 90]
    assert [len(c) for c in a.natural_clients or []] == [1, 2, 3]


def test_fed_cifar100_label_key_fallback_and_preference(tmp_path: Path) -> None:
    (tmp_path / "fine").mkdir()
    (tmp_path / "both").mkdir()
    _write_fed_cifar100(tmp_path / "fine", ("fine_label",))
    _write_fed_cifar100(tmp_path / "both", ("label", "fine_label"))
    assert load_fedml_h5("fed_cifar100", tmp_path / "fine").y_train.tolist() == [91, 92, 92, 90, 90, 90]
    assert load_fedml_h5("fed_cifar100", tmp_path / "both").y_train.tolist() == [91, 92, 92, 90, 90, 90]


def test_fed_shakespeare_chunks_ids_and_shift(tmp_path: Path) -> None:
    _write_shakespeare(tmp_path)
    a = load_fedml_h5("fed_shakespeare", tmp_path)
    assert a.num_classes == SHAKESPEARE_VOCAB_SIZE == 90 and len(SHAKESPEARE_CHARS) == 86
    # c0: "ab" → 1 chunk; c1: 102 tokens → 2 chunks, "Hi" → 1 chunk; c2: 1 chunk
    assert a.x_train.shape == (5, 80) and a.y_train.shape == (5, 80) and a.x_train.dtype == torch.int64
    assert [c.tolist() for c in a.natural_clients or []] == [[0], [1, 2, 3], [4]]
    assert torch.equal(a.y_train[:, :-1], a.x_train[:, 1:]) and a.x_test.shape == (5, 80)
    ids = {ch: SHAKESPEARE_CHARS.index(ch) + 1 for ch in "abT"}
    assert a.x_train[0, :4].tolist() == [SHAKESPEARE_BOS, ids["a"], ids["b"], SHAKESPEARE_EOS]
    assert a.x_train[0, 4:].tolist() == [0] * 76
    assert a.x_train[4, 1].item() == ids["T"] and a.y_train[4, 5].item() == SHAKESPEARE_OOV  # "~" is not in the vocabulary
    assert a.x_train[2, 20].item() == SHAKESPEARE_EOS and a.x_train[2, 21:].tolist() == [0] * 59


def test_fedml_h5_missing_names_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_fedml_h5("femnist", tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "fed_emnist_train.h5" in message and "examples/<client_id>/" in message


def test_fedml_h5_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown FedML h5 dataset 'emnist'"):
        load_fedml_h5("emnist", tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Registry


def test_loaders_registry_dispatches(tmp_path: Path) -> None:
    assert set(LOADERS) == {"cifar10", "fashion_mnist", "mnist", "imdb", "femnist", "fed_cifar100", "fed_shakespeare"}
    _write_femnist(tmp_path)
    _write_idx_set(tmp_path)
    assert LOADERS["femnist"](tmp_path).x_train.shape == (6, 1, 28, 28)
    assert LOADERS["fashion_mnist"](tmp_path).x_train.shape == (4, 1, 28, 28)
    assert LOADERS["mnist"](tmp_path).x_train[0, 0, 3, 4].item() == pytest.approx((1.0 - 0.1307) / 0.3081, abs=1e-5)
