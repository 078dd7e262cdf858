"""The safe wire format (fedml_prism.runtimes.wire), keys and security settings (fedml_prism.runtimes.security), and the
checks of uploads that the server manager and the aggregator make before the engine sees them."""

from __future__ import annotations

import io
import logging
import os
from collections import OrderedDict

import pytest
import torch
from hostile_utils import header_of, marker_pickle, reframe

from fedml_prism.runtimes._fedml_import import silence_fedml_import_warnings
from fedml_prism.runtimes.security import KEY_ENV, KeyRing, SecuritySettings, read_key, scrub, scrub_logs, worker_key, write_keys
from fedml_prism.runtimes.wire import FrameCodec, WireError, tensors_to_bytes

silence_fedml_import_warnings()
from fedml.core.distributed.communication.message import Message  # noqa: E402  (after the warnings filter)

MASTER = bytes(range(32))


def codecs(max_bytes: int = 1 << 20, auth: bool = True) -> tuple[FrameCodec, FrameCodec, FrameCodec]:
    ring = (lambda r: KeyRing(r, MASTER if r == 0 else worker_key(MASTER, r))) if auth else (lambda r: KeyRing(r))
    server = FrameCodec("run7", 0, {1, 2}, ring(0), max_bytes, round_of=lambda: 4)
    workers = FrameCodec("run7", 1, {0}, ring(1), max_bytes), FrameCodec("run7", 2, {0}, ring(2), max_bytes)
    for w in workers:  # each worker hears from the server first, as in a job: its frames carry the server's session
        w.decode(server.encode(Message(6, 0, w.rank)), transport_sender=0)
    return server, *workers


def bundle_msg(sender: int, receiver: int, **extra) -> Message:
    msg = Message("3", sender, receiver)
    msg.add_params("model_params", OrderedDict([("c1/w", torch.randn(3, 4)), ("c1/idx", torch.arange(3)),
                                                ("c1/h", torch.ones(2, dtype=torch.float16))]))
    msg.add_params("num_samples", 12)
    for k, v in extra.items():
        msg.add_params(k, v)
    return msg


def test_round_trip_keeps_tensors_exactly_and_stamps_round_and_session() -> None:
    server, w1, _ = codecs()
    sent = bundle_msg(0, 1, client_idx="0")
    got = w1.decode(server.encode(sent), transport_sender=0)
    assert got.get_type() == 3 and got.get_sender_id() == 0 and got.get_receiver_id() == 1
    assert got.get("client_idx") == "0" and got.get("num_samples") == 12
    for k, t in sent.get("model_params").items():
        assert torch.equal(got.get("model_params")[k], t) and got.get("model_params")[k].dtype == t.dtype
    assert got.get("prism::wire_round") == 4 and got.get("prism::wire_session") == server.session != ""
    # the worker echoes the server's round and session in its upload
    up = server.decode(w1.encode(bundle_msg(1, 0)), transport_sender=1)
    assert up.get("prism::wire_round") == 4 and up.get("prism::wire_session") == server.session


def test_a_pickle_is_never_loaded(tmp_path) -> None:
    server, _, _ = codecs()
    marker = tmp_path / "marker"
    with pytest.raises(WireError, match="not a PriSM frame"):
        server.decode(marker_pickle(marker), transport_sender=1)
    assert not marker.exists()
    # and the same pickle hidden after a valid-looking header, as the tensor blob
    # (correctly signed, with the right digest: only the safetensors parser stands in the way)
    with pytest.raises(WireError, match="not valid safetensors"):
        head = {"sender": 1, "tensors": True, "run": "run7", "seq": 5, "session": server.session}
        server.decode(_with_blob(head, marker_pickle(marker)), transport_sender=1)
    assert not marker.exists()


@pytest.mark.parametrize("change,reason", [
    ({"sender": 2}, "bad message authentication code"),              # worker 1 signs as worker 2
    ({"round": 3}, "bad message authentication code"),               # an older round, MAC not redone
    ({"run": "other"}, "frame of run"),
    ({"receiver": 2}, "frame for receiver 2"),
    ({"sender": 9}, "unknown sender 9"),
    ({"seq": "1"}, "field 'seq'"),
    ({"params": [1]}, "field 'params'"),
    ({"mac": ""}, "bad message authentication code"),
])
def test_forged_headers_are_rejected(change, reason) -> None:
    server, w1, _ = codecs()
    data = w1.encode(bundle_msg(1, 0))
    with pytest.raises(WireError, match=reason):
        server.decode(reframe(data, **change), transport_sender=change.get("sender", 1))


def test_a_worker_cannot_sign_for_another_worker() -> None:
    server, w1, w2 = codecs()
    own_key = worker_key(MASTER, 2)
    forged = reframe(w2.encode(bundle_msg(2, 0)), key=own_key, sender=1)  # worker 2's key, sender 1
    with pytest.raises(WireError, match="bad message authentication code"):
        server.decode(forged, transport_sender=1)
    with pytest.raises(WireError, match="spoofed sender"):
        server.decode(w2.encode(bundle_msg(2, 0)), transport_sender=1)


def test_replayed_frame_and_tampered_blob_are_rejected() -> None:
    server, w1, _ = codecs()
    data = w1.encode(bundle_msg(1, 0))
    server.decode(data, transport_sender=1)
    with pytest.raises(WireError, match="replayed frame"):
        server.decode(data, transport_sender=1)
    fresh = w1.encode(bundle_msg(1, 0))
    with pytest.raises(WireError, match="digest"):
        server.decode(fresh[:-2] + b"\x00\x01", transport_sender=1)


def test_size_caps_and_bad_blobs() -> None:
    server, w1, _ = codecs(max_bytes=4096)
    big = Message("3", 1, 0)
    big.add_params("model_params", {"w": torch.zeros(4096)})
    with pytest.raises(WireError, match="exceeds max_message_mb"):
        w1.encode(big)
    with pytest.raises(WireError, match="exceeds max_message_mb"):
        server.decode(b"PRSM\x01" + b"\x00" * 5000, transport_sender=1)
    # a safetensors header claiming a dtype that does not exist (the closest a frame gets to a meta tensor)
    bogus = b'{"w":{"dtype":"META","shape":[2],"data_offsets":[0,8]}}'
    blob = len(bogus).to_bytes(8, "little") + bogus + b"\x00" * 8
    head = {"sender": 1, "tensors": True, "run": "run7", "seq": 10**18, "session": server.session}
    with pytest.raises(WireError, match="not valid safetensors"):
        server.decode(_with_blob(head, blob), transport_sender=1)


def _with_blob(header: dict, blob: bytes) -> bytes:
    import hashlib
    import hmac
    import json
    import struct

    from fedml_prism.runtimes.wire import _canonical

    h = {"session": "", "round": 0, "receiver": 0, "type": "3", "params": {}, **header,
         "digest": hashlib.sha256(blob).hexdigest()}
    h["mac"] = hmac.new(worker_key(MASTER, header["sender"]), _canonical(h), hashlib.sha256).hexdigest()
    head = json.dumps(h).encode()
    return b"PRSM\x01" + struct.pack(">I", len(head)) + head + blob


def test_only_json_values_and_dense_tensors_can_be_sent() -> None:
    _, w1, _ = codecs()
    msg = Message("3", 1, 0)
    msg.add_params("callback", object())
    with pytest.raises(WireError, match="'callback'"):
        w1.encode(msg)
    msg = Message("3", 1, 0)
    msg.add_params("loss", float("nan"))
    with pytest.raises(WireError, match="'loss'"):
        w1.encode(msg)
    with pytest.raises(WireError, match="dense tensors"):
        tensors_to_bytes({"m": torch.empty(3, device="meta")})
    with pytest.raises(WireError, match="dense tensors"):
        tensors_to_bytes({"s": torch.eye(3).to_sparse()})


def test_without_keys_frames_are_still_checked_but_unsigned() -> None:
    server, w1, _ = codecs(auth=False)
    data = w1.encode(bundle_msg(1, 0))
    assert header_of(data)["mac"] == ""
    assert server.decode(data, transport_sender=1).get("num_samples") == 12
    with pytest.raises(WireError, match="replayed"):
        server.decode(data, transport_sender=1)


def test_keys_files_settings_and_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    paths = write_keys(str(tmp_path / "keys"), workers=2)
    assert [os.path.basename(p) for p in paths] == ["party0.key", "party1.key", "party2.key"]
    assert all(os.stat(p).st_mode & 0o777 == 0o600 for p in paths)
    master, k2 = read_key(paths[0]), read_key(paths[2])
    assert k2 == worker_key(master, 2) != worker_key(master, 1)
    flat = {"auth_key_file": "keys/party{rank}.key", "max_message_mb": 8}
    s2 = SecuritySettings.from_flat(flat, str(tmp_path), rank=2)
    assert s2.auth_key == k2 and s2.max_bytes == 8 << 20 and not s2.tls
    assert "auth_key" not in repr(s2)  # keys stay out of reprs (and so out of FedML's args logging)
    monkeypatch.setenv(KEY_ENV, "ab" * 16)
    assert SecuritySettings.from_flat(flat, str(tmp_path), rank=2).auth_key == bytes.fromhex("ab" * 16)
    monkeypatch.delenv(KEY_ENV)
    bad = [({"auth_key_file": "nope.key"}, "auth_key_file='nope.key' is invalid"),
           ({"require_auth": True}, "require_auth=true but no key"),
           ({"require_auth": "yes"}, "require_auth='yes' is invalid"),
           ({"max_message_mb": 0}, "max_message_mb=0 is invalid"),
           ({"tls_cert": "keys/party0.key"}, "tls_cert and tls_key"),
           ({"tls_cert": "keys/party0.key", "tls_key": "keys/party1.key"}, "TLS needs all three")]
    for values, message in bad:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
            SecuritySettings.from_flat(values, str(tmp_path), rank=0)
    (tmp_path / "bad.key").write_text("not hex")
    with pytest.raises(ValueError, match="hex digits"):
        read_key(str(tmp_path / "bad.key"))


def test_credentials_are_scrubbed_from_every_logger() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    other = logging.getLogger("fedml.some.module")
    other.addHandler(handler)
    other.setLevel(logging.INFO)
    try:
        scrub_logs(["s3cr3t-pwd", b"\x01\x02\x03\x04"])
        other.info("args: %s", {"MQTT_PWD": "s3cr3t-pwd", "key": "01020304", "n": 1})
        logging.getLogger("fedml_prism").warning("pwd=%s", "s3cr3t-pwd")
    finally:
        other.removeHandler(handler)
    text = stream.getvalue()
    assert "s3cr3t-pwd" not in text and "01020304" not in text
    assert "'MQTT_PWD': '***'" in text and "'n': 1" in text
    assert scrub("x s3cr3t-pwd y") == "x *** y"


def test_security_args_are_checked_when_the_job_is_read(tmp_path) -> None:
    from fedml_prism.job import job_from_sections

    cross_silo = {"common_args": {"training_type": "cross_silo"}, "comm_args": {"backend": "MPI", "worker_num": 1},
                  "train_args": {"client_num_in_total": 2, "client_num_per_round": 2}}
    with pytest.raises(ValueError, match=r"security_args has unknown key\(s\) \['tls'\]"):
        job_from_sections({**cross_silo, "security_args": {"tls": True}}, str(tmp_path / "c.yaml"))
    with pytest.raises(ValueError, match="auth_key_file='missing.key' is invalid"):
        job_from_sections({**cross_silo, "security_args": {"auth_key_file": "missing.key"}}, str(tmp_path / "c.yaml"))
