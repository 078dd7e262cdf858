"""Datasets in FedML's 8-item format, and the paper's partitions (plain PyTorch / NumPy, no FedML).

FedML's runners take ``[train_num, test_num, train_global, test_global, train_local_num_dict,
train_local_dict, test_local_dict, class_num]`` where the loaders only need to yield ``(x, y)``
batches. ``digits`` is real data that ships inside scikit-learn (1 797 handwritten 8×8 digits), so the
built-in default job needs no download.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

PARTITIONS = ("iid", "dirichlet")


@dataclass
class FederatedData:
    """Arrays split into clients; :meth:`fedml_dataset` gives FedML's 8-item list."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    client_indices: list[np.ndarray]
    num_classes: int

    def client_dataset(self, client_id: int) -> TensorDataset:
        idx = torch.as_tensor(self.client_indices[client_id], dtype=torch.long)
        return TensorDataset(self.x_train[idx], self.y_train[idx])

    def fedml_dataset(self, batch_size: int, eval_batch_size: int = 256) -> list:
        train_local = {
            c: DataLoader(self.client_dataset(c), batch_size=batch_size, shuffle=True)
            for c in range(len(self.client_indices))
        }
        train_num = {c: len(i) for c, i in enumerate(self.client_indices)}
        test_global = DataLoader(TensorDataset(self.x_test, self.y_test), batch_size=eval_batch_size)
        train_global = DataLoader(TensorDataset(self.x_train, self.y_train), batch_size=eval_batch_size)
        test_local = {c: None for c in train_local}
        return [
            len(self.y_train), len(self.y_test), train_global, test_global,
            train_num, train_local, test_local, self.num_classes,
        ]

    def summary(self) -> list[dict[str, int]]:
        """Samples and distinct classes per client."""
        out = []
        for c, idx in enumerate(self.client_indices):
            labels = self.y_train[torch.as_tensor(idx, dtype=torch.long)]
            out.append({"client": c, "samples": len(idx), "classes": int(labels.unique().numel())})
        return out


def partition(
    labels: np.ndarray,
    num_clients: int,
    method: str = "iid",
    alpha: float = 0.5,
    samples_per_client: int | None = None,
    seed: int = 0,
    disjoint: bool = True,
) -> list[np.ndarray]:
    """Split sample indices among clients, as the paper does.

    - ``iid``: a seeded shuffle cut into equal parts (``samples_per_client`` each, default all / N).
    - ``dirichlet``: each client draws class proportions ``q ~ Dir(α·1)`` and then the *same number*
      of samples from them. With ``disjoint`` (the default, as in the PriSM authors' code) every
      sample goes to at most one client: a client's draws from an exhausted class go to the classes
      that still have samples, in proportion to its ``q``. With ``disjoint=False`` each client draws
      from the whole pool of each class, so a sample can land on several clients.
    """
    if method not in PARTITIONS:
        raise ValueError(f"partition_method={method!r} is invalid: allowed {', '.join(PARTITIONS)}")
    if num_clients < 1:
        raise ValueError(f"client_num_in_total={num_clients} is invalid: must be >= 1")
    if not isinstance(disjoint, bool):
        raise ValueError(f"partition_disjoint={disjoint!r} is invalid: allowed true or false")
    n = len(labels)
    per = samples_per_client or n // num_clients
    if per < 1 or ((method == "iid" or disjoint) and per * num_clients > n):
        raise ValueError(
            f"client_num_in_total={num_clients} x samples_per_client={per} do not fit in {n} training samples: "
            "lower client_num_in_total or samples_per_client"
        )
    rng = np.random.default_rng(seed)
    if method == "iid":
        perm = rng.permutation(n)
        return [np.sort(perm[c * per:(c + 1) * per]) for c in range(num_clients)]
    if not alpha > 0:
        raise ValueError(f"partition_alpha={alpha!r} is invalid: must be > 0")
    classes = np.unique(labels)
    pools = {k: rng.permutation(np.flatnonzero(labels == k)) for k in classes}
    if disjoint:
        return _dirichlet_disjoint(rng, [pools[k] for k in classes], num_clients, per, alpha)
    out = []
    for _ in range(num_clients):
        q = rng.dirichlet(np.full(len(classes), alpha))
        counts = rng.multinomial(per, q)
        chosen = []
        for k, cnt in zip(classes, counts, strict=True):
            pool = pools[k]
            if cnt:
                chosen.append(rng.choice(pool, size=cnt, replace=cnt > len(pool)))
        out.append(np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64))
    return out


def _dirichlet_disjoint(
    rng: np.random.Generator, pools: list[np.ndarray], num_clients: int, per: int, alpha: float
) -> list[np.ndarray]:
    """Dirichlet partition without overlap: clients take ``per`` samples each from shuffled class pools.

    A client's draw for a class beyond what is left of it is redrawn over the classes that still have
    samples, by the client's ``q`` renormalised over them (uniformly if ``q`` is 0 on all of them).
    The caller guarantees ``num_clients * per <= sum(len(pool))``, so every client gets ``per``.
    """
    left = np.array([len(p) for p in pools], dtype=np.int64)
    taken = np.zeros(len(pools), dtype=np.int64)
    out = []
    for _ in range(num_clients):
        q = rng.dirichlet(np.full(len(pools), alpha))
        want = rng.multinomial(per, q)
        got = np.minimum(want, left)
        left -= got
        deficit = per - int(got.sum())
        while deficit:  # each pass either places the whole deficit or empties one more class
            open_ = left > 0
            weights = np.where(open_, q, 0.0)
            weights = weights / weights.sum() if weights.sum() > 0 else open_ / open_.sum()
            extra = np.minimum(rng.multinomial(deficit, weights), left)
            got += extra
            left -= extra
            deficit -= int(extra.sum())
        chosen = [pool[t:t + g] for pool, t, g in zip(pools, taken, got, strict=True) if g]
        taken += got
        out.append(np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64))
    return out


def load_digits_data(
    num_clients: int,
    method: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.2,
    disjoint: bool = True,
    samples_per_client: int | None = None,
) -> FederatedData:
    """scikit-learn's handwritten digits (real data, bundled with the package), 1×8×8, 10 classes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = np.random.default_rng(12345).permutation(len(y))  # fixed train/test split
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    clients = partition(y[train].numpy(), num_clients, method, alpha, samples_per_client, seed=seed, disjoint=disjoint)
    return FederatedData(x[train], y[train], x[test], y[test], clients, 10)


DATASETS = {"digits": load_digits_data}
FILE_DATASETS = ("cifar10", "fashion_mnist", "mnist", "imdb", "femnist", "fed_cifar100", "fed_shakespeare")
NATURAL = ("femnist", "fed_cifar100", "fed_shakespeare")


def load_federated(
    name: str,
    num_clients: int,
    method: str,
    alpha: float,
    seed: int,
    data_path: str | None = None,
    samples_per_client: int | None = None,
    loader_kwargs: dict | None = None,
    disjoint: bool = True,
) -> FederatedData:
    """A dataset by name, partitioned among ``num_clients`` (``natural`` for the federated h5 sets).

    ``disjoint`` applies to ``dirichlet`` partitions (see :func:`partition`)."""
    if name in DATASETS:
        if loader_kwargs:
            raise ValueError(f"data_kwargs={loader_kwargs!r} is invalid for dataset={name!r}: it takes none")
        return DATASETS[name](num_clients, method, alpha, seed, disjoint=disjoint, samples_per_client=samples_per_client)
    if name not in FILE_DATASETS:
        raise ValueError(f"dataset={name!r} is invalid: allowed {', '.join((*DATASETS, *FILE_DATASETS))}")
    if not data_path:
        raise ValueError(f"dataset={name!r} needs data_path: the folder or archive of its files (see docs/data.md)")
    from .datasets import LOADERS

    arrays = LOADERS[name](data_path, **(loader_kwargs or {}))
    if name in NATURAL:
        clients = arrays.natural_clients[:num_clients]
        if len(clients) < num_clients:
            raise ValueError(f"client_num_in_total={num_clients} is invalid: {name} has {len(clients)} natural clients")
    else:
        clients = partition(
            arrays.y_train.numpy(), num_clients, method, alpha, samples_per_client, seed, disjoint=disjoint
        )
    return FederatedData(arrays.x_train, arrays.y_train, arrays.x_test, arrays.y_test, clients, arrays.num_classes)
