"""What every method's rounds share, decided in one place: the learning-rate schedule, which rounds
evaluate and checkpoint, a client's seeded (and augmented) batches, the metrics files and the
checkpoint. PriSM's server (:class:`~fedml_prism.engine.server.PrismServer`, driven by FedML's rounds or
the sp loop) and the in-process round driver of the other methods
(:mod:`fedml_prism.strategies.driver`) both use these, so a fix to resume, metrics or the schedule is
made once.

A checkpoint (``checkpoint.pt``, read back with ``torch.load(weights_only=True)``) holds
``schema`` (:data:`CHECKPOINT_SCHEMA`), ``method``, ``identity`` (what must match to resume: options,
seed, schedule), ``round`` (rounds done), ``metrics`` (the rows so far) and the method's own entries.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .files import save_private, write_metrics
from .sampling import make_generator

if TYPE_CHECKING:
    from .config import RunSettings

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_SCHEMA = 2  # 1: before the round driver (per-method layouts, no "schema" entry)
HEADER = ("schema", "method", "identity", "round", "metrics")


# ------------------------------------------------------------------------------ schedule and decisions
def round_lr(settings: RunSettings, round_idx: int, base: float | None = None) -> float:
    """Round ``round_idx``'s learning rate: ``base`` (default ``learning_rate``), constant or, with
    ``lr_schedule: cosine``, from ``base`` to 0 over ``comm_round``."""
    lr = settings.learning_rate if base is None else base
    if settings.lr_schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * round_idx / settings.comm_round))
    return lr


def is_last(settings: RunSettings, round_idx: int) -> bool:
    return round_idx + 1 >= settings.comm_round


def evaluates(settings: RunSettings, round_idx: int) -> bool:
    """Whether round ``round_idx`` (0-based) is evaluated: every ``frequency_of_the_test`` and the last."""
    return (round_idx + 1) % settings.frequency_of_the_test == 0 or is_last(settings, round_idx)


def checkpoints(settings: RunSettings, round_idx: int) -> bool:
    """Whether ``checkpoint.pt`` is written after round ``round_idx``: every ``checkpoint_every`` and the last."""
    return (round_idx + 1) % settings.checkpoint_every == 0 or is_last(settings, round_idx)


# ------------------------------------------------------------------------------ a client's batches
def flip_crop(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random horizontal flip and 4-pixel-padded random crop of an image batch (paper appendix A),
    drawn from ``generator``."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=generator)
    dy = torch.randint(0, 9, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 8)
    x = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    return x.gather(3, cols)


class FlipCrop:
    """A loader's image batches through :func:`flip_crop`, drawn from a seeded generator."""

    def __init__(self, loader: Iterable[tuple[Tensor, Tensor]], generator: torch.Generator) -> None:
        self.loader, self.g = loader, generator

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.loader:
            yield flip_crop(x, self.g), y


class TensorBatches:
    """A ``TensorDataset``'s shuffled batches, drawn from ``generator`` exactly as ``DataLoader(dataset,
    batch_size, shuffle=True, generator=generator)`` draws them (per pass: the iterator's base seed, the
    sampler's permutation, and the permutation the sampler starts when the first runs out), by indexing
    the tensors: the same batches bit for bit, without collating one sample at a time."""

    def __init__(self, dataset: TensorDataset, batch_size: int, generator: torch.Generator) -> None:
        self.tensors, self.batch_size, self.g = dataset.tensors, batch_size, generator

    def __len__(self) -> int:
        return math.ceil(len(self.tensors[0]) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        n = len(self.tensors[0])
        torch.empty((), dtype=torch.int64).random_(generator=self.g)  # DataLoader's worker base seed
        for idx in torch.randperm(n, generator=self.g).split(self.batch_size):
            yield tuple(t[idx] for t in self.tensors)
        torch.randperm(n, generator=self.g)  # RandomSampler's draw past the end of the first permutation


def client_batches(dataset: Dataset, settings: RunSettings, seed: int, round_idx: int, client_id: int) -> Any:
    """Client ``client_id``'s shuffled batches of round ``round_idx`` (the order drawn from ``(seed, "data",
    round, client)``), through :class:`FlipCrop` with ``augment: flip_crop``: the same for every method.
    A ``TensorDataset`` (every built-in dataset) is batched by :class:`TensorBatches`, any other dataset by
    a ``DataLoader``: the same batches."""
    g = make_generator(seed, "data", round_idx, client_id)
    if type(dataset) is TensorDataset:
        loader: Any = TensorBatches(dataset, settings.batch_size, g)
    else:
        loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, generator=g)
    if settings.augment == "flip_crop":
        return FlipCrop(loader, make_generator(seed, "augment", round_idx, client_id))
    return loader


# ------------------------------------------------------------------------------ metrics and checkpoints
class RunLog:
    """A run's per-round metrics rows (one schema for every method), rewritten after every round as
    ``metrics.json`` and ``metrics.csv`` (``nested`` fields: JSON only)."""

    def __init__(self, out_dir: str, strategy: str, rows: list[dict[str, Any]] | None = None,
                 nested: tuple[str, ...] = ()) -> None:
        self.out_dir, self.strategy, self.nested = out_dir, strategy, nested
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.start = time.time() - (self.rows[-1]["elapsed_s"] if self.rows else 0.0)
        os.makedirs(out_dir, exist_ok=True)

    def add(self, round_idx: int, round_start: float, *, test_acc: float = float("nan"),
            test_loss: float = float("nan"), train_loss: float = float("nan"), clients: int = 0,
            bytes_down: int = 0, bytes_up: int = 0, **extra: Any) -> dict[str, Any]:
        now = time.time()
        row = {"round": round_idx + 1, "strategy": self.strategy, "test_acc": test_acc, "test_loss": test_loss,
               "train_loss": train_loss, "clients": clients, "bytes_down": int(bytes_down), "bytes_up": int(bytes_up),
               "round_s": now - round_start, "elapsed_s": now - self.start, **extra}
        self.rows.append(row)
        write_metrics(self.out_dir, self.rows, nested=self.nested)
        return row


def write_checkpoint(out_dir: str, method: str, identity: Mapping[str, Any], rounds_done: int,
                     metrics: list[dict[str, Any]], state: Mapping[str, Any]) -> None:
    """``checkpoint.pt`` in ``out_dir``, atomically and mode 600: the common header and ``state`` (tensors,
    numbers, strings, lists and dicts only)."""
    clash = sorted(set(state) & set(HEADER))
    if clash:
        raise ValueError(f"a method's checkpoint state may not use the header entries {clash}")
    header = {"schema": CHECKPOINT_SCHEMA, "method": method, "identity": dict(identity), "round": int(rounds_done),
              "metrics": list(metrics)}
    save_private(os.path.join(out_dir, CHECKPOINT), {**header, **state})


def read_checkpoint(out_dir: str, method: str, identity: Mapping[str, Any] | None,
                    upgrade: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None) -> dict[str, Any] | None:
    """The checkpoint in ``out_dir`` (None: there is none) if ``method`` wrote it with the same ``identity``
    (None: the caller compares); otherwise ``ValueError`` naming what differs. A file of an older schema is
    read through ``upgrade`` (returns today's layout, or None: refused)."""
    path = os.path.join(out_dir, CHECKPOINT)
    if not os.path.exists(path):
        return None
    state = torch.load(path, weights_only=True)
    if "schema" not in state and upgrade is not None:
        state = upgrade(state) or state
    if state.get("schema") != CHECKPOINT_SCHEMA:
        raise ValueError(f"checkpoint {path} has schema {state.get('schema', 1)}, this version reads schema "
                         f"{CHECKPOINT_SCHEMA}: delete it to start afresh, or finish that run with the version "
                         "that wrote it")
    if state["method"] != method:
        raise ValueError(f"checkpoint {path} was written by method {state['method']!r}, not {method!r}")
    if identity is not None and state["identity"] != dict(identity):
        saved = state["identity"]
        diff = sorted(k for k in {*saved, *identity} if saved.get(k) != identity.get(k))
        raise ValueError(f"checkpoint {path} was written by another {method} run ({', '.join(diff)} differ): {saved}")
    return state
