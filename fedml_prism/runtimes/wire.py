"""The wire format of PriSM's cross-silo transports (gRPC, MQTT_S3): no pickle on anything a peer sends.

FedML 0.9.6 pickles whole ``Message`` objects over gRPC and model objects through S3; unpickling runs
whatever code the sender put in. A PriSM frame instead is::

    b"PRSM" | version (1 byte) | header length (4 bytes, big endian) | JSON header | safetensors blob

- the JSON header: run id, session, sequence number, round, sender, receiver, message type, the
  message's other parameters (JSON values only), the SHA-256 of the blob and the HMAC;
- the blob: the message's tensors (``model_params``, a flat ``str → Tensor`` mapping) in the
  safetensors format, which holds only dense tensors of plain dtypes and is parsed without running code.

``FrameCodec.decode`` checks, before anything reaches FedML or PriSM: the size cap, the magic and
version, the header's fields and types, the run, the receiver, that the sender is a known party (and the
one the transport saw: the gRPC caller's id, the MQTT topic), the blob's digest, the HMAC over
(run, session, seq, round, sender, receiver, type, params, digest) with the key of that sender's link,
that the sequence number grows (a replayed frame is rejected), and, at the server, that a worker's frame
carries this server process's session (below). Every failure, whatever the bytes, raises
:class:`WireError` with the reason (no other exception leaves ``decode``: tests/runtimes/test_wire_hostile.py fuzzes
it); transports log it and drop the frame. Numbers are finite and bounded (``seq`` and every JSON integer fit
in 64 bits), values nest at most ``MAX_DEPTH`` deep, a message type is a short plain token (nothing a peer
sends can forge a log line through it), and FedML's local-only type 0 (CONNECTION_IS_READY, what a party's own
transport tells its manager) is never accepted from a peer.

Round and session are handed to the managers (``WIRE_ROUND`` / ``WIRE_SESSION`` in the message
parameters): the server sends its round and a random session id made at start; a worker echoes both in
every frame once it has heard from the server. The server's codec rejects any worker frame of another
session (recorded before a server restart: sequence numbers live in memory, so only the session tells a
replay from a fresh frame after a restart). A worker that has not heard from this server yet may send one
thing without a session: a status (its hello); the server manager never acts on it beyond asking that
worker for its status again (the answer carries the session), so a recorded hello replayed into a resumed
server only makes it send that question.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .security import KeyRing

log = logging.getLogger("fedml_prism")

MAGIC = b"PRSM"
VERSION = 1
MODEL_PARAMS = "model_params"
WIRE_ROUND = "prism::wire_round"
WIRE_SESSION = "prism::wire_session"
MAX_HEADER_BYTES = 1 << 20
MAX_DEPTH = 16  # nesting of JSON values in a header
INT_BOUND = 1 << 63  # every JSON integer in a header, seq included, is in (-INT_BOUND, INT_BOUND)
ROUND_BOUND = 1 << 31
LOCAL_TYPES = frozenset({0})  # FedML's CONNECTION_IS_READY: from a party's own transport only
HELLO_TYPES = frozenset({5})  # FedML's C2S_CLIENT_STATUS: the one frame a worker may send before it knows the session
_TYPE = re.compile(r"-?[A-Za-z0-9_.:]{1,64}")
_MAC = re.compile(r"[0-9a-f]{64}")
HEADER_FIELDS = {"run": str, "session": str, "seq": int, "round": int, "sender": int, "receiver": int,
                 "type": str, "params": dict, "digest": str, "mac": str, "tensors": bool}


class WireError(ValueError):
    """A frame that is not accepted; the message says why."""


def _canonical(header: Mapping[str, Any]) -> bytes:
    signed = {k: header[k] for k in ("run", "session", "seq", "round", "sender", "receiver", "type", "params",
                                     "digest", "tensors")}
    return json.dumps(signed, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _json_value(key: str, value: Any) -> Any:
    """``value`` if JSON can carry it exactly (no NaN, no objects), else ``WireError`` naming the key."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise WireError(f"message parameter {key!r} ({type(value).__name__}) cannot be sent: allowed JSON values "
                        f"and a {MODEL_PARAMS!r} mapping of tensors") from None
    return json.loads(text)


def _check_values(value: Any) -> None:
    """``WireError`` if a decoded JSON value nests deeper than ``MAX_DEPTH`` (iterative: no recursion)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise WireError(f"frame header values are nested more than {MAX_DEPTH} deep")
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is not finite")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 19 or not -INT_BOUND < (value := int(text)) < INT_BOUND:
        raise ValueError(f"integer {text[:40]}... is out of range (64 bits)")
    return value


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """A mapping of tensors as safetensors bytes (contiguous CPU copies; shared storage is fine)."""
    flat = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise WireError(f"{MODEL_PARAMS} entry {name!r} cannot be sent: allowed str keys and tensor values")
        if t.layout != torch.strided or t.is_meta or t.is_quantized:
            raise WireError(f"{MODEL_PARAMS} entry {name!r} cannot be sent: allowed dense tensors with data")
        flat[name] = t.detach().to("cpu").contiguous().clone()
    return st_save(flat)


def tensors_from_bytes(blob: bytes) -> OrderedDict[str, torch.Tensor]:
    """Parse a safetensors blob (no code runs): dense CPU tensors in the sender's order."""
    try:
        loaded = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError, TypeError, KeyError, OverflowError, MemoryError) as err:
        # KeyError: a dtype the parser knows and torch's side does not map (F8_E8M0, F4)
        raise WireError(f"the tensor blob is not valid safetensors: {type(err).__name__}: {err!s:.200}") from None
    return OrderedDict(loaded)


class FrameCodec:
    """Encodes this party's messages and decodes and checks its peers' (see the module doc).

    ``rank``: this party (0 the server); ``peers``: the ranks it may hear from; ``keys``: its HMAC keys
    (authentication off when they hold none); ``round_of``: the server's current round (stamped on what
    it sends); ``session``: the server's session id (made here when ``rank == 0``).
    """

    def __init__(self, run_id: str, rank: int, peers: set[int] | list[int], keys: KeyRing, max_bytes: int,
                 round_of: Callable[[], int] | None = None) -> None:
        self.run_id, self.rank, self.peers, self.keys, self.max_bytes = str(run_id), int(rank), set(peers), keys, max_bytes
        self.round_of = round_of
        self.session = secrets.token_hex(8) if self.rank == 0 else ""
        self._server_round = -1  # a worker: the round of the server's latest message (echoed in uploads)
        self._seq = time.time_ns()  # grows across restarts of this party (a receiver keeps the largest seen)
        self._last_seq: dict[int, int] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ sending
    def encode(self, msg: Any) -> bytes:
        """A FedML ``Message`` as a frame; ``WireError`` if it holds anything but JSON values and tensors."""
        params = dict(msg.get_params())
        tensors = params.pop(MODEL_PARAMS, None)
        has_tensors = isinstance(tensors, Mapping)
        if tensors is not None and not has_tensors:
            params[MODEL_PARAMS] = tensors  # e.g. an S3 key string in FedML's own protocol
        params.pop(WIRE_ROUND, None)
        params.pop(WIRE_SESSION, None)
        clean = {str(k): _json_value(str(k), v) for k, v in params.items()}
        blob = tensors_to_bytes(tensors) if has_tensors else b""
        receiver = int(msg.get_receiver_id())
        with self._lock:
            self._seq += 1
            seq = self._seq
        header = {
            "run": self.run_id, "session": self.session, "seq": seq,
            "round": int(self.round_of()) if self.round_of else self._server_round,
            "sender": self.rank, "receiver": receiver, "type": str(msg.get_type()), "params": clean,
            "digest": hashlib.sha256(blob).hexdigest(), "tensors": has_tensors,
        }
        key = self.keys.link_key(receiver)
        header["mac"] = hmac.new(key, _canonical(header), hashlib.sha256).hexdigest() if key else ""
        head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
        frame = MAGIC + bytes([VERSION]) + struct.pack(">I", len(head)) + head + blob
        if len(frame) > self.max_bytes:
            raise WireError(f"message of {len(frame)} bytes exceeds max_message_mb ({self.max_bytes} bytes)")
        return frame

    # ------------------------------------------------------------------ receiving
    def decode(self, frame: bytes, transport_sender: int | None = None) -> Any:
        """Check a frame and rebuild FedML's ``Message``; ``WireError`` with the reason otherwise.
        ``transport_sender``: who the transport says sent it (gRPC caller id, MQTT topic)."""
        from ._fedml_import import silence_fedml_import_warnings

        silence_fedml_import_warnings()
        from fedml.core.distributed.communication.message import Message

        header, blob = self.parse(frame)
        sender = header["sender"]
        if transport_sender is not None and sender != int(transport_sender):
            raise WireError(f"sender {sender} in the frame but {transport_sender} on the transport (spoofed sender)")
        if self.keys.enabled:
            key = self.keys.link_key(sender)
            if not key or not _MAC.fullmatch(header["mac"]):
                raise WireError(f"bad message authentication code from sender {sender}")
            expected = hmac.new(key, _canonical(header), hashlib.sha256).hexdigest()
            if not hmac.compare_digest(expected.encode(), header["mac"].encode()):
                raise WireError(f"bad message authentication code from sender {sender}")
        if hashlib.sha256(blob).hexdigest() != header["digest"]:
            raise WireError("the tensor blob does not match its digest")
        with self._lock:
            if header["seq"] <= self._last_seq.get(sender, -1):
                raise WireError(f"sequence number {header['seq']} from sender {sender} already seen (replayed frame)")
            self._last_seq[sender] = header["seq"]
        if self.rank != 0 and sender == 0:
            self.session, self._server_round = header["session"], header["round"]
        msg_type = message_type(header["type"])
        msg = Message(msg_type, sender, header["receiver"])
        for k, v in header["params"].items():
            msg.add_params(k, v)
        msg.add_params(Message.MSG_ARG_KEY_TYPE, msg_type)
        msg.add_params(Message.MSG_ARG_KEY_SENDER, sender)
        msg.add_params(Message.MSG_ARG_KEY_RECEIVER, header["receiver"])
        if header["tensors"]:
            msg.add_params(MODEL_PARAMS, tensors_from_bytes(blob))
        elif blob:
            raise WireError("a tensor blob in a frame that declares none")
        msg.add_params(WIRE_ROUND, header["round"])
        msg.add_params(WIRE_SESSION, header["session"])
        return msg

    def parse(self, frame: bytes) -> tuple[dict[str, Any], bytes]:
        """The frame's header (fields and types checked, run and receiver matched) and its blob."""
        if not isinstance(frame, bytes | bytearray | memoryview):
            raise WireError(f"a frame must be bytes, got {type(frame).__name__}")
        frame = bytes(frame)
        if len(frame) > self.max_bytes:
            raise WireError(f"frame of {len(frame)} bytes exceeds max_message_mb ({self.max_bytes} bytes)")
        if len(frame) < 9 or frame[:4] != MAGIC:
            raise WireError("not a PriSM frame (bad magic: a pickle or another protocol)")
        if frame[4] != VERSION:
            raise WireError(f"frame version {frame[4]} is not supported (this party speaks {VERSION})")
        (size,) = struct.unpack(">I", frame[5:9])
        if size > MAX_HEADER_BYTES or 9 + size > len(frame):
            raise WireError(f"frame header length {size} is invalid")
        try:
            header = json.loads(frame[9:9 + size], parse_constant=_no_constant, parse_float=_finite_float,
                                parse_int=_bounded_int)
        except RecursionError:
            raise WireError(f"frame header is nested too deep (allowed {MAX_DEPTH} levels)") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise WireError(f"frame header is not JSON: {err!s:.200}") from None
        if not isinstance(header, dict):
            raise WireError("frame header is not a JSON object")
        _check_values(header)
        for name, kind in HEADER_FIELDS.items():
            value = header.get(name)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise WireError(f"frame header field {name!r}={value!r:.40} is invalid: allowed {kind.__name__}")
        if not 0 <= header["seq"] < INT_BOUND:
            raise WireError(f"frame header field 'seq'={header['seq']!r:.40} is invalid: allowed 0..2^63-1")
        if not -1 <= header["round"] < ROUND_BOUND:
            raise WireError(f"frame header field 'round'={header['round']!r:.40} is invalid: allowed -1..2^31-1")
        if not _TYPE.fullmatch(header["type"]):
            raise WireError(f"frame header field 'type'={header['type']!r:.70} is invalid: allowed a message type "
                            "(1 to 64 letters, digits, '_', '.', ':')")
        if header["run"] != self.run_id:
            raise WireError(f"frame of run {header['run']!r:.40}, this is run {self.run_id!r}")
        if header["receiver"] != self.rank:
            raise WireError(f"frame for receiver {header['receiver']}, this is party {self.rank}")
        if header["sender"] not in self.peers:
            raise WireError(f"frame from unknown sender {header['sender']} (allowed {sorted(self.peers)})")
        msg_type = message_type(header["type"])
        if msg_type in LOCAL_TYPES:
            raise WireError(f"message type {header['type']!r} is local to a party (FedML's connection-ready), never sent "
                            "by a peer")
        if self.rank == 0 and header["session"] != self.session:
            if header["session"]:
                raise WireError(f"frame of another server session {header['session']!r:.40} (recorded before this server "
                                "process started: replayed)")
            if msg_type not in HELLO_TYPES:
                raise WireError(f"frame without a session: only a status (a worker's hello) may come before the worker "
                                f"has heard from this server; got type {header['type']!r}")
        return header, frame[9 + size:]


def message_type(text: str) -> int | str:
    """A frame's message type as FedML keys its handlers: its int types travel as text."""
    digits = text[1:] if text.startswith("-") else text
    return int(text) if digits.isascii() and digits.isdigit() and len(text) < 10 else text


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a frame header")

