"""Hostile peers on the cross-device (MQTT_S3_MNN) transport: devices speak FedML's unsigned JSON protocol,
so the server must be safe anyway. A rogue process holding two of the job's edge ids sends path-traversal
keys, another device's key, a spoofed sender, an oversized object, garbage / truncated / pickled / NaN
graphs, bad sample counts and replays, next to two honest reference devices; the server refuses each with
a logged reason, finishes every round with the honest devices, and nothing is unpickled, written or deleted
outside its cache. Retained messages kept by the broker from before the server started (FINISHED,
ONLINE, a last will) are ignored with a log line, and the broker keeps nothing the server published.
Unit tests cover the graph-parsing child process (time and memory limits), the cache deletion guard and
the field checks. Every process has a timeout and is stopped by PID."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hostile_utils import marker_pickle
from runtime_utils import (
    BIN,
    HELPERS,
    MODEL_KWARGS,
    REPO,
    free_ports,
    helpers_env,
    metrics,
    start,
    start_broker_and_s3,
    stop,
    write_config,
)

from fedml_prism import PrincipalModel, PrismConfig
from fedml_prism.engine.server import MAX_SAMPLES
from fedml_prism.runtimes.cross_device.mnn_export import MnnExporter, read_parameters, read_trained, train_graph
from fedml_prism.runtimes.cross_device.mnn_sandbox import ParseLimits, UnreadableGraph, read_isolated
from fedml_prism.runtimes.cross_device.protocol import _discard, sample_count_problem, upload_key_pattern
from fedml_prism.workloads.models import create_model

pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------------------ unit: parsing, deletion, fields
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    pm = PrincipalModel(create_model("cnn", **MODEL_KWARGS), PrismConfig(keep_ratio=0.3))
    sub = pm.sample_submodel(0, 0)
    path = tmp_path_factory.mktemp("graph") / "sent.mnn"
    graph = MnnExporter((1, 8, 8)).export(sub.module, str(path))
    return graph, sub.to_payload("up"), [tuple(graph.shapes[k]) for k in graph.keys]


def test_child_process_reads_the_graph_as_the_server_would(exported) -> None:
    graph, up, shapes = exported
    isolated = read_isolated(graph.path, shapes)
    direct = read_parameters(graph.path)
    assert len(isolated) == len(direct) and all((a.ravel() == b.ravel()).all() for a, b in zip(isolated, direct, strict=True))
    back = read_trained(graph.path, graph, up)
    assert set(back) == set(up) and all(back[k].dtype == up[k].dtype for k in up)


def test_garbage_truncated_pickled_and_nan_graphs_are_rejected(exported, tmp_path) -> None:
    graph, up, shapes = exported
    data = Path(graph.path).read_bytes()
    marker = tmp_path / "unpickled"
    cases = {"random": os.urandom(len(data)), "truncated": data[: len(data) // 2], "pickle": marker_pickle(marker),
             "empty": b""}
    for name, blob in cases.items():
        path = tmp_path / f"{name}.mnn"
        path.write_bytes(blob)
        with pytest.raises(UnreadableGraph, match="the MNN parser"):
            read_trained(str(path), graph, up)
    nan = tmp_path / "nan.mnn"
    shutil.copy(graph.path, nan)
    train_graph(str(nan), [(torch.full((8, 1, 8, 8), float("nan")), torch.zeros(8, dtype=torch.long))], 10, 0.05)
    with pytest.raises(ValueError, match="has non-finite values"):
        read_trained(str(nan), graph, up)
    other = [(s[0] + 1, *s[1:]) for s in shapes]  # what a graph of another architecture would give
    with pytest.raises(UnreadableGraph, match="expected"):
        read_isolated(graph.path, other)
    with pytest.raises(UnreadableGraph, match="parameters, the graph sent had"):
        read_isolated(graph.path, shapes[:-1])
    assert not marker.exists()


def test_parse_time_and_memory_limits(exported) -> None:
    graph, _, shapes = exported
    with pytest.raises(UnreadableGraph, match="timed out after 0.05 s"):
        read_isolated(graph.path, shapes, ParseLimits(timeout_s=0.05))
    with pytest.raises(UnreadableGraph, match=r"(exited with|was killed by signal) \d+ \(limits 20 s, 24 MiB\)"):
        read_isolated(graph.path, shapes, ParseLimits(memory_mb=24))
    assert len(read_isolated(graph.path, shapes, ParseLimits(timeout_s=30, memory_mb=512))) == len(shapes)
    with pytest.raises(ValueError, match="mnn_parse_timeout_s=0 is invalid"):
        ParseLimits.from_flat({"mnn_parse_timeout_s": 0})
    with pytest.raises(ValueError, match="mnn_parse_memory_mb='1g' is invalid"):
        ParseLimits.from_flat({"mnn_parse_memory_mb": "1g"})
    assert ParseLimits.from_flat({"mnn_parse_timeout_s": 5, "mnn_parse_memory_mb": 512}) == ParseLimits(5.0, 512)


def test_discard_deletes_only_inside_the_cache(tmp_path) -> None:
    cache = tmp_path / "out" / "model_file_cache"
    cache.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (cache / "link.mnn").symlink_to(victim)
    for path in (str(cache / ".." / ".." / "victim"), str(victim), str(cache / "link.mnn"), str(cache)):
        _discard(path, str(cache))
    assert victim.read_text() == "precious" and cache.is_dir()
    own = cache / "upload_11_r1_x.mnn"
    own.write_bytes(b"x")
    _discard(str(own), str(cache))
    assert not own.exists()
    _discard(None, str(cache))
    _discard(["not", "a", "path"], str(cache))


def test_sample_counts_and_upload_keys() -> None:
    for bad in ([5, 5], "32", float("nan"), float("inf"), 10**30, 0, -3, 2.5, True, None, {"n": 1}):
        assert sample_count_problem(bad) is not None, bad
    assert "not a sample count" in sample_count_problem(10**30)
    assert "[5, 5] is invalid" in sample_count_problem([5, 5])
    for good in (1, 32, 32.0, MAX_SAMPLES):
        assert sample_count_problem(good) is None
    pattern = upload_key_pattern("77", 0, 11)
    # the reference device's (and the Android SDK's) upload key: its download topic, "-", 32 hex digits
    assert pattern.fullmatch("fedml_77_0_11-" + "0123456789abcdef" * 2)
    for bad in ("../../victim", "fedml_77_0_12-" + "a" * 32, "fedml_77_0_11-" + "a" * 31, "fedml_77_0_11-" + "g" * 32,
                "fedml_77_0_11-" + "a" * 32 + "/../x", "fedml_78_0_11-" + "a" * 32, "/tmp/fedml_77_0_11-" + "a" * 32):
        assert not pattern.fullmatch(bad), bad


# ------------------------------------------------------------------------------ end to end: a rogue next to honest devices
def _config(tmp: Path, mqtt_port: int, s3_port: int) -> Path:
    return write_config(
        tmp / "cross_device.yaml",
        common_args={"training_type": "cross_device", "scenario": "horizontal"},
        model_args={"model": "cnn", "model_kwargs": MODEL_KWARGS, "input_shape": [1, 8, 8]},
        train_args={"client_id_list": [11, 12, 13, 14], "client_num_in_total": 4, "client_num_per_round": 4,
                    "comm_round": 2},
        tracking_args={"output_dir": str(tmp / "out"), "round_timeout_s": 60, "start_timeout_s": 60},
        prism_args={"optimizer_state": "reset"},
        security_args={"max_message_mb": 1},
        comm_args={
            "backend": "MQTT_S3_MNN", "mnn_parse_timeout_s": 10, "mnn_parse_memory_mb": 1024,
            "customized_training_mqtt_config": {"BROKER_HOST": "127.0.0.1", "BROKER_PORT": mqtt_port,
                                                "MQTT_USER": "", "MQTT_PWD": "", "MQTT_KEEPALIVE": 60},
            "customized_training_s3_config": {"BUCKET_NAME": "fedml-prism", "CN_S3_ENDPOINT": f"http://127.0.0.1:{s3_port}",
                                              "CN_REGION_NAME": "us-east-1", "CN_S3_AKI": "testing", "CN_S3_SAK": "testing"},
        },
    )


# attack (as the rogue names it) → the reason the server logs
REASONS = {
    "pickle_message": "rejected a message from device 13: not a JSON object",
    "traversal_victim": "rejected a message from device 13: S3 key '../../victim' is invalid: allowed fedml_77_0_13-",
    "traversal_create": "rejected a message from device 13: S3 key '../../created_by_rogue' is invalid",
    "other_edge_key": re.compile(r"rejected a message from device 13: S3 key 'fedml_77_0_11-[0-9a-f]{32}' is device 11's"),
    "spoofed_sender": "rejected a message from device 13: sender=11 differs from the device of topic fedml_77_13",
    "oversized": "has 1572864 bytes: allowed 1 to 1048576 (max_message_mb)",
    "two_element_count": "rejected a model from device 13: num_samples=[5, 5] is invalid",
    "huge_count": f"rejected a model from device 13: num_samples={10**30} is not a sample count",
    "string_count": "rejected a model from device 13: num_samples='32' is invalid",
    "nan_count": "rejected a model from device 13: num_samples=nan is not a sample count",
    "unknown_type": "rejected a message from device 13: msg_type=42 is invalid",
    "missing_object": re.compile(r"rejected a message from device 13: S3 key fedml_77_0_13-[0-9a-f]{32} cannot be read"),
    "garbage_graph": "round 1: rejected the model from device 13: the MNN parser exited with",
    "pickle_object": "round 1: rejected the model from device 14: the MNN parser exited with",
    "replayed_upload": "was used before (a replayed upload)",
    "earlier_round_object": "round 2: rejected a model from device 13: its S3 object was written at",
    "truncated_graph": "round 2: rejected the model from device 13: the MNN parser",
    "nan_graph": "round 2: rejected the model from device 14: parameter",
}


# messages kept by the broker from before the server started (a device's, or a forger's): FINISHED of an
# honest device, ONLINE of the rogue's, a last will of an honest device
STALE = {"fedml_77_12": {"client_status": "FINISHED", "client_os": "Android", "msg_type": 5, "sender": 12, "receiver": 0},
         "fedml_77_13": {"client_status": "ONLINE", "client_os": "Android", "msg_type": 5, "sender": 13, "receiver": 0},
         "flclient_agent/last_will_msg": {"ID": "11", "status": "OFFLINE"}}


def _mqtt_client(port: int) -> Any:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(client_id=f"test_{os.getpid()}_{time.monotonic_ns()}", clean_session=True)
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    return client


def _publish_retained(port: int, messages: dict[str, dict]) -> None:
    client = _mqtt_client(port)
    try:
        for topic, body in messages.items():
            info = client.publish(topic, json.dumps(body), qos=2, retain=True)
            info.wait_for_publish(timeout=10)
            assert info.is_published(), topic
    finally:
        client.loop_stop()
        client.disconnect()


def _retained_topics(port: int) -> list[str]:
    """Every topic on which the broker keeps a retained message (a fresh subscriber to ``#`` gets those
    at once)."""
    client = _mqtt_client(port)
    found: list[str] = []
    client.on_message = lambda c, u, msg: found.append(msg.topic) if msg.retain else None
    try:
        client.subscribe("#", qos=2)
        time.sleep(1.5)
    finally:
        client.loop_stop()
        client.disconnect()
    return found


def test_rogue_devices_do_not_stop_or_subvert_the_server(tmp_path) -> None:
    mqtt_port, s3_port = free_ports(2)
    cfg = _config(tmp_path, mqtt_port, s3_port)
    victim, created, marker = tmp_path / "victim", tmp_path / "created_by_rogue", tmp_path / "unpickled"
    victim.write_text("precious")
    procs, s3 = start_broker_and_s3(tmp_path, mqtt_port, s3_port)
    try:
        _publish_retained(mqtt_port, STALE)
        cmd = [str(BIN / "fedml-prism"), "run", "--cf", str(cfg)]
        server = start([*cmd, "--role", "server", "--run_id", "77"], tmp_path, "server.log")
        procs.append(server)
        devices = {e: start([*cmd, "--role", "device", "--edge-id", str(e)], tmp_path, f"device{e}.log") for e in (11, 12)}
        procs.extend(devices.values())
        rogue = start([sys.executable, str(HELPERS / "rogue_cross_device.py"), str(cfg), "77", str(marker), "13", "14"],
                      tmp_path, "rogue.log", extra_env=helpers_env())
        procs.append(rogue)
        assert server.wait(timeout=200) == 0, (tmp_path / "server.log").read_text()[-4000:]
        for e, device in devices.items():
            assert device.wait(timeout=60) == 0, (tmp_path / f"device{e}.log").read_text()[-3000:]
        assert rogue.wait(timeout=60) == 0, (tmp_path / "rogue.log").read_text()[-3000:]
        # what the server published is not kept by the broker (SDK devices drop retained messages anyway)
        server_retained = [t for t in _retained_topics(mqtt_port) if t.startswith(("fedml_77_0_", "flserver_agent/"))]
        s3.put_object(Bucket="fedml-prism", Key="probe", Body=b"x", ACL="public-read")
        acls = {obj["Key"]: s3.get_object_acl(Bucket="fedml-prism", Key=obj["Key"])["Grants"]
                for obj in s3.list_objects_v2(Bucket="fedml-prism")["Contents"]}
    finally:
        for p in procs:
            stop(p)
    log = (tmp_path / "server.log").read_text()
    sent = (tmp_path / "rogue.log").read_text()
    # the stale messages were seen and ignored, each with a log line; the run went on as below
    for topic in STALE:
        assert f"ignored a retained message on {topic!r}" in log, f"{topic}: no log line:\n{log[-4000:]}"
    assert "device 11 disconnected" not in log
    assert server_retained == [], f"the broker keeps what the server published on {sorted(set(server_retained))}"
    for attack, reason in REASONS.items():
        assert f"rogue: sent {attack}\n" in sent, f"the rogue did not send {attack}:\n{sent[-3000:]}"
        found = reason.search(log) if isinstance(reason, re.Pattern) else reason in log
        assert found, f"{attack}: no {reason!r} in the server log:\n{log[-6000:]}"
    assert "Traceback" not in log and "handling it failed" not in log
    # the honest devices finished every round, and only their updates were aggregated
    for e in (11, 12):
        assert f"device {e}: FINISHED after 2 rounds" in (tmp_path / f"device{e}.log").read_text()
    rows = metrics(tmp_path / "out")
    assert [r["round"] for r in rows] == [1, 2] and [r["clients"] for r in rows] == [2, 2]
    assert all(r["test_acc"] == r["test_acc"] for r in rows)
    # nothing unpickled, nothing written or deleted outside the cache, no download left in it
    assert not marker.exists() and not created.exists() and victim.read_text() == "precious"
    assert not list((tmp_path / "out" / "model_file_cache").glob("upload_*"))
    # the server's graphs and the honest devices' uploads are private (no public-read grant)
    graphs = [k for k in acls if re.fullmatch(r"fedml_77_0_1[1-4]_[0-9a-f-]{36}", k)]
    uploads = [k for k in acls if re.fullmatch(r"fedml_77_0_1[12]-[0-9a-f]{32}", k)]
    assert len(graphs) == 8 and len(uploads) >= 4  # 4 devices x 2 rounds; 2 honest devices x 2 rounds
    assert _public(acls["probe"])  # the check sees a public-read object
    for key in graphs + uploads:
        assert not _public(acls[key]), (key, acls[key])


def _public(grants: list[dict]) -> bool:
    return any(g.get("Grantee", {}).get("URI", "").endswith("/global/AllUsers") for g in grants)


def test_config_in_the_repo_carries_the_cross_device_limits() -> None:
    cfg = yaml.safe_load((REPO / "config" / "cross_device" / "fedml_config.yaml").read_text())
    assert cfg["security_args"]["max_message_mb"] > 0
    keepalive = cfg["comm_args"]["customized_training_mqtt_config"]["MQTT_KEEPALIVE"]
    assert ParseLimits.from_flat(cfg["comm_args"]).timeout_s < keepalive  # a parse must not drop the broker connection
