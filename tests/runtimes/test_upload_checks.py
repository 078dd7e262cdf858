"""The cross-silo server's checks on what a worker sends, one at a time (issue 23, item 3):

- ``PrismServerManager._upload_problem`` refuses an upload stamped with the previous round even when it is
  otherwise valid: this round's clients of that very worker (the worker-binding check accepts it), the
  server's session, a known sender. Its reason is the round;
- ``PrismMqttS3CommManager`` takes an S3 announcement only for a key ``fedml_<run>_<topic sender>_<32 hex>``;
  any other key is refused with that reason before the bucket is touched.

Both classes subclass FedML's, so this module imports FedML (in a temporary HOME and working folder); the
managers are built without a network: the server manager without FedML's constructor, the MQTT manager
with its broker connection and S3 client replaced."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from runtime_utils import mqtt_args
from torch.utils.data import TensorDataset

from fedml_prism import PrismConfig
from fedml_prism.engine.server import PrismClient, PrismServer, RunSettings
from fedml_prism.runtimes.security import KeyRing, worker_key
from fedml_prism.runtimes.wire import MODEL_PARAMS, FrameCodec
from fedml_prism.workloads.models import cnn

WORKERS = 3
MASTER = bytes(range(32))
MAX_BYTES = 1 << 24


@pytest.fixture
def fedml_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """FedML imported (if not yet) with HOME and the working folder in a temporary folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------ the server manager's round check
def _codecs(server: PrismServer) -> tuple[FrameCodec, dict[int, FrameCodec]]:
    """The server's codec (stamps its round and session) and each worker's (echoes them), authenticated."""
    server_codec = FrameCodec("run", 0, range(1, WORKERS + 1), KeyRing(0, MASTER), MAX_BYTES,
                              round_of=lambda: server.round_idx)
    workers = {w: FrameCodec("run", w, [0], KeyRing(w, worker_key(MASTER, w)), MAX_BYTES) for w in range(1, WORKERS + 1)}
    return server_codec, workers


def _to_worker(server_codec: FrameCodec, worker: FrameCodec, bundle: dict[str, torch.Tensor]) -> None:
    """The server's bundle over the wire: the worker learns the round and session it must echo."""
    from fedml.core.distributed.communication.message import Message
    from fedml.cross_silo.server.message_define import MyMessage

    msg = Message(MyMessage.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, 0, worker.rank)
    msg.add_params(MODEL_PARAMS, bundle)
    worker.decode(server_codec.encode(msg), transport_sender=0)


def _upload(server_codec: FrameCodec, worker: FrameCodec, bundle: dict[str, torch.Tensor]) -> Any:
    """A worker's upload as the server's transport delivers it (round and session from the frame)."""
    from fedml.core.distributed.communication.message import Message
    from fedml.cross_silo.server.message_define import MyMessage

    msg = Message(MyMessage.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, worker.rank, 0)
    msg.add_params(MODEL_PARAMS, bundle)
    msg.add_params(MyMessage.MSG_ARG_KEY_NUM_SAMPLES, 8)
    return server_codec.decode(worker.encode(msg), transport_sender=worker.rank)


def test_an_upload_of_this_rounds_clients_stamped_with_the_previous_round_is_refused(fedml_home, tmp_path) -> None:
    from fedml_prism.runtimes.cross_silo.server_manager import PrismServerManager
    from fedml_prism.runtimes.fedml_glue import PrismServerAggregator

    torch.manual_seed(0)
    model = cnn(num_classes=3, in_channels=1, image_size=8, width=0.5)
    cfg = PrismConfig(keep_ratio=0.5, seed=0)
    settings = RunSettings(comm_round=3, client_num_in_total=WORKERS, client_num_per_round=WORKERS, batch_size=4,
                           output_dir=str(tmp_path / "out"))
    data = {c: TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for c in range(WORKERS)}
    server, client = PrismServer(model, cfg, settings), PrismClient(model, cfg, settings, data)
    agg = PrismServerAggregator(server.pm.dense_model(), SimpleNamespace(), server, workers=WORKERS)
    server_codec, codecs = _codecs(server)
    manager = PrismServerManager.__new__(PrismServerManager)  # no FedML constructor: no transport, no threads
    manager.client_real_ids = list(codecs)
    manager.com_manager = SimpleNamespace(codec=server_codec)
    flags = dict.fromkeys(range(WORKERS), False)  # FedML's record of this round's uploads, by worker index
    manager.aggregator = SimpleNamespace(aggregator=agg, flag_client_model_uploaded_dict=flags)  # PriSM's: .aggregator

    first = agg.get_model_params()  # round 1
    for index, worker in enumerate(codecs.values()):
        _to_worker(server_codec, worker, first[index])
    uploads = [(8, client.train_bundle(first[index])) for index in range(WORKERS)]
    second = agg.aggregate(uploads)  # round 1 closes; round 2's bundles, the same clients (all train each round)
    assert server.round_idx == 1
    index, worker = 0, codecs[1]
    trained = client.train_bundle(second[index])  # this round's clients of this worker, trained this round

    stale = _upload(server_codec, worker, trained)  # the worker has not seen round 2's message: it echoes round 1
    assert stale.get(MODEL_PARAMS).keys() == trained.keys()
    assert agg.bundle_problem(index, stale.get(MODEL_PARAMS)) is None  # the worker-binding check accepts it
    assert manager._upload_problem(stale) == "it is for round 1, not round 2 (stale or replayed)"

    _to_worker(server_codec, worker, second[index])
    assert manager._upload_problem(_upload(server_codec, worker, trained)) is None  # the same bundle, this round
    flags[index] = True  # FedML took it; the worker's retried send (a new frame, new seq) arrives as well
    assert manager._upload_problem(_upload(server_codec, worker, trained)) == (
        "a second upload for this round (a retried send whose first try arrived): the first is kept")


# ------------------------------------------------------------------ the MQTT_S3 key pattern
class _Bucket:
    """An in-memory S3 bucket that records every call."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.calls: list[tuple[str, str]] = []

    def head_object(self, Bucket: str, Key: str) -> dict[str, int]:  # noqa: N803 - boto3's keywords
        self.calls.append(("head", Key))
        return {"ContentLength": len(self.objects[Key])}

    def get_object(self, Bucket: str, Key: str) -> dict[str, io.BytesIO]:  # noqa: N803
        self.calls.append(("get", Key))
        return {"Body": io.BytesIO(self.objects[Key])}

    def delete_object(self, Bucket: str, Key: str) -> None:  # noqa: N803
        self.calls.append(("delete", Key))
        self.objects.pop(Key, None)


def _mqtt_server(monkeypatch: pytest.MonkeyPatch, bucket: _Bucket) -> Any:
    """The server's MQTT_S3 manager of run ``run7`` with workers 1 and 2, no broker, ``bucket`` as S3."""
    from fedml_prism.runtimes.cross_silo import mqtt_transport
    from fedml_prism.runtimes.security import SecuritySettings

    monkeypatch.setattr(mqtt_transport, "connect", lambda client, broker, connack: None)
    monkeypatch.setattr(mqtt_transport.S3Settings, "client", lambda self: bucket)
    args = mqtt_args("run7", {"BROKER_HOST": "localhost"}, {"BUCKET_NAME": "prism"})
    codec = FrameCodec("run7", 0, [1, 2], KeyRing(0, None), MAX_BYTES)
    return mqtt_transport.PrismMqttS3CommManager(args, 0, 3, codec, SecuritySettings())


def _frame_from_worker_1(session: str = "") -> bytes:
    """An upload frame of worker 1 (authentication off), in the server ``session`` it heard from."""
    from fedml.core.distributed.communication.message import Message
    from fedml.cross_silo.server.message_define import MyMessage

    msg = Message(MyMessage.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, 1, 0)
    msg.add_params(MODEL_PARAMS, {"c0/w": torch.ones(3)})
    worker = FrameCodec("run7", 1, [0], KeyRing(1, None), MAX_BYTES)
    worker.session = session
    return worker.encode(msg)


def _announce(key: Any, frame: bytes) -> SimpleNamespace:
    """Worker 1's MQTT message announcing ``frame`` under ``key``."""
    body = json.dumps({"key": key, "size": len(frame), "sha256": hashlib.sha256(frame).hexdigest()}).encode()
    return SimpleNamespace(topic="fedml_run7_1", retain=False, payload=body)


HEX = uuid.UUID(int=0xABC).hex


@pytest.mark.parametrize("key", [
    f"fedml_run7_2_{HEX}",               # another worker's object
    f"fedml_run7_0_{HEX}",               # the server's own object
    f"fedml_run8_1_{HEX}",               # another run's
    f"fedml_run7_1_{HEX}.pkl",           # a valid key with a suffix
    f"x/fedml_run7_1_{HEX}",             # a path
    f"../fedml_run7_1_{HEX}",
    f"fedml_run7_1_{HEX[:-1]}",          # 31 hex digits
    f"fedml_run7_1_{HEX}0",              # 33
    f"fedml_run7_1_{HEX.upper()}",       # not lowercase
    f"fedml_run7_1{HEX}",                # no separator
    7,                                   # not a string
])
def test_an_s3_key_outside_the_senders_pattern_is_refused_before_the_bucket_is_read(
    fedml_home, monkeypatch, key: Any,
) -> None:
    from fedml_prism.runtimes.cross_silo.mqtt_transport import Rejected

    bucket = _Bucket()
    manager = _mqtt_server(monkeypatch, bucket)
    frame = _frame_from_worker_1()
    if isinstance(key, str):
        bucket.objects[key] = frame  # the object is there: only the key's form may refuse it
    with pytest.raises(Rejected) as refused:
        manager._receive("fedml_run7_1", _announce(key, frame))
    assert str(refused.value).startswith(f"S3 key {key!r:.100} is not one sender 1 may use")
    assert str(refused.value).endswith("(allowed fedml_run7_1_<32 hex digits>)")
    assert bucket.calls == []


def test_an_s3_key_of_the_senders_pattern_is_read_and_deleted(fedml_home, monkeypatch) -> None:
    bucket = _Bucket()
    manager = _mqtt_server(monkeypatch, bucket)
    frame, key = _frame_from_worker_1(manager.codec.session), f"fedml_run7_1_{HEX}"
    bucket.objects[key] = frame
    message = manager._receive("fedml_run7_1", _announce(key, frame))
    assert torch.equal(message.get(MODEL_PARAMS)["c0/w"], torch.ones(3))
    assert bucket.calls == [("head", key), ("get", key), ("delete", key)]
