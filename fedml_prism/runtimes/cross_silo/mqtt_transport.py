"""PriSM's MQTT_S3 transport: FedML's topics and S3 side channel, carrying checked frames instead of pickles.

FedML 0.9.6's ``MqttS3MultiClientsCommManager`` pickles model objects into S3 and unpickles the object
any JSON message names (``s3/remote_storage.py:read_model``: any key, downloaded to a local path built
from that key, then ``pickle.load``), takes the sender from the message body, and logs
``args.__dict__`` (broker and S3 credentials included). ``PrismMqttS3CommManager`` keeps FedML's topics
and message protocol and changes what travels and what is believed:

- topics (FedML's): the server publishes to worker ``w`` on ``fedml_<run>_0_<w>`` and listens on
  ``fedml_<run>_<w>``; worker ``w`` the other way round. The sender of a message is the topic it came
  on, never a field of it;
- every message is a :mod:`fedml_prism.runtimes.wire` frame. A frame without tensors of at most
  ``INLINE_MAX_BYTES`` is the MQTT payload itself; any other frame is put in S3 as one object
  (``put_object`` without an ACL: private to the bucket's owner) under ``fedml_<run>_<sender>_<32 hex>``
  (a fresh uuid4), announced on the topic by ``{"key": ..., "size": ..., "sha256": ..., "mac": ...}``.
  ``mac`` (only with authentication on) is HMAC-SHA256 with the link key frames use, over the compact
  JSON array ``[ANNOUNCEMENT_LABEL, run, sender, receiver, key, size, sha256]``
  (:func:`announcement_mac`; the label and the array form keep it apart from a frame's MAC, which is
  over a JSON object);
- receiving runs in two threads: paho's network thread (``loop_start``) and the thread that called
  ``handle_receive_message`` (FedML's ``run()``: the receiving thread). The network thread (paho's callback)
  checks only what needs no S3: the topic (it names the sender), the retain flag (retained messages are
  dropped), the payload's form, and for an announcement its fields, a key of exactly the sender's form (no
  path, no other party's objects), a size within ``max_message_mb``, the sha256's form, then, with
  authentication on, the MAC, compared in constant time: an announcement without one or with a bad one is
  dropped before any S3 request. Last, the key must not have been announced before by that sender (accepted
  or rejected; the last ``SEEN_KEYS_MAX`` keys per sender are remembered): a re-published announcement never
  causes a second download. What passes waits in a queue of at most ``INBOX_MAX`` messages (more are
  dropped, logged). One receiving thread takes them in arrival order: for an announcement it checks the
  object's size (``head_object``) against ``max_message_mb`` before reading it, reads it into memory with
  that cap (no file is written) and checks the announced size and SHA-256; then it decodes the frame (size,
  run, receiver, sender == topic sender, HMAC, digest, replay) and hands the message to FedML's managers,
  whose handlers run in that thread, never in the network thread (what they publish, like any other thread's
  publishes, is written by the network thread). Every rejection is logged on one line (``rejected an MQTT_S3
  message on <topic>: <reason>``, control characters escaped) and dropped: nothing raises out of either
  thread's loop;
- an object whose frame was accepted is deleted at once (FedML never deletes: its bucket keeps every
  model ever sent). A rejected object is left alone: whoever announced it need not be who wrote it, and
  deleting on its word would let any publisher on the topic destroy honest messages;
- the broker: credentials (``MQTT_USER`` / ``MQTT_PWD``) and TLS (``MQTT_TLS_CA``; ``MQTT_TLS_CERT`` /
  ``MQTT_TLS_KEY`` for a client certificate; ``{rank}`` is replaced, relative paths are from the job's
  yaml) in ``customized_training_mqtt_config``. A refused, unreachable or untrusted broker ends the party
  with an error naming the cause within ``MQTT_CONNECT_TIMEOUT_S`` (FedML's client retries forever); these
  settings and the connection are :mod:`~fedml_prism.runtimes.cross_silo.mqtt_broker`'s.

What this cannot do: anyone who may publish on a party's topic or write to the bucket can delay or drop
that party's messages (a flood fills the receiving queue; and a broker passes MQTT payloads of any size
before a client sees them). With authentication on they cannot forge or alter one, nor make a party read
S3; a key holder can make its peer download only objects under its own key prefix, each at most once
per process (the keys seen are not kept across a restart: a recorded announcement replayed into a
restarted party costs one ``head_object``, as accepted objects are deleted, or one download of an object
that was rejected, whose frame the codec then checks as any other: a restarted server refuses a worker
frame of its previous session). Without authentication, anyone who may publish on
the topic can make the party download objects of the sender's key form, each once. Restrict topics with
broker ACLs, the bucket with its policy, and MQTT payload sizes with the broker's ``max_packet_size``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import re
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from .._fedml_import import silence_fedml_import_warnings
from ..security import SecuritySettings
from ..wire import MAGIC, MODEL_PARAMS, FrameCodec, WireError
from .mqtt_broker import BrokerSettings, S3Settings, connect

silence_fedml_import_warnings()
from fedml.core.distributed.communication.base_com_manager import BaseCommunicationManager  # noqa: E402
from fedml.core.distributed.communication.constants import CommunicationConstants  # noqa: E402
from fedml.core.distributed.communication.message import Message  # noqa: E402
from fedml.core.distributed.communication.observer import Observer  # noqa: E402

log = logging.getLogger("fedml_prism")

SERVER_ID = 0
INLINE_MAX_BYTES = 64 * 1024
ANNOUNCEMENT_MAX_BYTES = 1024
READ_CHUNK = 1 << 20
RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
ANNOUNCEMENT_LABEL = "fedml_prism MQTT_S3 announcement v1"  # domain separation from frame MACs
ANNOUNCEMENT_FIELDS = frozenset({"key", "size", "sha256"})
INBOX_MAX = 256  # messages waiting for the receiving thread; more are dropped (logged)
SEEN_KEYS_MAX = 1024  # S3 keys remembered per sender (never fetched again)


class Rejected(Exception):
    """A message this party drops; the message says why."""


def _reject(topic: str, err: Exception) -> None:
    """Log a dropped message: ``rejected an MQTT_S3 message on <topic>: <reason>`` on one line."""
    reason = str(err) if isinstance(err, Rejected | WireError) else f"{type(err).__name__}: {err}"
    log.warning("rejected an MQTT_S3 message on %s: %s", topic, _one_line(reason))



def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def announcement_mac(link_key: bytes, run_id: str, sender: int, receiver: int, key: str, size: int, digest: str) -> str:
    """The MAC of an S3 announcement: HMAC-SHA256 with the link key over the compact JSON array
    ``[ANNOUNCEMENT_LABEL, run, sender, receiver, key, size, sha256]`` (a frame's MAC is over a JSON
    object: the two can never be taken for each other)."""
    signed = json.dumps([ANNOUNCEMENT_LABEL, run_id, sender, receiver, key, size, digest], separators=(",", ":"))
    return hmac.new(link_key, signed.encode(), hashlib.sha256).hexdigest()


def _one_line(text: str) -> str:
    """``text`` with control characters escaped: a peer's string cannot start a log line of its own."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True)
class _Inbound:
    """A message the network thread accepted for the receiving thread: an inline frame or an S3 object."""

    topic: str
    sender: int
    frame: bytes = b""
    key: str = ""
    size: int = 0
    digest: str = ""


# ------------------------------------------------------------------------------ the communication manager
class PrismMqttS3CommManager(BaseCommunicationManager):
    """FedML's MQTT_S3 communication manager for party ``rank`` of a job with ``size`` workers, carrying
    :mod:`fedml_prism.runtimes.wire` frames (see the module doc). Attributes FedML's and PriSM's managers read:
    ``codec``, ``_topic``, ``topic``, ``client_id``, ``broker_host``, ``broker_port``, ``mqtt_user``,
    ``mqtt_pwd``, ``server_id``, ``edge_id``, ``client_real_ids``, ``is_connected``."""

    def __init__(self, args: Any, rank: int, size: int, codec: FrameCodec, security: SecuritySettings) -> None:
        self.args, self.rank, self.size, self.codec, self.security = args, int(rank), int(size), codec, security
        run = str(args.run_id)
        if not RUN_ID.fullmatch(run):
            raise ValueError(f"run_id={run!r:.80} is invalid for MQTT_S3: allowed 1-64 letters, digits, '.', '_', '-' "
                             "(it names MQTT topics and S3 keys)")
        self.run_id = run
        self.broker: BrokerSettings = args.prism_broker  # Job.broker(rank) and Job.s3(), checked
        self.s3_settings: S3Settings = args.prism_s3
        self.broker_host, self.broker_port = self.broker.host, self.broker.port
        self.mqtt_user, self.mqtt_pwd = self.broker.user, self.broker.password
        self._topic = f"fedml_{run}_"
        self.server_id, self.edge_id = SERVER_ID, self.rank
        self.client_real_ids = sorted(codec.peers) if self.rank == SERVER_ID else [self.rank]
        if self.rank == SERVER_ID:
            self._inbox = {f"{self._topic}{w}": w for w in sorted(codec.peers)}
        else:
            self._inbox = {f"{self._topic}{SERVER_ID}_{self.rank}": SERVER_ID}
        self._keys = {s: re.compile(re.escape(f"{self._topic}{s}_") + "[0-9a-f]{32}") for s in self._inbox.values()}
        self._seen: dict[int, OrderedDict[str, None]] = {s: OrderedDict() for s in self._inbox.values()}
        self._pending: queue.Queue[_Inbound | None] = queue.Queue(maxsize=INBOX_MAX)
        self._observers: list[Observer] = []
        self._client_id = f"FedML_CS_{run}_{self.rank}_{uuid.uuid4().hex}"
        self._s3 = self.s3_settings.client()
        self._warned_delete = False
        self._ready_sent = False
        self._stopping = False
        self._connected_once = False
        self._connacks: list[int] = []
        self.is_connected = False
        self._client = self._new_client(self._client_id)
        will = CommunicationConstants.SERVER_TOP_LAST_WILL_MSG if self.rank == SERVER_ID \
            else CommunicationConstants.CLIENT_TOP_LAST_WILL_MSG
        offline = {"ID": self.edge_id, "status": CommunicationConstants.MSG_CLIENT_STATUS_OFFLINE}
        self._client.will_set(will, json.dumps(offline), qos=2, retain=True)  # FedML's last will, unchanged
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        connect(self._client, self.broker, lambda: self._connacks[-1] if self._connacks else None)
        log.info("party %d: MQTT broker %s, S3 bucket %s; listening on %s", self.rank, self.broker.address,
                 self.s3_settings.bucket, ", ".join(self._inbox))

    def _new_client(self, client_id: str) -> mqtt.Client:
        client = mqtt.Client(client_id=client_id, clean_session=True)
        client.enable_logger(logging.getLogger("fedml_prism.paho"))
        logging.getLogger("fedml_prism.paho").setLevel(logging.WARNING)
        self.broker.configure(client)
        return client

    # ------------------------------------------------------------------ FedML's interface
    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def topic(self) -> str:
        return self._topic

    def add_observer(self, observer: Observer) -> None:
        self._observers.append(observer)

    def remove_observer(self, observer: Observer) -> None:
        self._observers.remove(observer)

    def handle_receive_message(self) -> None:
        """Tell the managers the connection is ready (once: FedML's managers answer it by announcing
        themselves), start paho's network thread, and be the receiving thread (:meth:`_receive_loop`) until
        :meth:`stop_receive_message`; then stop the network thread."""
        if not self._ready_sent:
            self._ready_sent = True
            ready = Message(CommunicationConstants.MSG_TYPE_CONNECTION_IS_READY, self.rank, self.rank)
            self._deliver(ready, "connection")
        # paho's own thread: a publish from any other thread (handlers, deadlines) is queued for it; with
        # loop_forever in this thread, paho would write the socket from the publishing thread (a race that
        # corrupts TLS records)
        self._client.loop_start()
        try:
            self._receive_loop()
        finally:
            self._stopping = True
            self._client.disconnect()
            self._client.loop_stop()

    def stop_receive_message(self) -> None:
        self._stopping = True
        self._client.disconnect()
        try:
            self._pending.put_nowait(None)  # wakes the receiving thread
        except queue.Full:
            pass  # it sees _stopping after its current message

    def send_message(self, msg: Message) -> bool:
        """Send a FedML message as a frame: inline when small and without tensors, else through S3.
        Raises (``WireError``, S3 or MQTT errors) when it cannot be sent; the managers handle that."""
        topic = self._outbox(int(msg.get_receiver_id()))
        payload = self._payload(msg)
        info = self._client.publish(topic, payload, qos=2, retain=False)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: queued until the reconnect
            raise ConnectionError(f"MQTT publish on {topic} failed: {mqtt.error_string(info.rc)}")
        return True

    def send_message_blocking(self, msg: Message, timeout_s: float | None = None) -> None:
        """Send ``msg`` on a connection of its own and return once the broker has it (QoS 2 complete): for
        the last message before this party disconnects, which an asynchronous publish would lose.
        ``TimeoutError`` if the broker has not taken it within ``timeout_s`` (default: the connect timeout)."""
        topic = self._outbox(int(msg.get_receiver_id()))
        payload = self._payload(msg)
        timeout_s = self.broker.connect_timeout_s if timeout_s is None else timeout_s
        acks: list[int] = []
        client = self._new_client(f"{self._client_id}_last")
        client.on_connect = lambda c, u, f, rc: acks.append(rc)
        connect(client, self.broker, lambda: acks[-1] if acks else None)
        client.loop_start()
        try:
            info = client.publish(topic, payload, qos=2, retain=False)
            info.wait_for_publish(timeout=timeout_s)
            if not info.is_published():
                raise TimeoutError(f"the MQTT broker {self.broker.address} did not take the message on {topic} "
                                   f"within {timeout_s:.0f} s")
        finally:
            client.disconnect()
            client.loop_stop()

    # ------------------------------------------------------------------ sending
    def _outbox(self, receiver: int) -> str:
        if self.rank == SERVER_ID:
            if receiver not in self.codec.peers:
                raise ValueError(f"receiver {receiver} is not a worker of this job (allowed {sorted(self.codec.peers)})")
            return f"{self._topic}{SERVER_ID}_{receiver}"
        if receiver != SERVER_ID:
            raise ValueError(f"receiver {receiver} is invalid: a worker sends to the server ({SERVER_ID}) only")
        return f"{self._topic}{self.rank}"

    def _payload(self, msg: Message) -> bytes:
        frame = self.codec.encode(msg)
        if not isinstance(msg.get(MODEL_PARAMS), Mapping) and len(frame) <= INLINE_MAX_BYTES:
            return frame
        key = f"{self._topic}{self.rank}_{uuid.uuid4().hex}"
        self._s3.put_object(Bucket=self.s3_settings.bucket, Key=key, Body=frame)  # no ACL: never public
        ann: dict[str, Any] = {"key": key, "size": len(frame), "sha256": hashlib.sha256(frame).hexdigest()}
        receiver = int(msg.get_receiver_id())
        link = self.codec.keys.link_key(receiver)
        if link is not None:
            ann["mac"] = announcement_mac(link, self.run_id, self.rank, receiver, key, ann["size"], ann["sha256"])
        return json.dumps(ann).encode()

    # ------------------------------------------------------------------ receiving
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: int) -> None:
        self._connacks.append(rc)
        if rc != 0:
            if self._connected_once:  # the first refusal is raised by connect()
                log.warning("party %d: the MQTT broker %s refused to reconnect: %s", self.rank, self.broker.address,
                            mqtt.connack_string(rc))
            return
        if self._connected_once:
            log.info("party %d: reconnected to the MQTT broker %s", self.rank, self.broker.address)
        self._connected_once = self.is_connected = True
        client.subscribe([(topic, 2) for topic in self._inbox])  # again after a reconnect: the session is clean

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, rc: int) -> None:
        self.is_connected = False
        if rc != 0 and self._connected_once and not self._stopping:
            log.warning("party %d: lost the MQTT broker %s (%s): reconnecting", self.rank, self.broker.address,
                        mqtt.error_string(rc))

    def _on_message(self, client: mqtt.Client, userdata: Any, mqtt_msg: Any) -> None:
        """The network thread: check what needs no S3 (topic, form, announcement MAC, keys seen before)
        and queue the rest for the receiving thread; nothing here blocks on S3 or on a handler."""
        topic = str(mqtt_msg.topic)
        try:
            inbound = self._parse(topic, mqtt_msg)
        except Exception as err:  # noqa: BLE001 - nothing one message holds may end the MQTT loop
            _reject(topic, err)
            return
        try:
            self._pending.put_nowait(inbound)
        except queue.Full:
            _reject(topic, Rejected(f"{INBOX_MAX} messages wait for the receiving thread already: dropped"))

    def _receive_loop(self) -> None:
        """The receiving thread: read S3 objects, decode and check frames, hand messages to the managers,
        one at a time in the order they came; until ``None`` is queued or the party stops."""
        while not self._stopping:
            try:
                inbound = self._pending.get(timeout=1.0)
            except queue.Empty:
                continue
            if inbound is None or self._stopping:
                return
            try:
                message = self._take(inbound)
            except Exception as err:  # noqa: BLE001 - S3 / decoding trouble of one message must not end the loop
                _reject(inbound.topic, err)
                continue
            self._deliver(message, inbound.topic)

    def _deliver(self, message: Message, topic: str) -> None:
        msg_type = message.get_type()
        for observer in list(self._observers):
            try:
                observer.receive_message(msg_type, message)
            except Exception:  # noqa: BLE001 - a failing handler is logged; the loop goes on (deadlines and watchdogs act)
                log.exception("party %d: the handler of a message of type %r on %s failed", self.rank, msg_type, topic)

    def _receive(self, topic: str, mqtt_msg: Any) -> Message:
        """Both threads' checks of one MQTT message in this thread: the FedML message, or ``Rejected`` /
        ``WireError`` (S3 errors become ``Rejected``)."""
        return self._take(self._parse(topic, mqtt_msg))

    def _parse(self, topic: str, mqtt_msg: Any) -> _Inbound:
        """What the network thread checks: topic, retain flag, form, and for an S3 announcement its
        fields, MAC (with authentication on) and that its key was not announced before."""
        sender = self._inbox.get(topic)
        if sender is None:
            raise Rejected("not a topic this party listens on")
        if mqtt_msg.retain:
            raise Rejected("a retained message (kept by the broker from an earlier publisher)")
        payload = bytes(mqtt_msg.payload)
        if payload[:len(MAGIC)] == MAGIC:
            if len(payload) > INLINE_MAX_BYTES:
                raise Rejected(f"an inline frame of {len(payload)} bytes (allowed up to {INLINE_MAX_BYTES}; larger "
                               "frames come through S3)")
            return _Inbound(topic, sender, frame=payload)
        if payload[:1] == b"{":
            return self._announcement(topic, payload, sender)
        raise Rejected(f"neither a PriSM frame nor an S3 announcement ({len(payload)} bytes starting {payload[:8]!r}: "
                       "a pickle or another protocol)")

    def _take(self, inbound: _Inbound) -> Message:
        """What the receiving thread does: read the announced object (checked against its announcement),
        decode and check the frame, delete the object of an accepted frame."""
        if not inbound.key:
            return self.codec.decode(inbound.frame, transport_sender=inbound.sender)
        frame = self._fetch(inbound.key, inbound.size, inbound.digest)
        message = self.codec.decode(frame, transport_sender=inbound.sender)
        self._delete(inbound.key)
        return message

    def _announcement(self, topic: str, payload: bytes, sender: int) -> _Inbound:
        if len(payload) > ANNOUNCEMENT_MAX_BYTES:
            raise Rejected(f"an S3 announcement of {len(payload)} bytes (allowed up to {ANNOUNCEMENT_MAX_BYTES})")
        try:
            ann = json.loads(payload, parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise Rejected(f"an S3 announcement that is not JSON: {type(err).__name__}: {err}") from None
        if not isinstance(ann, dict) or not ANNOUNCEMENT_FIELDS <= set(ann) <= ANNOUNCEMENT_FIELDS | {"mac"}:
            raise Rejected("an S3 announcement must be a JSON object with exactly key, size, sha256 and (with "
                           "authentication) mac")
        key, size, digest = ann["key"], ann["size"], ann["sha256"]
        if not isinstance(key, str) or not self._keys[sender].fullmatch(key):
            raise Rejected(f"S3 key {key!r:.100} is not one sender {sender} may use (allowed "
                           f"{self._topic}{sender}_<32 hex digits>)")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= self.codec.max_bytes:
            raise Rejected(f"announced size {size!r:.40} of S3 object {key} is invalid: allowed 1..{self.codec.max_bytes} "
                           "(max_message_mb)")
        if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
            raise Rejected(f"announced sha256 {digest!r:.80} is invalid: allowed 64 lowercase hex digits")
        if self.codec.keys.enabled:
            mac, link = ann.get("mac"), self.codec.keys.link_key(sender)
            if mac is None:
                raise Rejected(f"S3 announcement from sender {sender} has no MAC (key {key!r})")
            ok = isinstance(mac, str) and SHA256_HEX.fullmatch(mac) is not None and link is not None and \
                hmac.compare_digest(announcement_mac(link, self.run_id, sender, self.rank, key, size, digest), mac)
            if not ok:
                raise Rejected(f"S3 announcement from sender {sender} has a bad MAC (key {key!r})")
        seen = self._seen[sender]
        if key in seen:
            raise Rejected(f"S3 key {key!r} was announced before (each object is fetched once at most)")
        seen[key] = None
        if len(seen) > SEEN_KEYS_MAX:
            seen.popitem(last=False)
        return _Inbound(topic, sender, key=key, size=size, digest=digest)

    def _fetch(self, key: str, size: int, digest: str) -> bytes:
        """The object ``key``, read into memory: its size checked before and while reading, then its hash."""
        from botocore.exceptions import BotoCoreError, ClientError

        cap, bucket = self.codec.max_bytes, self.s3_settings.bucket
        try:
            length = self._s3.head_object(Bucket=bucket, Key=key).get("ContentLength")
            if isinstance(length, bool) or not isinstance(length, int):
                raise Rejected(f"S3 object {key} has no size")
            if length > cap:
                raise Rejected(f"S3 object {key} of {length} bytes exceeds max_message_mb ({cap} bytes): not read")
            if length != size:
                raise Rejected(f"S3 object {key} has {length} bytes, its announcement says {size}")
            body = self._s3.get_object(Bucket=bucket, Key=key)["Body"]
            chunks, total = [], 0
            try:
                while chunk := body.read(min(READ_CHUNK, cap + 1 - total)):
                    chunks.append(chunk)
                    total += len(chunk)
                    if total > cap:
                        raise Rejected(f"S3 object {key} grew past max_message_mb ({cap} bytes) while read")
            finally:
                body.close()
        except ClientError as err:
            error = err.response.get("Error", {})
            raise Rejected(f"S3 object {key} cannot be read: {error.get('Code', '?')} {error.get('Message', '')}".rstrip()) \
                from None
        except BotoCoreError as err:
            raise Rejected(f"S3 object {key} cannot be read: {err}") from None
        data = b"".join(chunks)
        if len(data) != size:
            raise Rejected(f"S3 object {key} has {len(data)} bytes, its announcement says {size}")
        if hashlib.sha256(data).hexdigest() != digest:
            raise Rejected(f"S3 object {key} does not match its announced sha256")
        return data

    def _delete(self, key: str) -> None:
        """Remove a consumed object; a party without delete rights leaves it (said once)."""
        try:
            self._s3.delete_object(Bucket=self.s3_settings.bucket, Key=key)
        except Exception as err:  # noqa: BLE001 - cleanup only
            if not self._warned_delete:
                self._warned_delete = True
                log.warning("party %d: cannot delete consumed S3 objects (%s: %s); they stay in bucket %s (grant "
                            "s3:DeleteObject or set a lifecycle rule)", self.rank, type(err).__name__, err,
                            self.s3_settings.bucket)
