"""The settings of a FedML user's own driver, read once from FedML's ``args`` (``fedml.init`` flattens
every yaml section onto them): what ``PrismClientTrainer(model, args)`` and ``PrismServerAggregator(model,
args)`` (:mod:`fedml_prism.runtimes.fedml_glue`) build from, each value validated with a one-line
``ValueError`` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any

from ..engine.config import PrismConfig, RunSettings
from .config_file import read_config

PRISM_KEYS = frozenset(f.name for f in fields(PrismConfig))


def device_from_args(args: Any) -> Any:
    """The torch device FedML put on ``args`` (``cpu`` when none)."""
    return getattr(args, "device", None) or "cpu"


def prism_config_from_args(args: Any) -> PrismConfig:
    """The ``PrismConfig`` of FedML's ``args``: every ``PrismConfig`` field found on ``args``.

    FedML's ``Arguments`` flattens the yaml's ``prism_args:`` section onto ``args``, so a misspelt key
    would pass unnoticed there; when ``args.yaml_config_file`` names the yaml, its ``prism_args`` keys
    are checked too (unknown ones raise the same error as ``fedml-prism run``).
    """
    section: dict[str, Any] = {}
    path = getattr(args, "yaml_config_file", None)
    if isinstance(path, str) and os.path.isfile(path):
        section = dict(read_config(path).get("prism_args", {}))
    values = {key: getattr(args, key) for key in PRISM_KEYS if hasattr(args, key)}
    return PrismConfig.from_mapping({**section, **values})


def settings_from_args(args: Any) -> RunSettings:
    """FedML's training keys (``comm_round``, ``epochs``, ``batch_size``, ``learning_rate``, …) from
    ``args``, validated; ``output_dir`` (default ``outputs``) made absolute against the current folder."""
    output_dir = os.path.abspath(str(getattr(args, "output_dir", None) or "outputs"))
    return RunSettings.from_args(args, output_dir=output_dir)


def check_silo_args(args: Any, settings: RunSettings) -> int:
    """The number of silos (= PriSM clients) of a FedML-native cross-silo run; raises ``ValueError``
    on keys FedML would accept but that cannot run PriSM one silo per client."""
    training_type = getattr(args, "training_type", "cross_silo")
    if training_type != "cross_silo":
        raise ValueError(
            f"training_type={training_type!r} is invalid: allowed cross_silo (FedML's simulators never call a "
            "custom trainer or aggregator; fedml-prism run drives the same classes in one process)"
        )
    optimizer = getattr(args, "federated_optimizer", "FedAvg")
    if optimizer != "FedAvg":
        raise ValueError(
            f"federated_optimizer={optimizer!r} is invalid: allowed FedAvg (FedML's cross-silo message protocol; "
            "PriSM's aggregator does the math)"
        )
    silos = settings.client_num_in_total
    if settings.client_num_per_round != silos:
        raise ValueError(
            f"client_num_per_round={settings.client_num_per_round} is invalid: allowed client_num_in_total={silos} "
            "(one silo is one PriSM client and trains every round; fedml-prism run samples more clients than silos)"
        )
    workers = getattr(args, "worker_num", silos)
    if workers != silos:
        raise ValueError(f"worker_num={workers!r} is invalid: allowed client_num_in_total={silos} (one process per silo)")
    check_backend_trust(args)
    return silos


def check_backend_trust(args: Any) -> None:
    """FedML's own transports other than MPI unpickle what peers send: refused unless ``trust_peers: true``.

    MPI passes: its peers are the ranks of your own ``mpiexec`` (one user, one launch). gRPC, TRPC and
    the MQTT family pickle every message or S3 object, so whoever reaches the port or broker runs code in
    this process. ``fedml-prism run`` is not affected: its GRPC and MQTT_S3 transports carry signed
    frames without pickle."""
    backend = getattr(args, "backend", "MPI")
    trust = getattr(args, "trust_peers", False)
    if not isinstance(trust, bool):
        raise ValueError(f"trust_peers={trust!r} is invalid: allowed true or false")
    if backend != "MPI" and not trust:
        raise ValueError(
            f"backend={backend!r} is invalid here: FedML's {backend} transport unpickles what peers send, so anyone who "
            "reaches its port or broker runs code in this process; allowed MPI, or trust_peers: true (security_args) "
            "when every peer and the network are yours, or fedml-prism run (its GRPC and MQTT_S3 frames are signed, "
            "never pickled)"
        )
