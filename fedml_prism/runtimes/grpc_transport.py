"""PriSM's communication manager for FedML's gRPC backend: checked frames instead of pickles.

FedML 0.9.6's ``GRPCCommManager`` (``core/distributed/communication/grpc/grpc_comm_manager.py``)
unpickles every request a peer sends, trusts the sender id inside it, learns new peers' addresses from
the message itself, binds ``0.0.0.0`` when the CSV lacks its rank, and speaks plain text.
``PrismGrpcCommManager`` keeps FedML's service (the generated ``gRPCCommManager`` stubs, so the wire
protocol stays FedML's) and its message loop, and changes what is trusted:

- a request's bytes are a :mod:`fedml_prism.runtimes.wire` frame, decoded and checked in the gRPC thread
  (size cap, header, run, receiver, known sender equal to the request's ``client_id``, HMAC, digest,
  no replay); a rejected frame is logged with its reason and dropped, and the peer still gets the
  ordinary empty answer, so a rogue learns nothing and the server loop never sees it;
- addresses come only from ``grpc_ipconfig_path`` (:func:`check_ipconfig` refuses a CSV without a
  row per party before anything starts); a message cannot redirect where replies go;
- TLS when ``security_args`` names ``tls_ca``, ``tls_cert`` and ``tls_key``: each channel verifies the
  peer's certificate against the CA (the target name is the CSV's host: ``run/make_certs.sh`` puts
  127.0.0.1 and localhost, plus any extra names, in every certificate); with ``tls_mutual: true``
  every listener demands a client certificate of that CA and checks that its common name is
  ``party<client_id>``, so a party's identity is bound to its certificate as well as to its key;
- gRPC's own size caps sit a little above ``max_message_mb``, so an oversized frame still reaches the
  codec and is rejected with a logged reason; ``SO_REUSEPORT`` is off, so no other process can bind a
  party's port next to it and take part of its traffic.
"""

from __future__ import annotations

import csv
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any, NamedTuple

import grpc

from ._fedml_import import silence_fedml_import_warnings
from .security import SecuritySettings
from .wire import FrameCodec, WireError

silence_fedml_import_warnings()
from fedml.core.distributed.communication.base_com_manager import BaseCommunicationManager  # noqa: E402
from fedml.core.distributed.communication.constants import CommunicationConstants  # noqa: E402
from fedml.core.distributed.communication.grpc import (  # noqa: E402  (FedML's generated stubs: no pickle in them)
    grpc_comm_manager_pb2,
    grpc_comm_manager_pb2_grpc,
)
from fedml.core.distributed.communication.message import Message  # noqa: E402
from fedml.core.distributed.communication.observer import Observer  # noqa: E402

log = logging.getLogger("fedml_prism")

REQUIRED_COLUMNS = ("eid", "grpc_server_ip", "grpc_server_port")
#: gRPC's caps are max_message_mb plus this, so a frame a little too large reaches the codec (logged)
CAP_SLACK_BYTES = 1 << 20
GRPC_MAX_LENGTH = 2**31 - 1
#: a send waits this long plus 1 s per MiB before it fails (a peer that is stopped but still accepts)
SEND_TIMEOUT_S = 30.0
SEND_S_PER_MIB = 1.0


class GrpcAddress(NamedTuple):
    """One party's row of ``grpc_ipconfig_path``: where it listens and where others reach it."""

    rank: int
    host: str
    port: int
    ingress: str | None = None

    @property
    def bind(self) -> str:
        return _host_port(self.host, self.port)

    @property
    def target(self) -> str:
        """Where peers connect (FedML's order: ``ingress_ip`` first); a wildcard host means this machine."""
        host = self.ingress or self.host
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return _host_port(host, self.port)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def read_ipconfig(path: str) -> dict[int, GrpcAddress]:
    """The parties of a gRPC ipconfig CSV (``eid,rank,grpc_server_ip,grpc_server_port[,ingress_ip]``,
    keyed by ``eid`` as FedML keys it); ``ValueError`` naming every bad row."""
    if not os.path.isfile(path):
        raise ValueError(f"grpc_ipconfig_path={path!r} is invalid: the file does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if missing := [c for c in REQUIRED_COLUMNS if c not in columns]:
            raise ValueError(f"grpc_ipconfig_path={path!r} is invalid: columns {missing} are missing "
                             f"(allowed header: eid,rank,grpc_server_ip,grpc_server_port[,ingress_ip])")
        rows = [{(k or "").strip(): (v or "").strip() if isinstance(v, str) else v for k, v in row.items()}
                for row in reader]
    table: dict[int, GrpcAddress] = {}
    problems = []
    for line, row in enumerate(rows, start=2):
        eid, host, port = row.get("eid"), row.get("grpc_server_ip"), row.get("grpc_server_port")
        if not eid or not eid.isdigit():
            problems.append(f"line {line}: eid={eid!r} (allowed an integer >= 0)")
            continue
        if not host:
            problems.append(f"line {line}: grpc_server_ip is empty (allowed an IP address or host name)")
            continue
        if not port or not port.isdigit() or not 1 <= int(port) <= 65535:
            problems.append(f"line {line}: grpc_server_port={port!r} (allowed an integer in [1, 65535])")
            continue
        if int(eid) in table:
            problems.append(f"line {line}: eid {eid} appears twice (allowed one row per party)")
            continue
        table[int(eid)] = GrpcAddress(int(eid), host, int(port), row.get("ingress_ip") or None)
    seen: dict[str, int] = {}
    for addr in table.values():
        if (other := seen.setdefault(addr.target, addr.rank)) != addr.rank:
            problems.append(f"ranks {other} and {addr.rank} share the address {addr.target} (allowed one party each)")
    if problems:
        raise ValueError(f"grpc_ipconfig_path={path!r} is invalid: " + "; ".join(problems))
    return table


def check_ipconfig(path: Any, base_dir: str, worker_num: int) -> dict[int, GrpcAddress]:
    """The job's gRPC addresses, checked before anything starts: every party 0..``worker_num`` needs
    its own row (FedML would bind 0.0.0.0:8890+rank instead); ``ValueError`` naming what is wrong."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"grpc_ipconfig_path={path!r} is invalid: backend GRPC needs a CSV with one row per party "
                         f"(eid,rank,grpc_server_ip,grpc_server_port; ranks 0..{worker_num})")
    full = path if os.path.isabs(path) else os.path.join(base_dir, path)
    table = read_ipconfig(full)
    if missing := [r for r in range(worker_num + 1) if r not in table]:
        raise ValueError(f"grpc_ipconfig_path={path!r} is invalid: no row for rank(s) {missing} "
                         f"(allowed: one row per party, the server 0 and workers 1..{worker_num})")
    return table


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


class _Servicer(grpc_comm_manager_pb2_grpc.gRPCCommManagerServicer):
    """FedML's service with our handler: every request is answered with an empty response."""

    def __init__(self, receive: Callable[[Any, Any], None]) -> None:
        self._receive = receive

    def sendMessage(self, request: Any, context: Any) -> Any:  # noqa: N802 - FedML's generated method name
        self._receive(request, context)
        return grpc_comm_manager_pb2.CommResponse()

    def handleReceiveMessage(self, request: Any, context: Any) -> Any:  # noqa: N802 - unused by FedML's protocol
        return grpc_comm_manager_pb2.CommResponse()


class PrismGrpcCommManager(BaseCommunicationManager):
    """A party of a gRPC job: listens on its own CSV row, sends frames to its peers' rows.

    ``rank`` 0 is the server, 1..``size`` the workers; ``codec`` encodes and checks frames;
    ``security`` gives the TLS files and the size cap."""

    def __init__(self, args: Any, rank: int, size: int, codec: FrameCodec, security: SecuritySettings) -> None:
        self.args, self.rank, self.size, self.codec, self.security = args, int(rank), int(size), codec, security
        self._observers: list[Observer] = []
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._send_locks: dict[int, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self.addresses = check_ipconfig(getattr(args, "grpc_ipconfig_path", None), os.getcwd(), self.size)
        own = self.addresses.get(self.rank)
        if own is None:
            raise ValueError(f"grpc_ipconfig_path has no row for this party (rank {self.rank})")
        limit = min(security.max_bytes + CAP_SLACK_BYTES, GRPC_MAX_LENGTH)
        self._options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
                         ("grpc.enable_http_proxy", 0)]
        self._channel_credentials = None
        server_credentials = None
        if security.tls:
            ca, cert, key = _read(security.tls_ca), _read(security.tls_cert), _read(security.tls_key)
            self._channel_credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                                                     certificate_chain=cert)
            server_credentials = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca if security.tls_mutual else None,
                require_client_auth=security.tls_mutual)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.size + 2, thread_name_prefix="prism-grpc"),
                                   options=[*self._options, ("grpc.so_reuseport", 0)])
        grpc_comm_manager_pb2_grpc.add_gRPCCommManagerServicer_to_server(_Servicer(self._receive), self._server)
        try:
            if server_credentials is not None:
                self._server.add_secure_port(own.bind, server_credentials)
            else:
                self._server.add_insecure_port(own.bind)
        except RuntimeError as err:
            raise RuntimeError(f"party {self.rank} cannot listen on {own.bind} (its row of grpc_ipconfig_path): {err}; "
                               "is another process using that port?") from None
        self._server.start()
        self.is_running = True
        mode = ("mutual TLS" if security.tls_mutual else "TLS") if security.tls else "no TLS (security_args.tls_*)"
        log.info("party %d: gRPC listening on %s, %s", self.rank, own.bind, mode)

    # ------------------------------------------------------------------ receiving
    def _receive(self, request: Any, context: Any) -> None:
        """Check one request in the gRPC thread; a good frame goes to the loop, any other is logged and dropped."""
        peer = f"{context.peer()} (client_id {request.client_id})"
        try:
            if self.security.tls and self.security.tls_mutual:
                names = context.auth_context().get("x509_common_name") or [b""]
                name = names[0].decode("utf-8", "replace")
                if name != f"party{request.client_id}":
                    raise WireError(f"its certificate is for {name!r}, not party{request.client_id} (identity bound to "
                                    "the certificate)")
            msg = self.codec.decode(request.message, transport_sender=request.client_id)
        except WireError as err:
            log.warning("rejected a gRPC message from %s: %s", peer, err)
            return
        except Exception as err:  # noqa: BLE001 - nothing a peer sends may escape to gRPC or the loop
            log.warning("rejected a gRPC message from %s: %s", peer, f"{type(err).__name__}: {err}")
            return
        self._inbox.put(msg)

    def handle_receive_message(self) -> None:
        """FedML's loop: connection ready first, then every accepted message, one at a time, in this thread."""
        self._notify_connection_ready()
        while self.is_running:
            try:
                msg = self._inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if self.is_running:
                self.notify(msg)

    def _notify_connection_ready(self) -> None:
        msg = Message(CommunicationConstants.MSG_TYPE_CONNECTION_IS_READY, self.rank, self.rank)
        self.notify(msg)

    def notify(self, message: Message) -> None:
        msg_type = message.get_type()  # an int for FedML's types (wire.message_type)
        for observer in list(self._observers):
            observer.receive_message(msg_type, message)

    def add_observer(self, observer: Observer) -> None:
        self._observers.append(observer)

    def remove_observer(self, observer: Observer) -> None:
        self._observers.remove(observer)

    def stop_receive_message(self) -> None:
        self.is_running = False
        self._server.stop(None)

    # ------------------------------------------------------------------ sending
    def send_message(self, msg: Message) -> None:
        """Encode and send ``msg`` to its receiver's CSV address; raises on any failure (the server
        manager then leaves that worker out). Frames to one peer leave in the order of their sequence numbers."""
        receiver = int(msg.get_receiver_id())
        address = self.addresses.get(receiver)
        if address is None:
            raise ValueError(f"receiver {receiver} has no row in grpc_ipconfig_path (allowed {sorted(self.addresses)})")
        with self._lock_for(receiver):
            try:
                frame = self.codec.encode(msg)
            except WireError as err:  # this party's own message: say so, the caller only sees a failed send
                log.error("party %d cannot send message type %s to %d: %s", self.rank, msg.get_type(), receiver, err)
                raise
            request = grpc_comm_manager_pb2.CommRequest(client_id=self.rank, message=frame)
            if self._channel_credentials is not None:
                channel = grpc.secure_channel(address.target, self._channel_credentials, options=self._options)
            else:
                channel = grpc.insecure_channel(address.target, options=self._options)
            try:  # a fresh channel per message, as FedML does: no reconnect backoff left from a peer not yet up
                stub = grpc_comm_manager_pb2_grpc.gRPCCommManagerStub(channel)
                stub.sendMessage(request, timeout=SEND_TIMEOUT_S + SEND_S_PER_MIB * len(frame) / (1 << 20))
            finally:
                channel.close()

    def _lock_for(self, receiver: int) -> threading.Lock:
        with self._locks_lock:
            return self._send_locks.setdefault(receiver, threading.Lock())
