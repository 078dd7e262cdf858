"""Issue 18 at the codec: the decoder raises only ``WireError`` for any byte string (named cases and a seeded
mutator over valid frames), non-finite and unbounded numbers are refused, message types are plain tokens (no
forged log lines), frames of FedML's local-only type never come from a peer, and a worker's frames are bound to
the session of the server process they talk to (a frame recorded before a server restart is refused after it)."""

from __future__ import annotations

import json
import random
import struct
from collections import OrderedDict

import pytest
import torch
from hostile_utils import frame, header_of, reframe

from fedml_prism.runtimes._fedml_import import silence_fedml_import_warnings
from fedml_prism.runtimes.security import KeyRing, worker_key
from fedml_prism.runtimes.wire import MAGIC, VERSION, FrameCodec, WireError

silence_fedml_import_warnings()
from fedml.core.distributed.communication.message import Message  # noqa: E402  (after the warnings filter)

MASTER = bytes(range(32))
K1 = worker_key(MASTER, 1)


def server_codec(auth: bool = True, run: str = "t") -> FrameCodec:
    return FrameCodec(run, 0, {1, 2}, KeyRing(0, MASTER if auth else None), 1 << 20, round_of=lambda: 0)


def worker_codec(auth: bool = True, run: str = "t") -> FrameCodec:
    return FrameCodec(run, 1, {0}, KeyRing(1, K1 if auth else None), 1 << 20)


def raw(header: dict, blob: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode() if isinstance(header, dict) else header
    return MAGIC + bytes([VERSION]) + struct.pack(">I", len(head)) + head + blob


def signed(server: FrameCodec, **header) -> bytes:
    """A frame worker 1 signs with its own key, in ``server``'s session unless ``header`` says otherwise."""
    return frame({"session": server.session, **header}, key=K1)


# ------------------------------------------------------------------------------ named cases
def test_deep_json_nesting_is_a_wire_error() -> None:
    server = server_codec(auth=False)
    deep = b'{"run":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(WireError, match="frame header"):
        server.decode(raw(deep), transport_sender=1)
    params = {"a": json.loads("[" * 50 + "]" * 50)}  # nesting in the parameters is capped as well
    with pytest.raises(WireError, match="nested"):
        server.decode(frame({"session": server.session, "params": params}), transport_sender=1)


@pytest.mark.parametrize("dtype,shape", [("F8_E8M0", [8]), ("F4", [16])])
def test_unknown_safetensors_dtype_is_a_wire_error(dtype, shape) -> None:
    """The safetensors parser knows dtypes its torch side does not map (a KeyError escaped before)."""
    server = server_codec(auth=False)
    head = json.dumps({"w": {"dtype": dtype, "shape": shape, "data_offsets": [0, 8]}}).encode()
    blob = struct.pack("<Q", len(head)) + head + bytes(8)
    with pytest.raises(WireError, match="not valid safetensors"):
        server.decode(_with_blob(server, blob), transport_sender=1)


def _with_blob(server: FrameCodec, blob: bytes) -> bytes:
    import hashlib

    h = {"run": "t", "session": server.session, "seq": 5, "round": 0, "sender": 1, "receiver": 0, "type": "3",
         "params": {}, "tensors": True, "digest": hashlib.sha256(blob).hexdigest(), "mac": ""}
    return raw(h, blob)


def test_non_ascii_or_malformed_mac_is_a_wire_error() -> None:
    server = server_codec()
    good = signed(server)
    for mac in ("é" * 64, "zz", "0" * 63, "A" * 64):
        with pytest.raises(WireError, match="authentication code"):
            server.decode(reframe(good, mac=mac), transport_sender=1)


@pytest.mark.parametrize("text", ["1e400", "-1e400", "1E309"])
def test_non_finite_numbers_are_refused_without_a_key(text) -> None:
    server = server_codec(auth=False)
    h = header_of(frame({"session": server.session}))
    head = json.dumps(h, separators=(",", ":")).replace('"params":{}', '"params":{"x":' + text + "}")
    with pytest.raises(WireError, match="not finite"):
        server.decode(raw(head.encode()), transport_sender=1)


@pytest.mark.parametrize("field,value", [("seq", int("1" + "0" * 4000)), ("seq", 2**63), ("seq", -5), ("round", 2**40),
                                         ("round", -2)], ids=["seq_4001_digits", "seq_2_63", "seq_neg", "round_2_40",
                                                              "round_neg"])
def test_header_integers_are_bounded(field, value) -> None:
    server = server_codec()
    with pytest.raises(WireError, match=f"{field!r}|out of range"):
        server.decode(signed(server, **{field: value}), transport_sender=1)


def test_a_huge_seq_cannot_lock_a_worker_out() -> None:
    """Without a key anyone may send as worker 1; a seq of 4001 digits was accepted and every later honest frame
    of that worker counted as replayed. Now it is refused, and worker 1's next honest frame gets through."""
    server, w1 = server_codec(auth=False), worker_codec(auth=False)
    with pytest.raises(WireError):
        server.decode(frame({"session": server.session, "seq": int("1" + "0" * 4000)}), transport_sender=1)
    w1.decode(server.encode(Message(6, 0, 1)), transport_sender=0)  # the worker learns the session
    assert server.decode(w1.encode(Message(5, 1, 0)), transport_sender=1).get_type() == 5


@pytest.mark.parametrize("msg_type", ["3\nINFO forged line", "x" * 65, "", "a b", "\x1b[2J"])
def test_message_types_are_plain_tokens(msg_type) -> None:
    server = server_codec()
    with pytest.raises(WireError, match="message type"):
        server.decode(signed(server, type=msg_type), transport_sender=1)


@pytest.mark.parametrize("msg_type", ["0", "00", "-0"])
def test_connection_ready_is_local_only(msg_type) -> None:
    """FedML's type 0 (CONNECTION_IS_READY) is what a party's own transport tells its manager; from a peer, even
    signed with its own key, it is refused (it re-armed the server's start deadline, cancelling the round's)."""
    server, w1 = server_codec(), worker_codec()
    with pytest.raises(WireError, match="local"):
        server.decode(signed(server, type=msg_type), transport_sender=1)
    with pytest.raises(WireError, match="local"):
        w1.decode(server.encode(Message(0, 0, 1)), transport_sender=0)


# ------------------------------------------------------------------------------ sessions across a restart
def test_frames_recorded_before_a_server_restart_are_refused_after_it() -> None:
    old_server, w1 = server_codec(), worker_codec()
    hello = w1.encode(Message(5, 1, 0))  # the worker's first ONLINE: it has not heard from any server yet
    assert header_of(hello)["session"] == ""
    w1.decode(old_server.encode(Message(6, 0, 1)), transport_sender=0)
    online = w1.encode(Message(5, 1, 0))
    upload = w1.encode(_upload(1))
    for data in (online, upload):
        assert old_server.decode(data, transport_sender=1).get("prism::wire_session") == old_server.session

    resumed = server_codec()  # a new server process (resumed from its checkpoint): a new session, no seq memory
    for data in (online, upload):
        with pytest.raises(WireError, match="another server session"):
            resumed.decode(data, transport_sender=1)
    # a recorded hello carries no session: it only makes the server ask that worker again (server_manager)
    assert resumed.decode(hello, transport_sender=1).get("prism::wire_session") == ""
    with pytest.raises(WireError, match="only a status"):  # without a session only a status (hello) is accepted
        resumed.decode(reframe(upload, key=K1, session="", seq=header_of(upload)["seq"] + 10), transport_sender=1)
    # the live worker hears the resumed server and its frames carry the new session
    w1.decode(resumed.encode(Message(6, 0, 1)), transport_sender=0)
    assert resumed.decode(w1.encode(_upload(1)), transport_sender=1).get("prism::wire_session") == resumed.session


def _upload(sender: int) -> Message:
    msg = Message(3, sender, 0)
    msg.add_params("model_params", OrderedDict([("c1/w", torch.ones(2))]))
    msg.add_params("num_samples", 3)
    return msg


# ------------------------------------------------------------------------------ fuzz
def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and buf:  # flip bits
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # overwrite a byte with an interesting value
            buf[rng.randrange(len(buf))] = rng.choice([0, 0xFF, 0x7F, 0x80, ord("["), ord("{"), ord('"'), ord("\\"), ord("9")])
        elif op == 2:  # insert random bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and buf:  # delete a span
            i = rng.randrange(len(buf))
            del buf[i:i + rng.randint(1, 16)]
        elif op == 4:  # truncate
            del buf[rng.randrange(len(buf) + 1):]
        else:  # duplicate a span
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = buf[i:i + rng.randint(1, 32)]
    return bytes(buf)


def _edit_header(rng: random.Random, data: bytes) -> bytes:
    """A structured mutation: one header field replaced by a hostile JSON value, the blob kept."""
    h = header_of(data)
    values = [None, True, -1, 0, 2**64, 1.5, "", "é", "\n", [], {}, [[[]]], {"a": {"b": {}}}, "0" * 300,
              {"model_params": 1}, "1e400"]
    h[rng.choice(sorted(h) + ["extra"])] = rng.choice(values)
    (size,) = struct.unpack(">I", data[5:9])
    return raw(h, data[9 + size:])


def _mutate_blob(rng: random.Random, data: bytes, key: bytes | None) -> bytes:
    """The tensor blob mutated, its digest fixed and the header re-signed (a peer holding its key): only the
    safetensors parser and the checks after it stand in the way."""
    import hashlib

    (size,) = struct.unpack(">I", data[5:9])
    blob = _mutate(rng, data[9 + size:])
    h = header_of(data)
    h["digest"] = hashlib.sha256(blob).hexdigest()
    return reframe(raw(h, blob), key=key)


def _seed_frames(server: FrameCodec, w1: FrameCodec) -> list[bytes]:
    w1.decode(server.encode(Message(6, 0, 1)), transport_sender=0)
    msg = _upload(1)
    msg.add_params("client_idx", "0")
    msg.add_params("nested", {"a": [1, 2.5, "x", None, True]})
    big = Message(3, 1, 0)
    big.add_params("model_params", OrderedDict([("a", torch.randn(3, 2)), ("b", torch.arange(4)),
                                                ("c", torch.ones(2, dtype=torch.bfloat16))]))
    return [w1.encode(msg), w1.encode(Message(5, 1, 0)), w1.encode(big)]


@pytest.mark.parametrize("auth", [False, True])
def test_fuzz_the_decoder_raises_only_wire_errors(auth) -> None:
    server, w1 = server_codec(auth=auth), worker_codec(auth=auth)
    seeds = _seed_frames(server, w1)
    rng = random.Random(18 + auth)
    accepted = 0
    for case in range(6000):
        base = seeds[case % len(seeds)]
        kind = case % 4
        data = (_edit_header(rng, base) if kind == 0 else _mutate_blob(rng, seeds[2], K1 if auth else None)
                if kind == 1 else _mutate(rng, base))
        server._last_seq.clear()  # every case gets its chance past the replay check
        try:
            msg = server.decode(data, transport_sender=1)
        except WireError:
            continue
        except Exception as err:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {case}: {type(err).__name__}: {err!r:.200} for {data[:120]!r}")
        accepted += 1
        plain = {k: v for k, v in msg.get_params().items() if k != "model_params"}
        json.dumps(plain, allow_nan=False)  # what passes carries finite JSON values only
    assert accepted < 6000  # the mutator does reach the checks
