"""The round driver of the in-process methods (``layerwise``, ``fedgkt``, ``superfed``).

A method says what happens in a round (:class:`Method`: the selected clients' work and the aggregation,
the model to evaluate, its state for checkpoints); :func:`drive` owns everything else, with the decisions
PriSM's server makes too (:mod:`fedml_prism.engine.rounds`): the clients of each round (the same as
PriSM's runs for a seed), the learning-rate schedule, when to evaluate and checkpoint, the metrics
files, the checkpoint (one schema) and resume, and the progress line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from ..engine.rounds import RunLog, checkpoints, evaluates, read_checkpoint, round_lr, write_checkpoint
from ..engine.server import RunSettings, select_clients
from .base import MethodRun

log = logging.getLogger("fedml_prism")


class Method(Protocol):
    """One in-process method, its algorithm only."""

    #: the strategy name (metrics rows, checkpoints)
    name: str
    #: the fields :meth:`evaluate` returns (NaN on rounds that are not evaluated)
    eval_fields: tuple[str, ...]

    @property
    def identity(self) -> Mapping[str, Any]:
        """What a resumed run must share with the checkpoint's (options, seed, schedule…)."""

    def play_round(self, round_idx: int, clients: list[int], lr: float) -> dict[str, Any]:
        """The clients' work and the aggregation of round ``round_idx``; the round's metrics fields
        (``train_loss``, ``clients``, ``bytes_down``, ``bytes_up`` and the method's own)."""

    def evaluate(self) -> dict[str, float]:
        """The :attr:`eval_fields` of the model as it stands."""

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (tensors, numbers, strings, lists and dicts)."""

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`state`."""

    def describe(self, row: Mapping[str, Any]) -> str:
        """The method's part of the round's progress line."""

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Final figures and client costs (:func:`~fedml_prism.strategies.base.summary_of`)."""


def resume_point(method: Method, settings: RunSettings, resume: bool) -> tuple[int, list[dict[str, Any]]]:
    """Rounds done and metrics rows so far: from the checkpoint (loaded into ``method``) when ``resume``."""
    out = settings.output_dir
    state = read_checkpoint(out, method.name, method.identity) if resume else None
    if state is None:
        if resume:
            log.info("%s: no checkpoint in %s: starting from round 1", method.name, out)
        return 0, []
    method.load_state(state)
    log.info("%s: resumed from %s after round %d", method.name, out, state["round"])
    return int(state["round"]), list(state["metrics"])


def drive(method: Method, settings: RunSettings, seed: int, *, resume: bool = False,
          progress: bool = False) -> MethodRun:
    """Play ``method`` for ``settings.comm_round`` rounds (from its checkpoint when ``resume``)."""
    start, rows = resume_point(method, settings, resume)
    metrics = RunLog(settings.output_dir, method.name, rows)
    for r in range(start, settings.comm_round):
        began = time.time()
        clients = select_clients(seed, r, settings.client_num_in_total, settings.client_num_per_round)
        fields = method.play_round(r, clients, round_lr(settings, r))
        scores = method.evaluate() if evaluates(settings, r) else dict.fromkeys(method.eval_fields, float("nan"))
        row = metrics.add(r, began, **scores, **fields)
        if checkpoints(settings, r):
            write_checkpoint(settings.output_dir, method.name, method.identity, r + 1, metrics.rows, method.state())
        (log.info if progress else log.debug)("%s round %d/%d | %s", method.name, r + 1, settings.comm_round,
                                              method.describe(row))
    return MethodRun(metrics.rows, method.summary(metrics.rows))
