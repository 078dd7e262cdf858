"""Calls that never deliver their message (issue 18, item 2).

A peer that opens ``sendMessage`` calls and never sends their request message costs a gRPC listener
nothing it needs for honest calls: in a real multi-process job, 50 such calls held on the server's port
and 50 on worker 1's port (each reopened as soon as it ends) neither delay an honest call nor stop the
job; and the listener cuts every such call at its receive deadline instead of leaving it open.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import grpc
import pytest
from runtime_utils import (
    BIN,
    OWN_CONNECTION,
    IdleCalls,
    assert_prism_ran,
    free_ports,
    grpc_config,
    run,
    start_grpc_server,
    start_grpc_workers,
    stop,
    wait_for,
)

from fedml_prism.runtimes._fedml_import import silence_fedml_import_warnings
from fedml_prism.runtimes.cross_silo import grpc_transport
from fedml_prism.runtimes.cross_silo.grpc_transport import CALLS_PER_PEER, SEND_TIMEOUT_S, PrismGrpcCommManager, read_ipconfig
from fedml_prism.runtimes.security import SecuritySettings
from fedml_prism.runtimes.wire import FrameCodec

silence_fedml_import_warnings()
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2 as pb  # noqa: E402
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2_grpc as pb_grpc  # noqa: E402

pytestmark = pytest.mark.timeout(240)

IDLE_CALLS = 50
MAX_MB = 1


def probe(target: str) -> float:
    """Seconds until ``target`` answers a call carrying a (bogus) frame; raises ``grpc.RpcError`` after 5 s."""
    channel = grpc.insecure_channel(target, options=OWN_CONNECTION)
    started = time.monotonic()
    try:
        pb_grpc.gRPCCommManagerStub(channel).sendMessage(pb.CommRequest(client_id=1, message=b"probe"), timeout=5)
        return time.monotonic() - started
    finally:
        channel.close()


def test_idle_calls_neither_delay_honest_calls_nor_stop_the_job(tmp_path: Path) -> None:
    run([str(BIN / "fedml-prism"), "keys", "--out", str(tmp_path / "keys"), "--workers", "2"], tmp_path, "keys.log",
        timeout=60)
    cfg = grpc_config(tmp_path, workers=2, train_args={"client_num_per_round": 6},
                      security_args={"auth_key_file": "keys/party{rank}.key", "require_auth": True,
                                     "max_message_mb": MAX_MB})
    table = read_ipconfig(str(tmp_path / "grpc_ipconfig.csv"))
    out = tmp_path / "out"
    procs, holders = [], []
    try:
        server = start_grpc_server(cfg, out, tmp_path)
        procs.append(server)
        wait_for(lambda: "gRPC listening" in (tmp_path / "server.log").read_text() or server.poll() is not None,
                 timeout=30, what="the server's listener")
        holders.append(IdleCalls(table[0].target, IDLE_CALLS))
        assert probe(table[0].target) < 3.0  # answered at once while 50 calls wait for their message
        workers = start_grpc_workers(cfg, out, tmp_path, 2)
        procs += workers
        started = time.monotonic()
        wait_for(lambda: "gRPC listening" in (tmp_path / "client1.log").read_text() or workers[0].poll() is not None,
                 timeout=60, what="worker 1's listener")
        holders.append(IdleCalls(table[1].target, IDLE_CALLS))
        assert probe(table[1].target) < 3.0
        assert server.wait(timeout=120) == 0, (tmp_path / "server.log").read_text()[-4000:]
        # every honest send went through at once: one that waited for a free listener would take SEND_TIMEOUT_S
        assert time.monotonic() - started < SEND_TIMEOUT_S
        for rank, w in enumerate(workers, start=1):
            assert w.wait(timeout=30) == 0, (tmp_path / f"client{rank}.log").read_text()[-4000:]
    finally:
        for h in holders:
            h.close()
        for p in procs:
            stop(p)
    assert_prism_ran(out, rounds=2, clients=6)
    for name in ("server.log", "client1.log", "client2.log"):
        text = (tmp_path / name).read_text()
        assert "Traceback" not in text and "retrying in" not in text and "failed sends" not in text, \
            f"{name}:\n{text[-3000:]}"


def test_a_call_without_its_message_is_cut_at_the_receive_deadline(tmp_path: Path, monkeypatch, caplog) -> None:
    """In one process, with a receive deadline of about 1 s: idle calls on connections of their own and on
    one shared connection are all cut with DEADLINE_EXCEEDED, and a connection holds at most
    CALLS_PER_PEER calls at once."""
    monkeypatch.setattr(grpc_transport, "RECEIVE_TIMEOUT_S", 1.0)
    ports = free_ports(2)
    csv = tmp_path / "ip.csv"
    csv.write_text("eid,rank,grpc_server_ip,grpc_server_port\n" + "".join(f"{r},{r},127.0.0.1,{p}\n"
                                                                          for r, p in enumerate(ports)))
    args = argparse.Namespace(prism_grpc_addresses=read_ipconfig(str(csv)), run_id="t")
    security = SecuritySettings(max_message_mb=0.01)
    limit = grpc_transport.receive_timeout_s(security.max_bytes)
    codec = FrameCodec("t", 0, {1}, security.keyring(0), security.max_bytes)
    listener = PrismGrpcCommManager(args, 0, 1, codec, security)
    target = f"127.0.0.1:{ports[0]}"
    try:
        with caplog.at_level("WARNING", logger="fedml_prism"):
            apart = IdleCalls(target, 6, reopen=False)
            shared = IdleCalls(target, 2 * CALLS_PER_PEER, reopen=False, shared=True)
            wait_for(lambda: len(apart.ended) == 6 and len(shared.ended) == 2 * CALLS_PER_PEER, timeout=4 * limit + 10,
                     what="the idle calls to be cut")
    finally:
        listener.stop_receive_message()
    for code, seconds in apart.ended:
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and limit - 0.2 <= seconds <= limit + 2, apart.ended
    # the shared connection: at most CALLS_PER_PEER calls held at once; the others waited for a slot or were
    # refused by the connection's stream limit (UNAVAILABLE), and none stayed open past the second deadline
    held = [seconds for code, seconds in shared.ended if code == grpc.StatusCode.DEADLINE_EXCEEDED]
    refused = [code for code, _ in shared.ended if code != grpc.StatusCode.DEADLINE_EXCEEDED]
    assert set(refused) <= {grpc.StatusCode.UNAVAILABLE}, shared.ended
    assert sum(seconds < 1.5 * limit for seconds in held) <= CALLS_PER_PEER, shared.ended
    assert max(seconds for _, seconds in shared.ended) <= 2 * limit + 2, shared.ended
    cuts = [r.getMessage() for r in caplog.records if "cut a gRPC call" in r.getMessage()]
    assert len(cuts) == 6 + len(held) and all(f"no request message within {limit:.0f} s" in c for c in cuts)
