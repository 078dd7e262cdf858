"""MQTT_S3 against hostile peers and with a locked-down broker (issue 11): a compromised worker holding its
own key attacks a real job (mosquitto + moto_server) and the job finishes with the honest workers; a broker
with a password file and mutual TLS takes the job, and a wrong password, an untrusted broker certificate or
no broker at all end a party with an error naming the cause instead of a hang; bad broker settings are
refused before anything connects."""

from __future__ import annotations

import getpass
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hostile_utils import defective_uploads
from runtime_utils import (
    BIN,
    HELPERS,
    free_ports,
    helpers_env,
    metrics,
    mosquitto_path,
    mqtt_args,
    run,
    start,
    stop,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.timeout(300)

RUN = "hostile"
REPEATS = 4  # tests/helpers/rogue_mqtt_s3.py sends each refused announcement this often


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@contextmanager
def broker_and_s3(tmp: Path, *broker_conf: str) -> Iterator[tuple[int, int]]:
    """mosquitto (``broker_conf``: lines of its config) and moto_server on free ports, the bucket made;
    both stopped by PID afterwards."""
    import boto3

    mqtt_port, s3_port = free_ports(2)
    conf = tmp / "mosquitto.conf"
    conf.write_text("\n".join([f"listener {mqtt_port} 127.0.0.1", f"user {getpass.getuser()}", *broker_conf]) + "\n")
    procs = [start([mosquitto_path(), "-c", str(conf)], tmp, "mosquitto.log"),
             start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], tmp, "moto.log")]
    try:
        wait_for(lambda: _listening(mqtt_port) and _listening(s3_port), timeout=60, what="mosquitto and moto_server")
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}", aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="fedml-prism")
        yield mqtt_port, s3_port
    finally:
        for p in procs:
            stop(p)


def mqtt_job(tmp: Path, mqtt_port: int, s3_port: int, workers: int, mqtt: dict | None = None, **sections: dict) -> Path:
    comm = {
        "backend": "MQTT_S3", "worker_num": workers,
        "customized_training_mqtt_config": {"BROKER_HOST": "127.0.0.1", "BROKER_PORT": mqtt_port, "MQTT_KEEPALIVE": 60,
                                            "MQTT_CONNECT_TIMEOUT_S": 15, **(mqtt or {})},
        "customized_training_s3_config": {"BUCKET_NAME": "fedml-prism", "CN_S3_ENDPOINT": f"http://127.0.0.1:{s3_port}",
                                          "CN_REGION_NAME": "us-east-1", "CN_S3_AKI": "testing", "CN_S3_SAK": "testing"},
    }
    tracking = {"output_dir": str(tmp / "out"), **sections.pop("tracking_args", {})}
    return write_config(tmp / "mqtt.yaml", common_args={"training_type": "cross_silo", "scenario": "horizontal"},
                        comm_args=comm, tracking_args=tracking, **sections)


def party(cfg: Path, rank: int) -> list[str]:
    role = "server" if rank == 0 else "client"
    return [str(BIN / "fedml-prism"), "run", "--cf", str(cfg), "--rank", str(rank), "--role", role, "--run_id", RUN]


def start_server(cfg: Path, tmp: Path) -> subprocess.Popen:
    server = start(party(cfg, 0), tmp, "server.log")
    wait_for(lambda: "party 0: MQTT broker" in (tmp / "server.log").read_text() or server.poll() is not None,
             timeout=90, what="the MQTT_S3 server to connect")
    assert server.poll() is None, (tmp / "server.log").read_text()[-3000:]
    return server


def test_rogue_worker_attacks_are_rejected_and_the_job_finishes(tmp_path) -> None:
    """Worker 3 is compromised (its own key): every attack of tests/helpers/rogue_mqtt_s3.py is rejected with its
    reason in the server's log (transport: S3 keys, sizes, pickles, safetensors, senders, MACs, replays,
    header values; manager: foreign client, stale rounds; engine: each PriSM client's defect), an S3
    announcement without a valid MAC causes no S3 request and no key is fetched twice, nothing is
    ever unpickled, honest worker 1 rejects what the rogue sends it, the rogue's silent round closes by
    its deadline, and the job ends with every round and the honest workers exiting 0."""
    run([str(BIN / "fedml-prism"), "keys", "--out", str(tmp_path / "keys"), "--workers", "3"], tmp_path, "keys.log", 60)
    marker = tmp_path / "PWNED"
    with broker_and_s3(tmp_path, "allow_anonymous true") as (mqtt_port, s3_port):
        cfg = mqtt_job(tmp_path, mqtt_port, s3_port, workers=3,
                       train_args={"client_num_in_total": 30, "client_num_per_round": 15, "comm_round": 2},
                       tracking_args={"round_timeout_s": 20, "start_timeout_s": 90},
                       security_args={"auth_key_file": "keys/party{rank}.key", "require_auth": True, "max_message_mb": 1})
        server = start_server(cfg, tmp_path)
        workers = [start(party(cfg, r), tmp_path, f"client{r}.log") for r in (1, 2)]
        rogue = start([str(BIN / "python"), str(HELPERS / "rogue_mqtt_s3.py"), str(cfg), RUN, "3",
                       str(tmp_path / "keys" / "party3.key"), str(marker), "200"], tmp_path, "rogue.log",
                      extra_env=helpers_env())
        try:
            assert server.wait(timeout=200) == 0, (tmp_path / "server.log").read_text()[-4000:]
            for w in workers:
                assert w.wait(timeout=30) == 0
        finally:
            for p in [server, *workers, rogue]:
                stop(p)
        s3_requests = (tmp_path / "moto.log").read_text()
    log = (tmp_path / "server.log").read_text()
    rogue_log = (tmp_path / "rogue.log").read_text()
    assert "ONLINE again mid-run" in rogue_log, rogue_log[-3000:]
    # ONLINE mid-run is ignored: FedML would answer each with the whole init round again (stalling the round)
    assert rogue_log.count("bundle of wire round 1") == 1, rogue_log[-3000:]
    assert not marker.exists(), "a pickle from the rogue was loaded"
    assert [r["round"] for r in metrics(tmp_path / "out")] == [1, 2]

    own, other = f"fedml_{RUN}_3", f"fedml_{RUN}_1"

    def rejected(topic: str, reason: str) -> None:
        pattern = rf"rejected an MQTT_S3 message on {re.escape(topic)}: .*{re.escape(reason)}"
        assert re.search(pattern, log), f"no rejection {reason!r} on {topic} in the server log:\n{log[-4000:]}"

    def key_of(what: str) -> str:
        found = re.search(rf"sent {re.escape(what)} \(key (\S+)\)", rogue_log)
        assert found, f"the rogue did not send {what}"
        return found.group(1)

    def requests(method: str, key: str) -> int:
        return len(re.findall(rf"{method} /fedml-prism/{re.escape(key)} HTTP", s3_requests))

    # S3 announcements are authenticated before any S3 request, and no key is fetched twice
    for what, reason in (("an announcement without MAC", "S3 announcement from sender 3 has no MAC"),
                         ("an announcement with another announcement's MAC", "S3 announcement from sender 3 has a bad MAC"),
                         ("an announcement with a non-hex MAC", "S3 announcement from sender 3 has a bad MAC")):
        key = key_of(what)
        assert requests("HEAD", key) == requests("GET", key) == 0, f"{what}: the server read S3 object {key}"
        assert log.count(f"{reason} (key {key!r})") == REPEATS, f"{what}: not refused {REPEATS} times"
    lie = key_of("a signed announcement with a hash lie")
    assert requests("GET", lie) == requests("HEAD", lie) == 1, f"{lie} fetched more than once"
    assert log.count(f"S3 key {lie!r} was announced before (each object is fetched once at most)") == REPEATS - 1
    assert requests("GET", key_of("the defective bundle")) == 1  # its announcement, replayed, is not fetched again
    rejected(own, f"S3 key {key_of('the defective bundle')!r} was announced before")
    rejected(other, "S3 announcement from sender 1 has a bad MAC")  # signed with key 3 on worker 1's topic

    for reason in ("neither a PriSM frame nor an S3 announcement",      # a pickle as the MQTT payload
                   "not a PriSM frame (bad magic",                      # a pickle in S3
                   "S3 key '../../x' is not one sender 3 may use",
                   f"S3 key 'fedml_{RUN}_1_",                           # another worker's key prefix
                   "is invalid: allowed 1..1048576 (max_message_mb)",   # an oversized object announced as such
                   "exceeds max_message_mb (1048576 bytes): not read",  # ... announced as small: head_object
                   "its announcement says",
                   "does not match its announced sha256",
                   "the tensor blob is not valid safetensors",
                   "sender 1 in the frame but 3 on the transport (spoofed sender)",
                   "bad message authentication code from sender 3",    # no MAC, wrong MAC
                   "from sender 3 already seen (replayed frame)",       # exact replays (S3 and inline)
                   "frame header is not JSON: NaN is not allowed",
                   "frame header is not JSON: integer 9999999999"):     # a 5000-digit integer (64-bit bound)
        rejected(own, reason)
    assert log.count("the tensor blob is not valid safetensors") >= 2
    assert log.count("already seen (replayed frame)") >= 3
    rejected(other, "bad message authentication code from sender 1")   # on worker 1's topic with key 3
    # a huge round: refused by the wire (64-bit integers) before the manager sees it
    rejected(own, "frame header is not JSON: integer 1000000000000000000000000000000")
    # the manager: a client sent to another worker, an older round
    assert re.search(r"rejected an upload from worker 3: it holds client\(s\) \[\d+\], which were not sent", log)
    assert "rejected an upload from worker 3: it is for round 1, not round 2 (stale or replayed)" in log
    # the engine: one defect per PriSM client of the accepted bundle
    for name, _, reason in defective_uploads(_five_clients()):
        assert re.search(rf"(rejected|dropped the) update of client \d+: .*{re.escape(reason)}", log), f"{name} missing"
    assert "no upload from worker(s) [3]" in log and "did not report FINISHED" in log
    # honest worker 1 hears only the server's topic: the rogue's pickle and forged FINISH are dropped there
    client1 = (tmp_path / "client1.log").read_text()
    assert f"rejected an MQTT_S3 message on fedml_{RUN}_0_1: neither a PriSM frame" in client1
    assert f"rejected an MQTT_S3 message on fedml_{RUN}_0_1: bad message authentication code from sender 0" in client1
    assert "Traceback" not in log and "Traceback" not in client1
    # S3: an object larger than max_message_mb is sized (HEAD), never downloaded (GET); an accepted frame's
    # object is deleted once read, a rejected one is left alone (its announcer need not be its writer)
    big = key_of("an oversized object, announced as small")
    assert requests("HEAD", big) == 1 and not requests("GET", big)
    assert requests("DELETE", key_of("the defective bundle")) == 1
    assert requests("GET", key_of("a pickle in S3")) == 1 and not requests("DELETE", key_of("a pickle in S3"))


def _five_clients():
    """A stand-in upload with five PriSM clients: only the defects' names and reasons are read."""
    import torch

    from fedml_prism.engine.server import NUM_SAMPLES, pack_bundle

    return pack_bundle({c: {"w": torch.ones(2), NUM_SAMPLES: torch.tensor(3)} for c in range(5)})


def _certs(tmp: Path) -> dict[str, Path]:
    """A CA, the broker's certificate (127.0.0.1) and one client certificate per party (ranks 0, 1)."""
    d = tmp / "certs"
    d.mkdir()

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=prism test CA")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("broker", "party0", "party1"):
        ssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-out", f"{name}.crt", *(["-extfile", "san.ext"] if name == "broker" else []))
    return {"ca": d / "ca.crt", "cert": d / "broker.crt", "key": d / "broker.key"}


def test_broker_with_password_file_and_mutual_tls(tmp_path) -> None:
    """mosquitto with a password file (no anonymous clients) behind mutual TLS: a job with the right
    credentials and certificates completes (FINISHED included), its password never reaches a log; a
    party with a wrong password stops at once with an error naming the refusal, not a hang."""
    certs = _certs(tmp_path)
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "fl-party-user", "s3cret-pw-1234"], check=True, timeout=30,
                   capture_output=True)
    conf = ("allow_anonymous false", f"password_file {passwd}", f"cafile {certs['ca']}", f"certfile {certs['cert']}",
            f"keyfile {certs['key']}", "require_certificate true")
    tls = {"MQTT_USER": "fl-party-user", "MQTT_PWD": "s3cret-pw-1234", "MQTT_TLS_CA": "certs/ca.crt",
           "MQTT_TLS_CERT": "certs/party{rank}.crt", "MQTT_TLS_KEY": "certs/party{rank}.key"}
    with broker_and_s3(tmp_path, *conf) as (mqtt_port, s3_port):
        cfg = mqtt_job(tmp_path, mqtt_port, s3_port, workers=1, mqtt=tls,
                       train_args={"client_num_in_total": 4, "client_num_per_round": 2, "comm_round": 2},
                       tracking_args={"round_timeout_s": 60})
        server = start_server(cfg, tmp_path)
        worker = start(party(cfg, 1), tmp_path, "client1.log")
        try:
            assert server.wait(timeout=150) == 0, (tmp_path / "server.log").read_text()[-3000:]
            assert worker.wait(timeout=30) == 0, (tmp_path / "client1.log").read_text()[-3000:]
        finally:
            for p in (server, worker):
                stop(p)
        assert [r["round"] for r in metrics(tmp_path / "out")] == [1, 2]
        logs = (tmp_path / "server.log").read_text() + (tmp_path / "client1.log").read_text()
        assert "(TLS)" in logs and "FINISHED delivered" in logs and "did not report FINISHED" not in logs
        assert "s3cret-pw-1234" not in logs

        # a wrong password, and a CA that did not sign the broker: each party stops at once, saying why
        wrong = mqtt_job(tmp_path, mqtt_port, s3_port, workers=1, mqtt={**tls, "MQTT_PWD": "wrong-password"})
        text = _fails(party(wrong, 0), tmp_path, "wrong_password.log")
        assert re.search(r"error: the MQTT broker 127\.0\.0\.1:\d+ \(TLS\) refused the connection: .*"
                         r"(not authori[sz]ed|bad user name or password)", text), text[-3000:]
        assert "wrong-password" not in text
        other_ca = tmp_path / "other"
        other_ca.mkdir()
        _certs(other_ca)
        untrusted = mqtt_job(tmp_path, mqtt_port, s3_port, workers=1, mqtt={**tls, "MQTT_TLS_CA": "other/certs/ca.crt"})
        text = _fails(party(untrusted, 1), tmp_path, "wrong_ca.log")
        assert re.search(r"error: TLS with the MQTT broker 127\.0\.0\.1:\d+ \(TLS\) failed: .*certificate verify failed",
                         text), text[-3000:]


def _fails(cmd: list[str], tmp: Path, log_name: str) -> str:
    """Run a party that must fail: exit code 2 (fedml-prism's configuration error) well within its timeout."""
    began = time.time()
    proc = start(cmd, tmp, log_name)
    try:
        code = proc.wait(timeout=90)
    finally:
        stop(proc)
    text = (tmp / log_name).read_text()
    assert code == 2 and time.time() - began < 90, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    return text


def _args(tmp: Path, mqtt: dict, run_id: str = "t", s3: dict | None = None, rank: int = 0):
    """The party's args as ``fedml_args`` makes them (settings resolved from the sections: errors raise here)."""
    (tmp / "job.yaml").write_text("{}\n")
    return mqtt_args(run_id, mqtt, s3 if s3 is not None else {"BUCKET_NAME": "b"}, str(tmp), rank)


@pytest.mark.parametrize("mqtt, run_id, message", [
    ({"BROKER_PORT": 1883}, "t", "customized_training_mqtt_config.BROKER_HOST is missing"),
    ({"BROKER_HOST": "h", "BROKER_PORT": 0}, "t", "BROKER_PORT=0 is invalid"),
    ({"BROKER_HOST": "h", "MQTT_PWD": "pw-only"}, "t", "MQTT_PWD is set but MQTT_USER is not"),
    ({"BROKER_HOST": "h", "MQTT_TLS_CA": "missing.crt"}, "t", "MQTT_TLS_CA='missing.crt' is invalid"),
    ({"BROKER_HOST": "h", "MQTT_TLS_CERT": "job.yaml"}, "t", "MQTT_TLS_CERT and MQTT_TLS_KEY are invalid"),
    ({"BROKER_HOST": "h", "MQTT_TLS": "yes"}, "t", "MQTT_TLS='yes' is invalid"),
    ({"BROKER_HOST": "h"}, "a/#", "run_id='a/#' is invalid for MQTT_S3"),
    (None, "t", "customized_training_mqtt_config is invalid (NoneType)"),
])
def test_mqtt_s3_settings_are_checked(tmp_path, mqtt, run_id, message) -> None:
    from fedml_prism.runtimes.cross_silo.mqtt_transport import PrismMqttS3CommManager
    from fedml_prism.runtimes.cross_silo.transport import make_codec
    from fedml_prism.runtimes.security import SecuritySettings

    with pytest.raises(ValueError, match=re.escape(message)):
        args = _args(tmp_path, mqtt, run_id)
        PrismMqttS3CommManager(args, 0, 1, make_codec(args, 0, 1), SecuritySettings())


def test_no_broker_is_an_error_within_the_connect_timeout(tmp_path) -> None:
    """FedML's client retries an unreachable broker forever; a PriSM party gives up with the reason."""
    from fedml_prism.runtimes.cross_silo.mqtt_broker import BrokerError
    from fedml_prism.runtimes.cross_silo.mqtt_transport import PrismMqttS3CommManager
    from fedml_prism.runtimes.cross_silo.transport import make_codec
    from fedml_prism.runtimes.security import SecuritySettings

    (port,) = free_ports(1)  # nothing listens there
    args = _args(tmp_path, {"BROKER_HOST": "127.0.0.1", "BROKER_PORT": port, "MQTT_CONNECT_TIMEOUT_S": 1})
    began = time.time()
    with pytest.raises(BrokerError, match=rf"no MQTT broker at 127\.0\.0\.1:{port} within 1 s"):
        PrismMqttS3CommManager(args, 1, 1, make_codec(args, 1, 1), SecuritySettings())
    assert time.time() - began < 10
