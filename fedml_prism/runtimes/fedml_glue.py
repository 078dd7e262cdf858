"""FedML glue: ``PrismClientTrainer`` and ``PrismServerAggregator``.

Thin by design: FedML's loosely typed payloads become the engine's types once, here, and every
decision is made by :class:`~fedml_prism.engine.server.PrismServer` / :class:`~fedml_prism.engine.server.PrismClient`.

Two ways to build them:

- From FedML's ``args`` alone, in a FedML user's own driver (``run/fedml_native/main.py``)::

      offline()                                  # before fedml.init: no FedML cloud calls
      args = fedml.init()
      device = fedml.device.get_device(args)
      dataset, out_dim = load_data(args)         # FedML's 8-item list
      model = make_model(out_dim)
      FedMLRunner(args, device, dataset, model,
                  PrismClientTrainer(model, args), PrismServerAggregator(model, args)).run()

  ``prism_args`` (FedML loads every yaml section flat onto ``args``) and FedML's training keys are
  read from ``args`` and validated (one-line ``ValueError`` naming the key, the value and what is
  allowed). One data silo is one PriSM client: silo ``i`` trains the sub-model of client ``i`` on
  ``train_data_local_dict[i]``, which FedML hands to ``train``; the server evaluates on the
  ``test_data_global`` FedML's aggregator holds. Every silo trains every round
  (``client_num_in_total == client_num_per_round == worker_num``). The backend is FedML's own: MPI, or
  another (gRPC, MQTT_S3, TRPC: they unpickle peers' messages) only with ``trust_peers: true``.
- ``fedml-prism run`` passes the ``PrismClient`` / ``PrismServer`` it builds (``client=``,
  ``server=`` + ``workers=``), so K worker processes can serve any number of PriSM clients.

How PriSM rides on FedML 0.9.6 cross-silo (see docs/runtimes.md):

- FedML sends ``params[data_silo_index]`` to each client process when ``aggregate()`` (and the initial
  ``get_model_params()``) return an object whose type is exactly ``dict`` with int keys. The
  aggregator returns ``{worker index: bundle}``, a bundle being the flat ``dict[str, Tensor]`` of the
  sub-model payloads of the PriSM clients that worker trains this round (keys ``c<id>/<entry>``).
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
from torch import Tensor, nn

from ..engine.server import PrismClient, PrismServer, assign_to_workers, unpack_bundle
from ..settings.fedml_args import (  # noqa: F401 - re-exported
    check_backend_trust,
    check_silo_args,
    device_from_args,
    prism_config_from_args,
    settings_from_args,
)
from ._fedml_import import silence_fedml_import_warnings

silence_fedml_import_warnings()
from fedml.core import ClientTrainer, Context, ServerAggregator  # noqa: E402  (after the warnings filter)

log = logging.getLogger("fedml_prism")
FINISHED = "prism::finished"


def offline() -> None:
    """Let a FedML driver's ``fedml.init()`` run without FedML's cloud, for this process. Call it before
    ``fedml.init()``.

    - ``fedml.init`` always fetches its MLOps config from open.fedml.ai (five tries, even with
      ``using_mlops: false``, ``core/mlops/__init__.py:106``): replaced by its offline part.
    - ``fedml.init(check_env=True)`` (the default) tests connections to FedML's backend, S3 and MQTT
      (``computing/scheduler/env/collect_env.py``): skipped, as with ``check_env=False``.

    FedML still creates its log folder: set ``log_file_dir`` in the yaml (``tracking_args``) to keep it
    out of the current folder (default ``./logs``).
    """
    import fedml

    from .fedml_env import _offline_mlops

    _offline_mlops()
    fedml.collect_env = _skip_env_check


def _skip_env_check() -> None:
    log.debug("fedml_prism.runtimes.fedml_glue.offline(): FedML's network environment check skipped")


# ---------------------------------------------------------------------------------- FedML classes
class PrismClientTrainer(ClientTrainer):
    """Trains the bundle of sub-models FedML delivers to this process.

    ``PrismClientTrainer(model, args)`` builds its :class:`PrismClient` from ``args`` (one silo = one
    PriSM client, trained on the silo data FedML passes to :meth:`train`); ``fedml-prism run`` passes
    the ``client`` it built over its own data.
    """

    def __init__(self, model: nn.Module, args: Any, client: PrismClient | None = None) -> None:
        self._silo_data: dict[int, Any] | None = None
        if client is None:
            settings = settings_from_args(args)
            config = prism_config_from_args(args)
            check_silo_args(args, settings)
            self._silo_data = {}
            client = PrismClient(model, config, settings, self._silo_data, device_from_args(args))
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
        if self._silo_data is not None:
            self._adopt_silo_data(train_data, device)
        self._trained = self.client.train_bundle(self._received)
        self.last_message_at = time.time()

    def _adopt_silo_data(self, train_data: Any, device: Any) -> None:
        """Args-only mode: the silo's data (``train_data_local_dict[silo]``) is the data of the PriSM
        client the server sent (its id is the silo index FedML keyed the bundle with)."""
        if train_data is None:
            raise ValueError("train_data=None is invalid: allowed the silo's batches (train_data_local_dict[silo])")
        for cid in unpack_bundle(self._received):
            self._silo_data[cid] = train_data
        if device is not None:
            self.client.device = device


class PrismServerAggregator(ServerAggregator):
    """Keeps the global model; hands each worker its own bundle; aggregates with Eq. 3.

    ``PrismServerAggregator(model, args)`` builds its :class:`PrismServer` from ``args`` (metrics,
    checkpoints in ``output_dir``) and evaluates on the test set FedML's aggregator holds;
    ``fedml-prism run`` passes the ``server`` it built and its number of ``workers``.
    """

    def __init__(self, model: nn.Module, args: Any, server: PrismServer | None = None, workers: int | None = None) -> None:
        self._from_args = server is None
        if server is None:
            settings = settings_from_args(args)
            config = prism_config_from_args(args)
            workers = check_silo_args(args, settings)
            server = PrismServer(model, config, settings, None, device_from_args(args))
        elif workers is None:
            raise TypeError("PrismServerAggregator(model, args, server) needs workers= (the number of worker processes)")
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
        if self._from_args:
            self._adopt_fedml_test_data()
        bundles = [params for _, params in raw_client_model_or_grad_list]
        self.server.close_round(self.server.updates_from_bundles(bundles))
        self._outgoing = self._next_bundles()
        return self._outgoing

    def _adopt_fedml_test_data(self) -> None:
        """Args-only mode: evaluate on FedML's ``test_data_global``, which FedML's cross-silo aggregator
        publishes in its ``Context`` when it is built (``cross_silo/server/fedml_aggregator.py:35``), and
        on the device it set on ``args``."""
        if self.server.test_data is None:
            self.server.test_data = Context().get(Context.KEY_TEST_DATA)
        self.server.device = device_from_args(self.args)

    def bundle_problem(self, worker: int, bundle: Mapping[str, Any]) -> str | None:
        """Why worker ``worker``'s (index into FedML's worker list) upload cannot be this round's (None: it
        can): each PriSM client is bound to the worker the server sent it to, so a worker cannot submit
        another worker's client first and get the honest update rejected."""
        if self.server.finished:
            return None
        try:
            clients = set(unpack_bundle(bundle))
        except (ValueError, AttributeError, TypeError) as err:
            return f"malformed bundle: {err}"
        groups = assign_to_workers(self.server.selected, self.workers)
        allowed = set(groups[worker]) if 0 <= worker < len(groups) else set()
        if foreign := sorted(clients - allowed):
            return f"it holds client(s) {foreign}, which were not sent to this worker"
        return None

    def test(self, test_data: Any, device: Any, args: Any) -> dict[str, float]:
        row = self.server.metrics[-1] if self.server.metrics else {}
        return {"test_acc": row.get("test_acc", float("nan")), "test_loss": row.get("test_loss", float("nan"))}

    def test_all(self, train_data_local_dict: Any, test_data_local_dict: Any, device: Any, args: Any) -> bool:
        return True
