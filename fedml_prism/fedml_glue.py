"""FedML glue: ``PrismClientTrainer`` and ``PrismServerAggregator``.

Thin by design: FedML's loosely typed payloads become the engine's types once, here, and every
decision is made by :class:`~fedml_prism.server.PrismServer` / :class:`~fedml_prism.server.PrismClient`.

How PriSM rides on FedML 0.9.6 cross-silo (see docs in the README):

- FedML sends ``params[data_silo_index]`` to each client process when ``aggregate()`` (and the initial
  ``get_model_params()``) return an object whose type is exactly ``dict`` with int keys. The
  aggregator returns ``{worker index: bundle}``, a bundle being the flat ``dict[str, Tensor]`` of the
  sub-model payloads of the PriSM clients that worker trains this round (keys ``c<id>/<entry>``), so
  K worker processes serve any number of PriSM clients.
- The global model never leaves the aggregator; ``set_model_params`` ignores FedML's echo of the
  per-worker dict. Uploads are checked against what the server recorded when it sent each sub-model.
- FedML's ``on_before_aggregation`` / ``on_after_aggregation`` (DP, defenses) are inherited and run.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from fedml.core import ClientTrainer, ServerAggregator
from torch import Tensor, nn

from .server import PrismClient, PrismServer

log = logging.getLogger("fedml_prism")
FINISHED = "prism::finished"


class PrismClientTrainer(ClientTrainer):
    """Trains the bundle of sub-models FedML delivers to this process."""

    def __init__(self, model: nn.Module, args: Any, client: PrismClient) -> None:
        super().__init__(model, args)
        self.client = client
        self._received: Mapping[str, Tensor] = {}
        self._trained: OrderedDict[str, Tensor] = OrderedDict()
        self.last_message_at = time.time()

    def set_model_params(self, model_parameters: Any) -> None:
        if not isinstance(model_parameters, Mapping):
            raise TypeError(f"PriSM expects a bundle of tensors from the server, got {type(model_parameters).__name__}")
        self._received = model_parameters
        self.last_message_at = time.time()

    def get_model_params(self) -> OrderedDict[str, Tensor]:
        # an OrderedDict (not exactly `dict`): FedML moves its tensors to the server's device
        return self._trained

    def train(self, train_data: Any, device: Any, args: Any) -> None:
        if FINISHED in self._received:
            self._trained = OrderedDict()
            return
        self._trained = self.client.train_bundle(self._received)
        self.last_message_at = time.time()


class PrismServerAggregator(ServerAggregator):
    """Keeps the global model; hands each worker its own bundle; aggregates with Eq. 3."""

    def __init__(self, model: nn.Module, args: Any, server: PrismServer, workers: int) -> None:
        super().__init__(model, args)
        self.server = server
        self.workers = workers
        self._outgoing: dict[int, OrderedDict[str, Tensor]] | None = None

    def _next_bundles(self) -> dict[int, OrderedDict[str, Tensor]]:
        if self.server.finished:
            return {w: OrderedDict({FINISHED: torch.ones(1)}) for w in range(self.workers)}
        return self.server.bundles(self.workers)

    def get_model_params(self) -> dict[int, OrderedDict[str, Tensor]]:
        if self._outgoing is None:
            self._outgoing = self._next_bundles()
        return self._outgoing  # exactly `dict` with int keys: FedML's per-client contract

    def set_model_params(self, model_parameters: Any) -> None:
        if type(model_parameters) is dict:
            return  # FedML echoes the per-worker bundles; the global model lives in self.server
        self.server.pm.load_dense_state_dict(model_parameters)

    def aggregate(self, raw_client_model_or_grad_list: list[tuple[float, Any]]) -> dict[int, OrderedDict[str, Tensor]]:
        bundles = [params for _, params in raw_client_model_or_grad_list]
        self.server.close_round(self.server.updates_from_bundles(bundles))
        self._outgoing = self._next_bundles()
        return self._outgoing

    def test(self, test_data: Any, device: Any, args: Any) -> dict[str, float]:
        row = self.server.metrics[-1] if self.server.metrics else {}
        return {"test_acc": row.get("test_acc", float("nan")), "test_loss": row.get("test_loss", float("nan"))}

    def test_all(self, train_data_local_dict: Any, test_data_local_dict: Any, device: Any, args: Any) -> bool:
        return True
