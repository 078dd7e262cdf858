"""Cross-device (Beehive) end to end: the PriSM MNN server and reference devices over a real MQTT broker
(mosquitto) and a local S3 endpoint (moto_server). Every process has a timeout and is stopped by PID."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from runtime_utils import (
    BIN,
    MODEL_KWARGS,
    final_state,
    free_ports,
    initial_state,
    metrics,
    mosquitto_path,
    start,
    start_broker_and_s3,
    stop,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp: Path, mqtt_port: int, s3_port: int, round_timeout_s: float = 60, **train: object) -> Path:
    return write_config(
        tmp / "cross_device.yaml",
        common_args={"training_type": "cross_device", "scenario": "horizontal"},
        model_args={"model": "cnn", "model_kwargs": MODEL_KWARGS, "input_shape": [1, 8, 8]},
        train_args={"client_id_list": [11, 12, 13], "client_num_in_total": 3, "client_num_per_round": 3,
                    "comm_round": 2, **train},
        tracking_args={"output_dir": str(tmp / "out"), "round_timeout_s": round_timeout_s, "start_timeout_s": 60},
        prism_args={"optimizer_state": "reset"},
        comm_args={
            "backend": "MQTT_S3_MNN",
            "customized_training_mqtt_config": {"BROKER_HOST": "127.0.0.1", "BROKER_PORT": mqtt_port,
                                                "MQTT_USER": "", "MQTT_PWD": "", "MQTT_KEEPALIVE": 60},
            "customized_training_s3_config": {"BUCKET_NAME": "fedml-prism", "CN_S3_ENDPOINT": f"http://127.0.0.1:{s3_port}",
                                              "CN_REGION_NAME": "us-east-1", "CN_S3_AKI": "testing", "CN_S3_SAK": "testing"},
        },
    )


def _check_run(out: Path, rounds: int, devices_per_round: list[int]) -> None:
    rows = metrics(out)
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    assert [r["clients"] for r in rows] == devices_per_round
    for r in rows:
        # each device got its own sub-model (distinct component selections), and it was aggregated
        assert r["distinct_submodels"] == 3 and 0 < r["coverage"] <= 1 and r["bytes_up"] > 0
        assert r["test_acc"] == r["test_acc"]
    before, after = initial_state(seed=3), final_state(out)
    assert any(not torch.allclose(before[k], after[k]) for k in before), "the global model did not change"
    assert (out / "global_model.mnn").stat().st_size > 0


def test_server_and_three_reference_devices_two_rounds(tmp_path) -> None:
    mosquitto_path()
    mqtt_port, s3_port = free_ports(2)
    cfg = _config(tmp_path, mqtt_port, s3_port)
    proc = start(["bash", str(ROOT / "run" / "cross_device.sh"), str(cfg), "3", "200"], tmp_path, "cd.log",
                 extra_env={"MQTT_PORT": str(mqtt_port), "S3_PORT": str(s3_port), "BIN": str(BIN), "RUN_ID": "4242"})
    try:
        assert proc.wait(timeout=240) == 0, (tmp_path / "cd.log").read_text()[-4000:]
    finally:
        stop(proc)
    log = (tmp_path / "cd.log").read_text()
    for edge in (11, 12, 13):
        assert f"device {edge}: run 4242 (server 0)" in log
        assert f"device {edge}: FINISHED after 2 rounds" in log
    # the three devices trained their own data partitions (client_idx) with MNN
    assert {int(p) for p in re.findall(r"trained on partition (\d+)", log)} == {0, 1, 2}
    assert "did not report FINISHED" not in log and "closing the round without them" not in log
    _check_run(tmp_path / "out", 2, [3, 3])


@pytest.mark.parametrize("how", ["killed", "stalled"])
def test_device_lost_mid_round_does_not_hang_the_server(tmp_path, how) -> None:
    """killed: the connection drops and the broker publishes the device's last will. stalled (SIGSTOP
    until round 1's deadline has passed, then SIGCONT): the device stays connected but silent, the round
    deadline closes round 1 without it, and the model it uploads late is not taken for round 2's."""
    mosquitto_path()
    mqtt_port, s3_port = free_ports(2)
    # long enough local training to hit a device in it; healthy devices need ~5 s per round here
    cfg = _config(tmp_path, mqtt_port, s3_port, round_timeout_s=60 if how == "killed" else 15, epochs=25)
    procs, _ = start_broker_and_s3(tmp_path, mqtt_port, s3_port)
    try:
        cmd = [str(BIN / "fedml-prism"), "run", "--cf", str(cfg)]
        server = start([*cmd, "--role", "server", "--run_id", "77"], tmp_path, "server.log")
        procs.append(server)
        devices = {e: start([*cmd, "--role", "device", "--edge-id", str(e)], tmp_path, f"device{e}.log")
                   for e in (11, 12, 13)}
        procs.extend(devices.values())
        wait_for(lambda: "round 1: 3 devices got" in (tmp_path / "server.log").read_text(), 120, "round 1 to start")
        time.sleep(1.0)
        assert "trained" not in (tmp_path / "device13.log").read_text(), "device 13 finished training too early"
        if how == "killed":
            os.killpg(devices[13].pid, signal.SIGKILL)  # disconnects mid-round (its last will goes out)
            devices[13].wait(timeout=10)
        else:
            os.killpg(devices[13].pid, signal.SIGSTOP)
            wait_for(lambda: "no model from device(s) [13]" in (tmp_path / "server.log").read_text(), 60,
                     "round 1's deadline")
            os.killpg(devices[13].pid, signal.SIGCONT)
        assert server.wait(timeout=200) == 0, (tmp_path / "server.log").read_text()[-4000:]
        for e in (11, 12) if how == "killed" else (11, 12, 13):
            assert devices[e].wait(timeout=60) == 0
    finally:
        for p in procs:
            stop(p)
    log = (tmp_path / "server.log").read_text()
    rows = metrics(tmp_path / "out")
    if how == "killed":
        assert [r["clients"] for r in rows] == [2, 2]
        assert "device 13 disconnected (last will)" in log
        assert rows[-1]["distinct_submodels"] == 2  # no sub-model for a device known to be gone
    else:
        assert rows[0]["clients"] == 2 and rows[1]["clients"] in (2, 3)  # round 2: in time or not
        assert "round 2: dropped a late model from device 13 (an earlier round's)" in log
    assert rows[-1]["test_acc"] == rows[-1]["test_acc"]
    before, after = initial_state(seed=3), final_state(tmp_path / "out")
    assert any(not torch.allclose(before[k], after[k]) for k in before)


def test_device_exits_after_client_idle_timeout_without_a_server(tmp_path) -> None:
    """A device connected to the broker but never addressed by a server gives up after
    ``client_idle_timeout_s`` with exit code 3 (instead of waiting forever), not before."""
    mosquitto = mosquitto_path()
    mqtt_port, s3_port = free_ports(2)
    cfg = _config(tmp_path, mqtt_port, s3_port)
    sections = yaml.safe_load(cfg.read_text())
    sections["tracking_args"]["client_idle_timeout_s"] = 3
    cfg.write_text(yaml.safe_dump(sections))
    broker = start([mosquitto, "-p", str(mqtt_port)], tmp_path, "mosquitto.log")
    try:
        time.sleep(0.5)
        began = time.time()
        device = start([str(BIN / "fedml-prism"), "run", "--cf", str(cfg), "--role", "device", "--edge-id", "12"],
                       tmp_path, "device12.log")
        try:
            code = device.wait(timeout=90)
        finally:
            stop(device)
        waited = time.time() - began
    finally:
        stop(broker)
    log = (tmp_path / "device12.log").read_text()
    assert code == 3, log[-3000:]
    assert "device 12: no message from the server for 3 s: exiting" in log
    assert waited >= 3


def test_a_broker_reconnect_before_the_start_neither_resamples_nor_postpones_it(monkeypatch) -> None:
    """FedML raises CONNECTION_IS_READY on every (re)connection to the broker. Only the first opens round 1,
    starts the announcer and arms the start deadline (issue 18: one timer per purpose, armed once); a
    reconnect before the devices came online changes none of them."""
    import threading

    from fedml_prism.engine.server import Deadline
    from fedml_prism.runtimes.cross_device.server_manager import PrismMNNServerManager

    manager = PrismMNNServerManager.__new__(PrismMNNServerManager)
    manager.lock, manager._listening, manager.is_initialized, manager._done = threading.RLock(), True, False, False
    manager._announcer, manager.start_deadline, manager.start_timeout_s = None, Deadline(), 60.0
    manager.deadline = Deadline()
    opened, armed = [], []
    monkeypatch.setattr(manager, "_open_round", lambda: opened.append(1), raising=False)
    monkeypatch.setattr(manager, "_announce", lambda: None, raising=False)
    monkeypatch.setattr(manager.start_deadline, "arm", lambda func, seconds: armed.append(seconds))
    for _ in range(3):
        manager.handle_message_connection_ready(None)
    assert opened == [1] and armed == [60.0]
