"""A compromised gRPC worker attacks a real cross-silo job (issue 11, item 8).

The job: a server, two honest workers (``fedml-prism run``) and rank 3, a rogue process (this file run as
a script, ``python tests/runtimes/test_hostile_grpc.py rogue ...``) that holds rank 3's own key and listens on rank
3's port with its own minimal gRPC servicer. It comes online like a worker and, on its first bundle,
sends: pickles that would create marker files if ever unpickled, a frame over ``max_message_mb``, a frame
whose safetensors header is bogus (the closest a frame gets to a meta tensor), a frame claiming to come
from worker 1 (signed with its own key), a frame whose ``client_id`` is worker 1's, frames with no MAC
and a wrong MAC, an upload holding a PriSM client another worker trains, and finally a well-formed,
signed upload in which every PriSM client carries one defect of ``hostile_utils.defective_uploads``
(wrong dtype, NaN, a two-element sample count, a huge count, a path-traversal key); it also sends honest
worker 1 a pickle and a frame posing as the server (signed with its own key). On its second bundle
it replays its earlier upload byte for byte and sends a fresh frame stamped with round 1, then goes
silent, so the round deadline closes round 2 and the finish deadline ends the run without it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from runtime_utils import BIN, grpc_config, helpers_env, metrics, run, start, start_grpc, stop

pytestmark = pytest.mark.timeout(300)

RANK = 3  # the rogue's rank; ranks 1 and 2 are honest
MARKER_REL = "prism_grpc_marker_rel"


def test_rogue_grpc_worker_is_rejected_and_the_run_finishes_with_the_honest_workers(tmp_path) -> None:
    run([str(BIN / "fedml-prism"), "keys", "--out", str(tmp_path / "keys"), "--workers", "3"], tmp_path, "keys.log",
        timeout=60)
    cfg = grpc_config(
        tmp_path, workers=3,
        train_args={"client_num_in_total": 20, "client_num_per_round": 15, "comm_round": 2},
        tracking_args={"round_timeout_s": 12},
        security_args={"auth_key_file": "keys/party{rank}.key", "require_auth": True, "max_message_mb": 1},
    )
    out = tmp_path / "out"
    marker = tmp_path / "prism_grpc_marker"
    server, honest = start_grpc(cfg, out, tmp_path, workers=2)  # ranks 1 and 2
    rogue = start([sys.executable, __file__, "rogue", str(cfg), str(tmp_path / "keys" / f"party{RANK}.key"), str(marker)],
                  tmp_path, "rogue.log", extra_env=helpers_env())
    try:
        assert server.wait(timeout=170) == 0, (tmp_path / "server.log").read_text()[-4000:]
        for w in honest:
            assert w.wait(timeout=30) == 0
    finally:
        for p in [server, *honest, rogue]:
            stop(p)
    log = (tmp_path / "server.log").read_text()
    rogue_log = (tmp_path / "rogue.log").read_text()
    attacks = ["pickle", "pickle_relative", "oversized", "bogus_safetensors", "spoofed_sender_signed", "spoofed_client_id",
               "no_mac", "wrong_mac", "foreign_client", "defective_bundle", "worker_pickle", "worker_forged_server",
               "replayed_frame", "stale_round"]
    for name in attacks:  # the server answered every one normally (a gRPC error would end the rogue)
        assert f"rogue: sent {name}" in rogue_log, rogue_log[-3000:]
    defects = dict(line.split("rogue: defect ", 1)[1].split(": ", 1) for line in rogue_log.splitlines()
                   if "rogue: defect " in line)
    assert set(defects) == {"wrong_dtype", "nan", "two_element_count", "huge_count", "traversal_key"}, rogue_log[-3000:]
    reasons = [
        "rejected a gRPC message from",
        "not a PriSM frame (bad magic: a pickle or another protocol)",
        "exceeds max_message_mb (1048576 bytes)",
        "the tensor blob is not valid safetensors",
        "bad message authentication code from sender 1",
        f"sender {RANK} in the frame but 1 on the transport (spoofed sender)",
        f"bad message authentication code from sender {RANK}",
        f"from sender {RANK} already seen (replayed frame)",
        f"rejected an upload from worker {RANK}: it is for round 1, not round 2 (stale or replayed)",
        "which were not sent to this worker",
        "closing the round without them",
        *defects.values(),
    ]
    missing = [r for r in reasons if r not in log]
    assert not missing, f"not in the server log: {missing}\n{log[-4000:]}"
    assert "dropped a message of type" not in log and "Traceback" not in log, log[-4000:]
    worker_log = (tmp_path / "client1.log").read_text()  # the rogue also tried honest worker 1, posing as the server
    for reason in ("not a PriSM frame (bad magic", "bad message authentication code from sender 0"):
        assert reason in worker_log, worker_log[-3000:]
    for place in (tmp_path, out / "fedml", out):  # the absolute marker, and the relative one in any cwd
        assert not (place / marker.name).exists() and not (place / MARKER_REL).exists()
    rows = metrics(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == 10 for r in rows), rows  # the honest workers' 2 x 5 PriSM clients, every round


# ------------------------------------------------------------------------------ the rogue (run as a script)
def forge(data: bytes, key: bytes | None, blob: bytes | None = None, **changes: Any) -> bytes:
    """A copy of frame ``data`` with header fields (and optionally the blob) changed, re-signed with ``key``
    when given (a compromised worker forging with its own key); unsigned otherwise."""
    from fedml_prism.runtimes.wire import MAGIC, VERSION, _canonical

    (size,) = struct.unpack(">I", data[5:9])
    header, old_blob = json.loads(data[9:9 + size]), data[9 + size:]
    if blob is not None:
        header["digest"] = hashlib.sha256(blob).hexdigest()
    header.update(changes)
    if key is not None:
        header["mac"] = hmac.new(key, _canonical(header), hashlib.sha256).hexdigest()
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + bytes([VERSION]) + struct.pack(">I", len(head)) + head + (old_blob if blob is None else blob)


def rogue_main(cfg_path: str, key_path: str, marker: str, lifetime_s: float = 200.0) -> int:
    import queue
    from concurrent import futures

    import grpc
    from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2 as pb
    from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2_grpc as pb_grpc
    from fedml.core.distributed.communication.message import Message
    from hostile_utils import defective_uploads, marker_pickle

    from fedml_prism.engine.server import PrismClient, unpack_bundle
    from fedml_prism.job import build_job, load_data
    from fedml_prism.runtimes.cross_silo.grpc_transport import read_ipconfig
    from fedml_prism.runtimes.security import KeyRing, read_key
    from fedml_prism.runtimes.wire import FrameCodec
    from fedml_prism.workloads.models import create_model

    def say(text: str) -> None:
        print(f"rogue: {text}", flush=True)

    job = build_job(cfg_path)
    table = read_ipconfig(str(Path(cfg_path).parent / job.flat["grpc_ipconfig_path"]))
    key = read_key(key_path)
    codec = FrameCodec("t", RANK, {0}, KeyRing(RANK, key), max_bytes=1 << 30)
    data = load_data(job).fedml_dataset(job.settings.batch_size)
    torch.manual_seed(job.prism.seed)
    model = create_model(job.model, init=job.model_init, **job.model_kwargs)
    trainer = PrismClient(model, job.prism, job.settings, data[5], "cpu")

    inbox: queue.Queue = queue.Queue()

    class Servicer(pb_grpc.gRPCCommManagerServicer):
        def sendMessage(self, request: Any, context: Any) -> Any:  # noqa: N802 - FedML's generated name
            try:
                inbox.put(codec.decode(request.message, transport_sender=request.client_id))
            except Exception as err:  # noqa: BLE001 - the rogue only reports
                say(f"could not decode a frame: {err}")
            return pb.CommResponse()

    big = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=big)
    pb_grpc.add_gRPCCommManagerServicer_to_server(Servicer(), server)
    server.add_insecure_port(table[RANK].bind)
    server.start()
    channel = grpc.insecure_channel(table[0].target, options=big)
    stub = pb_grpc.gRPCCommManagerStub(channel)

    def send(name: str, frame: bytes, client_id: int = RANK, to: Any = stub) -> None:
        to.sendMessage(pb.CommRequest(client_id=client_id, message=frame), timeout=30)  # raises if refused
        say(f"sent {name}")

    def status() -> bytes:
        msg = Message(5, RANK, 0)
        msg.add_params("client_status", "ONLINE")
        msg.add_params("client_os", "Linux")
        return codec.encode(msg)

    def upload(params: dict[str, torch.Tensor]) -> bytes:
        msg = Message(3, RANK, 0)
        msg.add_params("model_params", params)
        msg.add_params("num_samples", 1)
        return codec.encode(msg)

    deadline = time.time() + lifetime_s
    while True:  # come online like a worker (the server may still be binding its port)
        try:
            send("online", status())
            break
        except grpc.RpcError:
            if time.time() > deadline:
                return 3
            time.sleep(0.5)
    bundles, kept = 0, {}
    while time.time() < deadline:
        try:
            msg = inbox.get(timeout=1.0)
        except queue.Empty:
            continue
        kind = str(msg.get_type())
        if kind == "6":
            send("online", status())
        elif kind in ("1", "2"):
            bundles += 1
            if bundles == 1:
                trained = trainer.train_bundle(msg.get("model_params"))
                mine = sorted(unpack_bundle(trained))
                send("pickle", marker_pickle(Path(marker)))
                send("pickle_relative", marker_pickle(Path(MARKER_REL)))
                send("oversized", upload({"w": torch.zeros((1 << 20) // 4 + 4096)}))
                bogus = b'{"w":{"dtype":"META","shape":[2],"data_offsets":[0,8]}}'
                blob = len(bogus).to_bytes(8, "little") + bogus + b"\x00" * 8
                send("bogus_safetensors", forge(upload({"w": torch.zeros(2)}), key, blob=blob))
                send("spoofed_sender_signed", forge(upload(trained), key, sender=1), client_id=1)
                send("spoofed_client_id", upload(trained), client_id=1)
                send("no_mac", forge(upload(trained), None, mac=""))
                send("wrong_mac", forge(upload(trained), None, mac="ab" * 32))
                other = next(c for c in range(job.settings.client_num_in_total) if c not in mine)
                foreign = OrderedDict((k.replace(f"c{mine[0]}/", f"c{other}/", 1), v) for k, v in trained.items())
                send("foreign_client", upload(foreign))
                spoiled: OrderedDict[str, torch.Tensor] = OrderedDict()
                for name, bundle, reason in defective_uploads(trained):
                    spoiled.update(bundle)
                    say(f"defect {name}: {reason}")
                kept["final"] = upload(spoiled)
                kept["trained"] = trained
                send("defective_bundle", kept["final"])
                worker = pb_grpc.gRPCCommManagerStub(grpc.insecure_channel(table[1].target, options=big))
                send("worker_pickle", marker_pickle(Path(marker)), client_id=0, to=worker)
                send("worker_forged_server", forge(upload(trained), key, sender=0, receiver=1, type="2"), client_id=0,
                     to=worker)
            elif bundles == 2:
                send("replayed_frame", kept["final"])
                send("stale_round", forge(upload(kept["trained"]), key, round=0))
                say("silent from now on")
            else:
                say(f"ignores message type {kind}")
    return 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "rogue":
    sys.exit(rogue_main(*sys.argv[2:5]))
