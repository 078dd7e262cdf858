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
  peer's certificate against the CA and that it names the party the channel is for: the channel to
  party r checks the name ``party<r>`` (``grpc.ssl_target_name_override``), which ``run/make_certs.sh``
  puts in party r's certificate only, whatever host the CSV gives; so a worker's certificate is of no
  use on the server's address (nor on another worker's); with ``tls_mutual: true`` every listener
  demands a client certificate of that CA and checks that its common name is ``party<client_id>``, so
  a party's identity is bound to its certificate as well as to its key;
- the listener is gRPC's asyncio server in a thread of its own: a call waiting for its request
  message holds no thread, and a call whose message has not arrived within :func:`receive_timeout_s`
  is cut (``DEADLINE_EXCEEDED``), so calls that never send their message cannot starve honest ones;
  one peer (one certificate under mutual TLS, else one connection) has at most ``CALLS_PER_PEER``
  calls open; connections without calls are closed after ``CONNECTION_IDLE_MS``, every connection
  after ``CONNECTION_AGE_MS`` (calls under way get the longest send time to finish), and a peer that
  stops answering keepalive pings is dropped; frames are decoded in a small pool off the event loop;
- gRPC's own size caps sit a little above ``max_message_mb``, so an oversized frame still reaches the
  codec and is rejected with a logged reason; ``SO_REUSEPORT`` is off, so no other process can bind a
  party's port next to it and take part of its traffic.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from ...settings.grpc import GrpcAddress, check_ipconfig, read_ipconfig  # noqa: F401 - re-exported (tests, callers)
from .._fedml_import import silence_fedml_import_warnings
from ..security import SecuritySettings
from ..wire import FrameCodec, WireError

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

CAP_SLACK_BYTES = 1 << 20
GRPC_MAX_LENGTH = 2**31 - 1
#: a send waits this long plus 1 s per MiB before it fails (a peer that is stopped but still accepts)
SEND_TIMEOUT_S = 30.0
SEND_S_PER_MIB = 1.0
#: a call must deliver its request message this long plus SEND_S_PER_MIB per MiB of the size cap after it opens
RECEIVE_TIMEOUT_S = 10.0
#: calls one peer may have open on a listener at once: its certificate under mutual TLS, else its connection
CALLS_PER_PEER = 4
#: a connection without calls is closed after this; every connection after CONNECTION_AGE_MS (calls under way
#: then get the longest send time to finish)
CONNECTION_IDLE_MS = 30_000
CONNECTION_AGE_MS = 120_000
#: the listener pings a connection with calls but no traffic for this long, and drops it when the answer does not
#: come within KEEPALIVE_TIMEOUT_MS (grpc.http2.ping_timeout_ms: without it grpcio never drops a silent peer)
KEEPALIVE_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
#: a connection must finish its (TLS) handshake within this
HANDSHAKE_TIMEOUT_MS = 10_000
#: FedML's service, whose generated (de)serializers the listener uses: the wire protocol stays FedML's
SERVICE = "gRPCCommManager"
#: what gRPC's error says when a peer's certificate does not carry the name the channel checks
NAME_MISMATCH = "Hostname Verification Check failed"


def party_name(rank: int) -> str:
    """The name party ``rank``'s certificate carries (CN and its one DNS name): a channel to it accepts no other."""
    return f"party{int(rank)}"


def send_timeout_s(frame_bytes: int) -> float:
    """How long a send of ``frame_bytes`` waits for its answer."""
    return SEND_TIMEOUT_S + SEND_S_PER_MIB * frame_bytes / (1 << 20)


def receive_timeout_s(max_bytes: int) -> float:
    """How long a listener waits for a call's request message (``max_bytes``: the size cap) before it cuts the call."""
    return RECEIVE_TIMEOUT_S + SEND_S_PER_MIB * max_bytes / (1 << 20)


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _listener_loop() -> asyncio.AbstractEventLoop:
    """The event loop every listener of this process runs on, in a daemon thread of its own."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, daemon=True, name="prism-grpc-listener").start()
        return _LOOP


class _Listener:
    """FedML's gRPC service on gRPC's asyncio server: ``receive(request, peer, certificate_names)`` gets
    each request whose message arrived within ``timeout_s``, in a small thread pool; every call is answered
    with FedML's empty response. ``mutual``: a peer is its certificate, otherwise its connection."""

    def __init__(self, bind: str, credentials: Any, options: list[tuple[str, Any]],
                 receive: Callable[[Any, str, list[bytes]], None], timeout_s: float, mutual: bool) -> None:
        self._receive, self._timeout_s, self._mutual = receive, timeout_s, mutual
        self._open: dict[str, int] = {}  # calls open per peer, and the peers refused since; touched on the loop only
        self._refused: set[str] = set()
        self._stopping = False
        self._pool = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="prism-grpc")
        self._loop = _listener_loop()
        self._server = self._on_loop(self._start(bind, credentials, options))

    def _on_loop(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    async def _start(self, bind: str, credentials: Any, options: list[tuple[str, Any]]) -> Any:
        request, response = grpc_comm_manager_pb2.CommRequest, grpc_comm_manager_pb2.CommResponse
        handlers = {
            # stream-unary on this side (one message on the wire, as FedML's unary call sends): the handler
            # starts when the call opens, so it can time the message's arrival
            "sendMessage": grpc.stream_unary_rpc_method_handler(
                self._send_message, request_deserializer=request.FromString,
                response_serializer=response.SerializeToString),
            "handleReceiveMessage": grpc.unary_unary_rpc_method_handler(  # unused by FedML's protocol
                self._unused, request_deserializer=request.FromString, response_serializer=response.SerializeToString),
        }
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        if credentials is not None:
            server.add_secure_port(bind, credentials)
        else:
            server.add_insecure_port(bind)
        await server.start()
        return server

    async def _unused(self, request: Any, context: Any) -> Any:
        return grpc_comm_manager_pb2.CommResponse()

    async def _send_message(self, requests: Any, context: Any) -> Any:
        names = (context.auth_context().get("x509_common_name") or [b""]) if self._mutual else [b""]
        peer = f"certificate CN={names[0].decode('utf-8', 'replace')!r}" if self._mutual else f"connection {context.peer()}"
        if self._open.get(peer, 0) >= CALLS_PER_PEER:
            if peer not in self._refused:  # once while it stays over the bound: refusals cannot flood the log
                self._refused.add(peer)
                log.warning("refused gRPC calls from %s: it already has %d calls open", peer, CALLS_PER_PEER)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"at most {CALLS_PER_PEER} calls at once")
        self._open[peer] = self._open.get(peer, 0) + 1
        try:
            try:
                request = await asyncio.wait_for(requests.__anext__(), self._timeout_s)
            except (TimeoutError, StopAsyncIteration) as err:
                what = f"no request message within {self._timeout_s:.0f} s" if isinstance(err, TimeoutError) \
                    else "the call ended without a request message"
                if not self._stopping:
                    log.warning("cut a gRPC call from %r: %s", context.peer(), what)
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, what)
            await asyncio.get_running_loop().run_in_executor(self._pool, self._receive, request, context.peer(), names)
            return grpc_comm_manager_pb2.CommResponse()
        finally:
            self._open[peer] -= 1
            if not self._open[peer]:
                del self._open[peer]
                self._refused.discard(peer)

    def stop(self) -> None:
        """Stop listening (calls under way are cancelled); idempotent."""
        if not self._stopping:
            self._stopping = True
            self._on_loop(self._server.stop(None))
            self._pool.shutdown(wait=False)


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
        self.addresses = args.prism_grpc_addresses  # Job.grpc_addresses(): every party's row, checked
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
        longest_call_ms = int(1000 * send_timeout_s(limit))
        listener_options = [
            *self._options, ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", CALLS_PER_PEER),
            ("grpc.max_connection_idle_ms", CONNECTION_IDLE_MS),
            ("grpc.max_connection_age_ms", CONNECTION_AGE_MS),
            ("grpc.max_connection_age_grace_ms", longest_call_ms),
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        ]
        try:
            self._listener = _Listener(own.bind, server_credentials, listener_options, self._receive,
                                       receive_timeout_s(security.max_bytes), mutual=security.tls and security.tls_mutual)
        except RuntimeError as err:
            raise RuntimeError(f"party {self.rank} cannot listen on {own.bind} (its row of grpc_ipconfig_path): {err}; "
                               "is another process using that port?") from None
        self.is_running = True
        mode = ("mutual TLS" if security.tls_mutual else "TLS") if security.tls else "no TLS (security_args.tls_*)"
        log.info("party %d: gRPC listening on %s, %s", self.rank, own.bind, mode)

    # ------------------------------------------------------------------ receiving
    def _receive(self, request: Any, peer: str, names: list[bytes]) -> None:
        """Check one request (``names``: the common names of the peer's certificate under mutual TLS) in the
        listener's pool; a good frame goes to the loop, any other is logged and dropped."""
        peer = f"{peer!r} (client_id {request.client_id})"
        try:
            if self.security.tls and self.security.tls_mutual:
                name = names[0].decode("utf-8", "replace")
                if name != party_name(request.client_id):
                    raise WireError(f"its certificate is for {name!r}, not {party_name(request.client_id)} (identity "
                                    "bound to the certificate)")
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
        self._listener.stop()

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
            if self._channel_credentials is not None:  # the peer must prove it is party <receiver>, not who answers
                options = [*self._options, ("grpc.ssl_target_name_override", party_name(receiver))]
                channel = grpc.secure_channel(address.target, self._channel_credentials, options=options)
            else:
                channel = grpc.insecure_channel(address.target, options=self._options)
            try:  # a fresh channel per message, as FedML does: no reconnect backoff left from a peer not yet up
                stub = grpc_comm_manager_pb2_grpc.gRPCCommManagerStub(channel)
                stub.sendMessage(request, timeout=send_timeout_s(len(frame)))
            except grpc.RpcError as err:
                if self._channel_credentials is not None and NAME_MISMATCH in (err.details() or ""):
                    log.error("party %d refused the certificate at %s: it does not name %s (another party's "
                              "certificate, or one made without DNS:party<r> by an older run/make_certs.sh)",
                              self.rank, address.target, party_name(receiver))
                raise
            finally:
                channel.close()

    def _lock_for(self, receiver: int) -> threading.Lock:
        with self._locks_lock:
            return self._send_locks.setdefault(receiver, threading.Lock())
