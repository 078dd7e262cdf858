"""MQTT_S3 receive path without a broker (issue 18, item 7): the network thread (paho's callback) checks an
S3 announcement's MAC before any S3 request and queues it; only the receiving thread reads S3, so a slow
or large object never blocks the MQTT loop; a key is fetched once at most, in bounded memory. The job-level
version of these checks, against mosquitto and a local S3, is tests/runtimes/test_hostile_mqtt_s3.py."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from runtime_utils import mqtt_args

from fedml_prism.runtimes.cross_silo import mqtt_transport
from fedml_prism.runtimes.security import KeyRing, SecuritySettings, worker_key
from fedml_prism.runtimes.wire import MODEL_PARAMS, FrameCodec

pytestmark = pytest.mark.timeout(60)

MASTER = bytes(range(32))
MAX_BYTES = 1 << 20
RUN = "run7"


class _Bucket:
    """S3 as the transport uses it, recording every call; ``gate`` (when set) holds ``get_object``."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.calls: list[tuple[str, str]] = []
        self.gate: threading.Event | None = None

    def head_object(self, Bucket: str, Key: str) -> dict[str, int]:  # noqa: N803 - boto3's keywords
        self.calls.append(("head", Key))
        return {"ContentLength": len(self.objects[Key])}

    def get_object(self, Bucket: str, Key: str) -> dict[str, io.BytesIO]:  # noqa: N803
        self.calls.append(("get", Key))
        if self.gate is not None:
            assert self.gate.wait(timeout=30)
        return {"Body": io.BytesIO(self.objects[Key])}

    def delete_object(self, Bucket: str, Key: str) -> None:  # noqa: N803
        self.calls.append(("delete", Key))
        self.objects.pop(Key, None)

    def put_object(self, Bucket: str, Key: str, Body: bytes) -> None:  # noqa: N803
        self.calls.append(("put", Key))
        self.objects[Key] = Body


@pytest.fixture
def fedml_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _server(monkeypatch: pytest.MonkeyPatch, bucket: _Bucket, auth: bool = True) -> Any:
    """The server's manager of run ``run7`` with workers 1 and 2, no broker, ``bucket`` as S3."""
    monkeypatch.setattr(mqtt_transport, "connect", lambda client, broker, connack: None)
    monkeypatch.setattr(mqtt_transport.S3Settings, "client", lambda self: bucket)
    args = mqtt_args(RUN, {"BROKER_HOST": "localhost"}, {"BUCKET_NAME": "prism"})
    codec = FrameCodec(RUN, 0, [1, 2], KeyRing(0, MASTER if auth else None), MAX_BYTES)
    return mqtt_transport.PrismMqttS3CommManager(args, 0, 3, codec, SecuritySettings())


def _upload(server: Any, auth: bool = True) -> bytes:
    """An upload frame of worker 1, in the server's session."""
    from fedml.core.distributed.communication.message import Message

    worker = FrameCodec(RUN, 1, [0], KeyRing(1, worker_key(MASTER, 1) if auth else None), MAX_BYTES)
    worker.session = server.codec.session
    msg = Message(3, 1, 0)
    msg.add_params(MODEL_PARAMS, {"c0/w": torch.ones(3)})
    return worker.encode(msg)


def _announce(bucket: _Bucket, frame: bytes, mac: str | None = "sign", key: str | None = None) -> SimpleNamespace:
    """Worker 1's announcement of ``frame`` (stored under a fresh key): signed with worker 1's key, or the
    ``mac`` given, or none."""
    key = key or f"fedml_{RUN}_1_{uuid.uuid4().hex}"
    bucket.objects[key] = frame
    ann: dict[str, Any] = {"key": key, "size": len(frame), "sha256": hashlib.sha256(frame).hexdigest()}
    if mac == "sign":
        mac = mqtt_transport.announcement_mac(worker_key(MASTER, 1), RUN, 1, 0, key, ann["size"], ann["sha256"])
    if mac is not None:
        ann["mac"] = mac
    return SimpleNamespace(topic=f"fedml_{RUN}_1", retain=False, payload=json.dumps(ann).encode())


def _received(server: Any) -> list[Any]:
    """Run the receiving thread over what is queued; the messages it delivered."""
    delivered: list[Any] = []
    server.add_observer(SimpleNamespace(receive_message=lambda kind, msg: delivered.append(msg)))
    server._pending.put(None)
    server._receive_loop()
    return delivered


def test_the_network_thread_reads_no_s3_and_a_slow_object_does_not_block_it(fedml_home, monkeypatch) -> None:
    """A signed announcement is queued by the MQTT callback without any S3 call; while the receiving
    thread is stuck in a download, the callback still takes (and refuses) further messages at once."""
    bucket = _Bucket()
    server = _server(monkeypatch, bucket)
    frame = _upload(server)
    first = _announce(bucket, frame)
    server._on_message(None, None, first)
    assert bucket.calls == [] and server._pending.qsize() == 1
    bucket.gate = threading.Event()
    delivered: list[Any] = []
    server.add_observer(SimpleNamespace(receive_message=lambda kind, msg: delivered.append(msg)))
    receiver = threading.Thread(target=server._receive_loop, daemon=True)
    receiver.start()
    deadline = time.monotonic() + 10
    while ("get", json.loads(first.payload)["key"]) not in bucket.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    began = time.monotonic()
    for _ in range(20):
        server._on_message(None, None, _announce(bucket, frame, mac=None))
    assert time.monotonic() - began < 1.0 and server._pending.qsize() == 0
    bucket.gate.set()
    server._pending.put(None)
    receiver.join(timeout=10)
    assert not receiver.is_alive()
    assert len(delivered) == 1 and torch.equal(delivered[0].get(MODEL_PARAMS)["c0/w"], torch.ones(3))
    key = json.loads(first.payload)["key"]
    assert bucket.calls == [("head", key), ("get", key), ("delete", key)]


@pytest.mark.parametrize("mac, reason", [
    (None, "has no MAC"),
    ("0" * 64, "has a bad MAC"),
    ("\u00e9" * 64, "has a bad MAC"),                  # non-ASCII: refused, not a TypeError
    (7, "has a bad MAC"),
    ("sign-as-2", "has a bad MAC"),                   # worker 2's valid MAC for the same fields
    ("frame-mac", "has a bad MAC"),                   # the frame's own MAC: another domain
])
def test_an_announcement_without_a_valid_mac_is_refused_before_any_s3_request(fedml_home, monkeypatch, caplog,
                                                                             mac, reason) -> None:
    caplog.set_level(logging.WARNING, logger="fedml_prism")
    bucket = _Bucket()
    server = _server(monkeypatch, bucket)
    frame = _upload(server)
    key = f"fedml_{RUN}_1_{uuid.uuid4().hex}"
    if mac == "sign-as-2":
        mac = mqtt_transport.announcement_mac(worker_key(MASTER, 2), RUN, 1, 0, key, len(frame),
                                              hashlib.sha256(frame).hexdigest())
    elif mac == "frame-mac":
        head_len = int.from_bytes(frame[5:9], "big")
        mac = json.loads(frame[9:9 + head_len])["mac"]
    for _ in range(3):
        server._on_message(None, None, _announce(bucket, frame, mac=mac, key=key))
    assert bucket.calls == [] and server._pending.qsize() == 0
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == [f"rejected an MQTT_S3 message on fedml_{RUN}_1: S3 announcement from sender 1 {reason} "
                     f"(key {key!r})"] * 3
    # the honest, signed announcement of the same key is still taken: refusals do not use a key up
    server._on_message(None, None, _announce(bucket, frame, key=key))
    assert len(_received(server)) == 1


def test_a_key_is_fetched_once_at_most_in_bounded_memory(fedml_home, monkeypatch, caplog) -> None:
    """An accepted key and a rejected one, each announced again: refused without S3. The keys seen are
    bounded per sender: the oldest is forgotten once SEEN_KEYS_MAX newer ones came."""
    caplog.set_level(logging.WARNING, logger="fedml_prism")
    bucket = _Bucket()
    server = _server(monkeypatch, bucket)
    frame = _upload(server)
    good, bad = _announce(bucket, frame), _announce(bucket, b"PRSM" + bytes(40))
    for message in (good, bad, good, bad):
        server._on_message(None, None, message)
    assert len(_received(server)) == 1
    assert [c for c, _ in bucket.calls] == ["head", "get", "delete", "head", "get"]
    seen = [r.getMessage() for r in caplog.records if "was announced before" in r.getMessage()]
    assert len(seen) == 2
    monkeypatch.setattr(mqtt_transport, "SEEN_KEYS_MAX", 8)
    for _ in range(8):
        server._parse(f"fedml_{RUN}_1", _announce(bucket, frame))
    assert len(server._seen[1]) == 8 and json.loads(good.payload)["key"] not in server._seen[1]


def test_without_keys_announcements_carry_no_mac_and_are_read_once(fedml_home, monkeypatch) -> None:
    bucket = _Bucket()
    server = _server(monkeypatch, bucket, auth=False)
    frame = _upload(server, auth=False)
    message = _announce(bucket, frame, mac=None)
    server._on_message(None, None, message)
    server._on_message(None, None, message)
    assert bucket.calls == [] and server._pending.qsize() == 1
    assert len(_received(server)) == 1
    # what this party sends without keys: FedML's three fields, no MAC
    from fedml.core.distributed.communication.message import Message

    out = Message(1, 0, 1)
    out.add_params(MODEL_PARAMS, {"w": torch.zeros(2)})
    assert set(json.loads(server._payload(out))) == {"key", "size", "sha256"}


def test_a_party_with_keys_signs_what_it_announces(fedml_home, monkeypatch) -> None:
    """The server's announcement to worker 1 carries the MAC worker 1 checks (receiver 1, sender 0)."""
    from fedml.core.distributed.communication.message import Message

    bucket = _Bucket()
    server = _server(monkeypatch, bucket)
    out = Message(1, 0, 1)
    out.add_params(MODEL_PARAMS, {"w": torch.zeros(2)})
    ann = json.loads(server._payload(out))
    assert ann["mac"] == mqtt_transport.announcement_mac(worker_key(MASTER, 1), RUN, 0, 1, ann["key"], ann["size"],
                                                         ann["sha256"])
    assert bucket.calls == [("put", ann["key"])] and ann["size"] == len(bucket.objects[ann["key"]])


def test_a_rejection_is_one_log_line(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="fedml_prism")
    mqtt_transport._reject("t", mqtt_transport.Rejected("first\n[fedml_prism] forged line\r\x1b[2K"))
    mqtt_transport._reject("t", KeyError("a\nb"))
    messages = [r.getMessage() for r in caplog.records]
    assert all("\n" not in m and "\r" not in m and "\x1b" not in m for m in messages)
    assert messages[0] == "rejected an MQTT_S3 message on t: first\\n[fedml_prism] forged line\\r\\x1b[2K"
