"""gRPC with TLS and checked addresses (fedml_prism.runtimes.cross_silo.grpc_transport, run/make_certs.sh): certificates bind
identities, a party without a certificate of the job's CA is refused before its message is read, a
channel accepts only the certificate of the party it is for (``party<r>``: another party's certificate on
its address gets nothing), and a CSV without a row per party stops the job before it starts."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from runtime_utils import (
    BIN,
    IdleCalls,
    assert_prism_ran,
    env_for,
    free_ports,
    grpc_config,
    run_grpc_job,
    start,
    stop,
    wait_for,
)

from fedml_prism.runtimes._fedml_import import silence_fedml_import_warnings
from fedml_prism.runtimes.cross_silo import grpc_transport
from fedml_prism.runtimes.cross_silo.grpc_transport import CALLS_PER_PEER, PrismGrpcCommManager, check_ipconfig
from fedml_prism.runtimes.security import KeyRing, SecuritySettings, worker_key
from fedml_prism.runtimes.wire import FrameCodec
from fedml_prism.settings.grpc import read_ipconfig

silence_fedml_import_warnings()
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2 as pb  # noqa: E402
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2_grpc as pb_grpc  # noqa: E402
from fedml.core.distributed.communication.message import Message  # noqa: E402

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
MASTER = bytes(range(32))


def make_certs(out: Path, workers: int, tmp: Path, **env: str) -> str:
    proc = subprocess.run(["bash", str(ROOT / "run" / "make_certs.sh"), str(out), str(workers)], cwd=tmp,
                          env={**env_for(tmp), "BIN": str(BIN), **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def write_csv(path: Path, rows: list[tuple[int, str, int, str]]) -> Path:
    path.write_text("eid,rank,grpc_server_ip,grpc_server_port,ingress_ip\n"
                    + "".join(f"{r},{r},{host},{port},{ingress}\n" for r, host, port, ingress in rows))
    return path


def tls(certs: Path, rank: int, mutual: bool = True) -> SecuritySettings:
    d = certs / "tls"
    return SecuritySettings(tls_ca=str(d / "ca.crt"), tls_cert=str(d / f"party{rank}.crt"),
                            tls_key=str(d / f"party{rank}.key"), tls_mutual=mutual)


def codec(rank: int, workers: int = 2) -> FrameCodec:
    ring = KeyRing(rank, MASTER if rank == 0 else worker_key(MASTER, rank))
    return FrameCodec("t", rank, set(range(1, workers + 1)) if rank == 0 else {0}, ring, 1 << 20, round_of=lambda: 0)


def online(rank: int) -> Message:
    msg = Message(5, rank, 0)
    msg.add_params("client_status", "ONLINE")
    return msg


class Inbox:
    """An observer running a manager's loop in a thread: what reaches FedML's handlers."""

    def __init__(self, manager: PrismGrpcCommManager) -> None:
        self.got: list[tuple[Any, int]] = []
        manager.add_observer(self)
        threading.Thread(target=manager.handle_receive_message, daemon=True).start()

    def receive_message(self, msg_type: Any, msg: Any) -> None:
        if msg_type != 0:  # connection ready
            self.got.append((msg_type, msg.get_sender_id()))


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tuple[Path, Path, str]:
    tmp = tmp_path_factory.mktemp("certs")
    text = make_certs(tmp / "job", 2, tmp)
    make_certs(tmp / "other", 2, tmp)  # another CA with the same party names
    return tmp / "job", tmp / "other", text


def test_make_certs_writes_a_ca_certificates_and_keys(certs) -> None:
    job, _, text = certs
    for rank in range(3):
        for path in (job / "tls" / f"party{rank}.key", job / "keys" / f"party{rank}.key"):
            assert os.stat(path).st_mode & 0o777 == 0o600, path
        cert = job / "tls" / f"party{rank}.crt"
        verify = subprocess.run(["openssl", "verify", "-CAfile", str(job / "tls" / "ca.crt"), str(cert)],
                                capture_output=True, text=True)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        info = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-subject", "-ext",
                               "subjectAltName,basicConstraints,keyUsage,extendedKeyUsage"],
                              capture_output=True, text=True).stdout
        lines = [line.strip() for line in info.replace(" = ", "=").splitlines()]
        # one name, the party's (no host or IP: channels check the party), TLS use only, no signing of certificates
        assert f"CN=party{rank}" in lines[0] and lines[lines.index("X509v3 Subject Alternative Name:") + 1] == \
            f"DNS:party{rank}", info
        assert "CA:FALSE" in lines and "Digital Signature" in lines, info
        assert "TLS Web Server Authentication, TLS Web Client Authentication" in lines, info
    ca = subprocess.run(["openssl", "x509", "-in", str(job / "tls" / "ca.crt"), "-noout", "-ext",
                         "basicConstraints,keyUsage,extendedKeyUsage"], capture_output=True, text=True).stdout
    assert "CA:TRUE, pathlen:0" in ca and "Certificate Sign, CRL Sign" in ca and "Extended" not in ca, ca
    assert os.stat(job / "tls" / "ca.key").st_mode & 0o777 == 0o600
    assert "security_args:" in text and 'tls_cert: "' in text and "tls_mutual: true" in text
    # the CA is never replaced by accident: certificates already handed out would stop matching
    again = subprocess.run(["bash", str(ROOT / "run" / "make_certs.sh"), str(job), "2"], capture_output=True, text=True,
                           env={**os.environ, "BIN": str(BIN)}, timeout=60)
    assert again.returncode == 2 and "FORCE=1" in again.stderr


def test_mutual_tls_refuses_peers_without_a_certificate_of_the_ca(certs, tmp_path) -> None:
    job, other, _ = certs
    ports = free_ports(5)
    csv = write_csv(tmp_path / "ip.csv", [(0, "127.0.0.1", ports[0], ""), (1, "127.0.0.1", ports[1], ""),
                                           (2, "127.0.0.1", ports[2], "")])
    args = argparse.Namespace(prism_grpc_addresses=read_ipconfig(str(csv)), run_id="t")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("fedml_prism").addHandler(handler)
    managers = []
    try:
        server = PrismGrpcCommManager(args, 0, 2, codec(0), tls(job, 0))
        worker = PrismGrpcCommManager(args, 1, 2, codec(1), tls(job, 1))
        managers += [server, worker]
        inbox = Inbox(server)
        worker.send_message(online(1))
        wait_for(lambda: inbox.got == [(5, 1)], timeout=10, what="the worker's message over mutual TLS")

        def raw(credentials: Any, frame: bytes, client_id: int = 1, port: int = ports[0]) -> grpc.StatusCode | None:
            target = f"127.0.0.1:{port}"
            server_name = [("grpc.ssl_target_name_override", "party0")]  # the name every party checks for the server
            channel = grpc.secure_channel(target, credentials, server_name) if credentials else grpc.insecure_channel(target)
            try:
                pb_grpc.gRPCCommManagerStub(channel).sendMessage(pb.CommRequest(client_id=client_id, message=frame),
                                                                 timeout=10)
                return None
            except grpc.RpcError as err:
                return err.code()
            finally:
                channel.close()

        def read(path: Path) -> bytes:
            return path.read_bytes()

        ca = read(job / "tls" / "ca.crt")
        sender = codec(1)  # frames that would be accepted if they got through
        refused = {
            "no client certificate": grpc.ssl_channel_credentials(ca),
            "a certificate of another CA": grpc.ssl_channel_credentials(ca, read(other / "tls" / "party1.key"),
                                                                        read(other / "tls" / "party1.crt")),
            "plain text": None,
        }
        for what, credentials in refused.items():
            assert raw(credentials, sender.encode(online(1))) == grpc.StatusCode.UNAVAILABLE, what
        time.sleep(0.5)
        assert inbox.got == [(5, 1)] and not any("rejected" in r for r in records), records  # never seen
        # a certificate of the CA, but party2's: the identity is bound to the certificate
        party2 = grpc.ssl_channel_credentials(ca, read(job / "tls" / "party2.key"), read(job / "tls" / "party2.crt"))
        assert raw(party2, sender.encode(online(1)), client_id=1) is None
        assert raw(party2, sender.encode(online(1)), client_id=2) is None
        wait_for(lambda: sum("rejected a gRPC message" in r for r in records) == 2, timeout=10, what="two rejections")
        assert any("its certificate is for 'party2', not party1" in r for r in records), records
        assert any("sender 1 in the frame but 2 on the transport (spoofed sender)" in r for r in records), records
        assert inbox.got == [(5, 1)]
        # the channel checks the server: a worker trusting another CA cannot send to it
        stranger = PrismGrpcCommManager(args, 2, 2, codec(2), tls(other, 2))
        managers.append(stranger)
        with pytest.raises(grpc.RpcError):
            stranger.send_message(online(2))
        # the name checked is the party's, not the CSV's host: a server reached as 127.0.0.2 (this machine too)
        renamed = write_csv(tmp_path / "renamed.csv", [(0, "0.0.0.0", ports[3], "127.0.0.2"), (1, "127.0.0.1", ports[4], "")])
        renamed_args = argparse.Namespace(prism_grpc_addresses=read_ipconfig(str(renamed)), run_id="t")
        far = PrismGrpcCommManager(renamed_args, 0, 1, codec(0, workers=1), tls(job, 0))
        near = PrismGrpcCommManager(renamed_args, 1, 1, codec(1, workers=1), tls(job, 1))
        managers += [far, near]
        far_inbox = Inbox(far)
        near.send_message(online(1))
        wait_for(lambda: far_inbox.got == [(5, 1)], timeout=10, what="a message to the server at another host name")
        # one-way TLS (tls_mutual: false): no client certificate needed, the frame's MAC is the identity
        for m in (far, near):
            m.stop_receive_message()
        one_way = PrismGrpcCommManager(renamed_args, 0, 1, codec(0, workers=1), tls(job, 0, mutual=False))
        managers.append(one_way)
        one_inbox = Inbox(one_way)
        assert raw(grpc.ssl_channel_credentials(ca), codec(1, workers=1).encode(online(1)), port=ports[3]) is None
        wait_for(lambda: one_inbox.got == [(5, 1)], timeout=10, what="a message over one-way TLS")
    finally:
        logging.getLogger("fedml_prism").removeHandler(handler)
        for m in managers:
            m.stop_receive_message()


class RogueListener:
    """A listener with another party's valid certificate (of the job's CA) on ``port``: what reaches it is recorded."""

    def __init__(self, certs: Path, rank: int, port: int) -> None:
        self.got: list[int] = []
        d = certs / "tls"
        credentials = grpc.ssl_server_credentials([((d / f"party{rank}.key").read_bytes(),
                                                    (d / f"party{rank}.crt").read_bytes())])
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        rogue = self

        class Servicer(pb_grpc.gRPCCommManagerServicer):
            def sendMessage(self, request: Any, context: Any) -> Any:  # noqa: N802 - FedML's generated name
                rogue.got.append(request.client_id)
                return pb.CommResponse()

        pb_grpc.add_gRPCCommManagerServicer_to_server(Servicer(), self.server)
        self.server.add_secure_port(f"127.0.0.1:{port}", credentials)
        self.server.start()

    def stop(self) -> None:
        self.server.stop(None)


@pytest.mark.parametrize("mutual", [True, False])
def test_a_worker_certificate_cannot_pose_as_the_server_or_another_worker(certs, tmp_path, mutual, caplog) -> None:
    """Worker 2's valid certificate, listening on the server's address, gets nothing from worker 1 (its
    send fails); on worker 1's address, nothing from the server; the real parties then talk as usual."""
    job, _, _ = certs
    ports = free_ports(3)
    csv = write_csv(tmp_path / "ip.csv", [(r, "127.0.0.1", ports[r], "") for r in range(3)])
    args = argparse.Namespace(prism_grpc_addresses=read_ipconfig(str(csv)), run_id="t")
    managers: list[PrismGrpcCommManager] = []
    rogues = [RogueListener(job, 2, ports[0])]  # worker 2's certificate on the server's address
    try:
        worker = PrismGrpcCommManager(args, 1, 2, codec(1), tls(job, 1, mutual))
        managers.append(worker)
        with pytest.raises(grpc.RpcError, match="Hostname Verification"):
            worker.send_message(online(1))
        assert f"party 1 refused the certificate at 127.0.0.1:{ports[0]}: it does not name party0" in caplog.text
        rogues[0].stop()
        server = PrismGrpcCommManager(args, 0, 2, codec(0), tls(job, 0, mutual))
        managers.append(server)
        rogues.append(RogueListener(job, 1, ports[2]))  # worker 1's certificate on worker 2's address
        with pytest.raises(grpc.RpcError, match="Hostname Verification"):
            server.send_message(Message(6, 0, 2))
        assert [r.got for r in rogues] == [[], []]
        # the real parties: each accepts the other's certificate
        inbox, worker_inbox = Inbox(server), Inbox(worker)
        worker.send_message(online(1))
        server.send_message(Message(6, 0, 1))
        wait_for(lambda: inbox.got == [(5, 1)] and worker_inbox.got == [(6, 0)], timeout=10,
                 what="the honest messages")
    finally:
        for r in rogues:
            r.stop()
        for m in managers:
            m.stop_receive_message()


def test_a_grpc_job_with_mutual_tls_and_keys_completes(tmp_path) -> None:
    make_certs(tmp_path / "secrets", 2, tmp_path)
    cfg = grpc_config(tmp_path, workers=2, train_args={"client_num_per_round": 6}, security_args={
        "auth_key_file": "secrets/keys/party{rank}.key", "require_auth": True, "tls_ca": "secrets/tls/ca.crt",
        "tls_cert": "secrets/tls/party{rank}.crt", "tls_key": "secrets/tls/party{rank}.key", "tls_mutual": True})
    run_grpc_job(cfg, tmp_path / "out", tmp_path, workers=2)
    assert_prism_ran(tmp_path / "out", rounds=2, clients=6)
    log = (tmp_path / "server.log").read_text()
    assert "gRPC listening on 127.0.0.1" in log and "mutual TLS" in log and "rejected" not in log
    assert all("mutual TLS" in (tmp_path / f"client{r}.log").read_text() for r in (1, 2))


def test_the_ipconfig_csv_is_checked_before_anything_starts(tmp_path) -> None:
    cfg = grpc_config(tmp_path, workers=2)
    csv = tmp_path / "grpc_ipconfig.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:3]) + "\n")  # header, ranks 0 and 1: rank 2 is missing
    cli = [str(BIN / "fedml-prism"), "run", "--cf", str(cfg), "--output-dir", str(tmp_path / "out"), "--run_id", "t"]
    for rank, role in ((0, "server"), (2, "client")):
        proc = start([*cli, "--rank", str(rank), "--role", role], tmp_path, f"bad{rank}.log")
        try:
            assert proc.wait(timeout=90) == 2
        finally:
            stop(proc)
        text = (tmp_path / f"bad{rank}.log").read_text()
        assert "grpc_ipconfig_path='grpc_ipconfig.csv' is invalid: no row for rank(s) [2]" in text, text[-2000:]
        assert "gRPC listening" not in text and not (tmp_path / "out" / "metrics.json").exists()
    base = str(tmp_path)
    header = "eid,rank,grpc_server_ip,grpc_server_port\n"
    bad = {
        "0,0,127.0.0.1,80\n1,1,127.0.0.1,99999\n": "line 3: grpc_server_port='99999'",
        "0,0,127.0.0.1,80\nx,1,127.0.0.1,81\n": "line 3: eid='x'",
        "0,0,127.0.0.1,80\n0,0,127.0.0.1,81\n1,1,127.0.0.1,82\n": "line 3: eid 0 appears twice",
        "0,0,127.0.0.1,80\n1,1,,81\n": "line 3: grpc_server_ip is empty",
        "0,0,127.0.0.1,80\n1,1,127.0.0.1,80\n": "ranks 0 and 1 share the address 127.0.0.1:80",
    }
    for i, (rows, message) in enumerate(bad.items()):
        (tmp_path / f"bad{i}.csv").write_text(header + rows)
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            check_ipconfig(f"bad{i}.csv", base, worker_num=1)
    (tmp_path / "cols.csv").write_text("eid,ip,port\n0,127.0.0.1,80\n")
    with pytest.raises(ValueError, match=r"columns \['grpc_server_ip', 'grpc_server_port'\] are missing"):
        check_ipconfig("cols.csv", base, worker_num=1)
    with pytest.raises(ValueError, match="does not exist"):
        check_ipconfig("nope.csv", base, worker_num=1)
    with pytest.raises(ValueError, match="backend GRPC needs a CSV"):
        check_ipconfig(None, base, worker_num=1)
    (tmp_path / "ok.csv").write_text(header + "0,0,0.0.0.0,80\n1,1,10.0.0.5,81\n2,2,::1,82\n")
    table = check_ipconfig("ok.csv", base, worker_num=2)
    assert [a.target for a in table.values()] == ["127.0.0.1:80", "10.0.0.5:81", "[::1]:82"]
    assert table[0].bind == "0.0.0.0:80"


def test_nothing_else_can_listen_on_a_partys_port(tmp_path) -> None:
    """gRPC sets SO_REUSEPORT by default: a second listener on a party's port would take part of its traffic."""
    ports = free_ports(2)
    csv = write_csv(tmp_path / "ip.csv", [(0, "127.0.0.1", ports[0], ""), (1, "127.0.0.1", ports[1], "")])
    args = argparse.Namespace(prism_grpc_addresses=read_ipconfig(str(csv)), run_id="t")
    party = PrismGrpcCommManager(args, 0, 1, codec(0, workers=1), SecuritySettings())
    try:
        with pytest.raises(RuntimeError, match=f"party 0 cannot listen on 127.0.0.1:{ports[0]}"):
            PrismGrpcCommManager(args, 0, 1, codec(0, workers=1), SecuritySettings())
    finally:
        party.stop_receive_message()


def test_one_certificate_holds_at_most_calls_per_peer_calls(certs, tmp_path, monkeypatch, caplog) -> None:
    """Under mutual TLS a peer is its certificate: worker 2's certificate, on connections of their own, gets
    CALLS_PER_PEER idle calls held (then cut at the receive deadline) and the rest refused at once, while
    worker 1's messages still get through."""
    job, _, _ = certs
    monkeypatch.setattr(grpc_transport, "RECEIVE_TIMEOUT_S", 1.0)
    ports = free_ports(3)
    csv = write_csv(tmp_path / "ip.csv", [(r, "127.0.0.1", ports[r], "") for r in range(3)])
    args = argparse.Namespace(prism_grpc_addresses=read_ipconfig(str(csv)), run_id="t")
    small = dataclasses.replace(tls(job, 0), max_message_mb=0.01)
    limit = grpc_transport.receive_timeout_s(small.max_bytes)
    d = job / "tls"
    party2 = grpc.ssl_channel_credentials((d / "ca.crt").read_bytes(), (d / "party2.key").read_bytes(),
                                          (d / "party2.crt").read_bytes())
    server = PrismGrpcCommManager(args, 0, 2, codec(0), small)
    worker = PrismGrpcCommManager(args, 1, 2, codec(1), tls(job, 1))
    inbox = Inbox(server)
    try:
        with caplog.at_level("WARNING", logger="fedml_prism"):
            idle = IdleCalls(f"127.0.0.1:{ports[0]}", CALLS_PER_PEER + 2, reopen=False, credentials=party2,
                             options=[("grpc.ssl_target_name_override", "party0")])
            wait_for(lambda: len(idle.ended) >= 2, timeout=limit / 2, what="the calls over the bound to be refused")
            worker.send_message(online(1))
            wait_for(lambda: inbox.got == [(5, 1)], timeout=5, what="worker 1's message")
            wait_for(lambda: len(idle.ended) == CALLS_PER_PEER + 2, timeout=limit + 5, what="the held calls to be cut")
    finally:
        for m in (server, worker):
            m.stop_receive_message()
    codes = sorted((code.name, round(seconds)) for code, seconds in idle.ended)
    assert codes == [("DEADLINE_EXCEEDED", round(limit))] * CALLS_PER_PEER + [("RESOURCE_EXHAUSTED", 0)] * 2, idle.ended
    refusals = [r.getMessage() for r in caplog.records if "refused gRPC calls" in r.getMessage()]
    assert refusals == [f"refused gRPC calls from certificate CN='party2': it already has {CALLS_PER_PEER} calls open"]
