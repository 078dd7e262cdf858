"""PriSM's own communication managers for FedML's gRPC and MQTT_S3 backends (FedML's files untouched).

``PrismServerManager`` and ``PrismClientManager`` build them in ``_init_manager`` instead of FedML's
``GRPCCommManager`` / ``MqttS3MultiClientsCommManager``, which unpickle what peers send. Both carry
:mod:`fedml_prism.runtimes.wire` frames (JSON header + safetensors, HMAC when a key is set) and check every frame
before FedML's message handlers see it; a rejected frame is logged with its reason and dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..security import SecuritySettings
from ..wire import FrameCodec

log = logging.getLogger("fedml_prism")

SAFE_BACKENDS = ("GRPC", "MQTT_S3")


def security_of(args: Any) -> SecuritySettings:
    """The party's :class:`SecuritySettings` (set on ``args`` by ``cross_silo.fedml_args``); defaults
    (no authentication, no TLS) for args built elsewhere."""
    settings = getattr(args, "prism_security", None)
    return settings if isinstance(settings, SecuritySettings) else SecuritySettings()


def make_codec(args: Any, rank: int, size: int, round_of: Callable[[], int] | None = None) -> FrameCodec:
    """The frame codec of party ``rank`` of a job with ``size`` workers (ranks 1..size)."""
    security = security_of(args)
    peers = set(range(1, size + 1)) if rank == 0 else {0}
    codec = FrameCodec(str(args.run_id), rank, peers, security.keyring(rank), security.max_bytes, round_of=round_of)
    if not codec.keys.enabled:
        log.warning("party %d: messages are not authenticated (set security_args.auth_key_file; docs/security.md)",
                    rank)
    return codec


def make_comm_manager(args: Any, rank: int, size: int, backend: str,
                      round_of: Callable[[], int] | None = None) -> Any:
    """The safe communication manager of ``backend`` for party ``rank``."""
    codec = make_codec(args, rank, size, round_of)
    security = security_of(args)
    if backend == "GRPC":
        from .grpc_transport import PrismGrpcCommManager

        return PrismGrpcCommManager(args, rank, size, codec, security)
    if backend == "MQTT_S3":
        from .mqtt_transport import PrismMqttS3CommManager

        return PrismMqttS3CommManager(args, rank, size, codec, security)
    raise ValueError(f"backend={backend!r} has no safe communication manager: allowed {', '.join(SAFE_BACKENDS)}")
