"""A round's clients trained together in a simulation (``train_args.parallel_clients``).

- ``sequential``: one client after the other in this process (FedML's sp simulator, Flower, FedScale
  train a round this way).
- ``processes``: the round's client bundles spread over worker processes (spawned once per run, each
  with its own torch threads and its own copy of the clients' data); each trains a bundle with the same
  :meth:`~fedml_prism.engine.server.PrismClient.train_bundle` a cross-silo worker runs, so the uploads
  are those of the sequential path (bit for bit where torch's kernels give the same bits at the
  workers' thread count).
- ``vectorized``: the round's clients whose sub-models have equal shapes trained as one batched
  computation (:mod:`fedml_prism.engine.vectorized`); what cannot be batched trains sequentially with
  one log line saying why.
- ``auto``: ``vectorized`` on a CUDA device; on CPU ``processes`` when there are at least two cores and
  two clients a round, else ``sequential``.

Payloads travel to and from the workers as ``torch.save`` bytes (``weights_only`` on the way back), so
no shared-memory segment or file descriptor is left behind by a worker that dies; a worker that dies
fails the round with an error naming it, and the run's checkpoints keep what was done.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch
from torch import Tensor

from ..engine.config import PrismConfig, RunSettings
from ..engine.server import PrismClient
from ..job import PARALLEL_MODES as MODES
from ..workloads.models import create_model

log = logging.getLogger("fedml_prism")

Bundle = OrderedDict[str, Tensor]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_mode(mode: str, device: str, per_round: int, cores: int | None = None) -> str:
    """The mode a run uses: ``mode`` itself, or what ``auto`` picks on ``device``."""
    if mode not in MODES:
        raise ValueError(f"parallel_clients={mode!r} is invalid: allowed {', '.join(MODES)}")
    if mode != "auto":
        return mode
    if str(device).startswith("cuda"):
        return "vectorized"
    cores = available_cores() if cores is None else cores
    return "processes" if cores >= 2 and per_round >= 2 else "sequential"


def to_bytes(bundle: Mapping[str, Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(OrderedDict(bundle), buf)
    return buf.getvalue()


def from_bytes(blob: bytes) -> Bundle:
    return torch.load(io.BytesIO(blob), weights_only=True)


def build_client(model: str, init: str, kwargs: dict[str, Any], config: PrismConfig, settings: RunSettings,
                 data: Mapping[int, Any], device: str) -> PrismClient:
    """A worker's :class:`PrismClient` over the clients' datasets (the model only gives the architecture)."""
    return PrismClient(create_model(model, init=init, **kwargs), config, settings, dict(data), device)


# --------------------------------------------------------------------------- the worker processes' side
_CLIENT: PrismClient | None = None


def _start_worker(build: Callable[[], PrismClient], threads: int) -> None:
    global _CLIENT
    torch.set_num_threads(threads)
    _CLIENT = build()


def _ready(linger_s: float) -> int:
    """A warm-up task: each waits a little so that the pool starts a worker per task."""
    time.sleep(linger_s)
    return os.getpid()


def _train_in_worker(blob: bytes) -> bytes:
    assert _CLIENT is not None, "worker not started"
    return to_bytes(_CLIENT.train_bundle(from_bytes(blob)))


class ProcessClients:
    """A pool of ``processes`` spawned workers, each building its :class:`PrismClient` with ``build``
    (a picklable callable: a module-level function or a ``functools.partial`` of one) and training
    bundles with ``threads`` torch threads."""

    def __init__(self, build: Callable[[], PrismClient], processes: int, threads: int) -> None:
        if processes < 1 or threads < 1:
            raise ValueError(f"processes={processes}, threads={threads}: allowed integers >= 1")
        self.processes, self.threads = processes, threads
        ctx = torch.multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(processes, mp_context=ctx, initializer=_start_worker,
                                         initargs=(build, threads))
        # start every worker now (spawn, imports, the client's data), not inside the first round
        ready = [self._pool.submit(_ready, 0.2) for _ in range(processes)]
        started = {f.result() for f in ready}
        log.debug("parallel_clients: %d worker processes started (%d answered)", processes, len(started))

    def train(self, bundles: Mapping[int, Mapping[str, Tensor]]) -> dict[int, Bundle]:
        """Every worker index's bundle trained; the uploads by the same indices."""
        futures = {w: self._pool.submit(_train_in_worker, to_bytes(b)) for w, b in bundles.items()}
        out = {}
        for w, future in futures.items():
            try:
                out[w] = from_bytes(future.result())
            except BrokenProcessPool as err:
                raise RuntimeError(f"a training process died while training bundle {w} ({err}); the run's last "
                                   "checkpoint holds what was done: rerun with --resume") from None
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ProcessClients:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
