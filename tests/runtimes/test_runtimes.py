"""End-to-end runs of every FedML runtime (small, each with a timeout)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from runtime_utils import (
    BIN,
    assert_prism_ran,
    assert_same_as_sp,
    env_for,
    final_state,
    free_ports,
    grpc_config,
    metrics,
    run,
    run_grpc_job,
    start,
    start_grpc,
    stop,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.timeout(240)


def fedml_prism(cfg, out, *extra) -> list[str]:
    return [str(BIN / "fedml-prism"), "run", "--cf", str(cfg), "--output-dir", str(out), *extra]


def test_sp_simulation(tmp_path) -> None:
    cfg = write_config(tmp_path / "sp.yaml")
    log = run(fedml_prism(cfg, tmp_path / "out"), tmp_path, "sp.log", timeout=180)
    assert "round 2/2 | acc" in log
    assert_prism_ran(tmp_path / "out", rounds=2, clients=4)


def test_mpi_cross_silo_and_equivalence_with_sp(tmp_path) -> None:
    mpiexec = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
    assert mpiexec, "mpiexec missing: install the mpich wheel (pip install mpich)"
    # aggregated momentum crosses processes in the bundles: MPI must still equal sp
    common = {"train_args": {"client_num_in_total": 12, "client_num_per_round": 6, "comm_round": 2},
              "prism_args": {"optimizer_state": "aggregate", "factor_scale": "sqrt"}}
    sp_cfg = write_config(tmp_path / "sp.yaml", **common)
    mpi_cfg = write_config(
        tmp_path / "mpi.yaml", **common,
        common_args={"training_type": "cross_silo", "scenario": "horizontal"},
        comm_args={"backend": "MPI", "worker_num": 2},
    )
    run(fedml_prism(sp_cfg, tmp_path / "sp"), tmp_path, "sp.log", timeout=180)
    run([mpiexec, "-np", "3", *fedml_prism(mpi_cfg, tmp_path / "mpi")], tmp_path, "mpi.log", timeout=200)
    assert_prism_ran(tmp_path / "mpi", rounds=2, clients=6)
    sp, mpi = final_state(tmp_path / "sp"), final_state(tmp_path / "mpi")
    for key in sp:
        assert torch.allclose(sp[key], mpi[key], atol=1e-5), f"sp and MPI differ at {key}"
    sp_acc = [r["test_acc"] for r in metrics(tmp_path / "sp")]
    mpi_acc = [r["test_acc"] for r in metrics(tmp_path / "mpi")]
    assert sp_acc == pytest.approx(mpi_acc, abs=1e-3)


def test_resume_after_kill_equals_uninterrupted_run(tmp_path) -> None:
    # the momentum buffers are part of the checkpoint: the resumed run must still match exactly
    cfg = write_config(tmp_path / "sp.yaml", train_args={"comm_round": 6},
                       prism_args={"optimizer_state": "aggregate", "warmup_rounds": 2})
    run(fedml_prism(cfg, tmp_path / "full"), tmp_path, "full.log", timeout=180)
    proc = start(fedml_prism(cfg, tmp_path / "cut"), tmp_path, "cut.log")
    try:
        wait_for(lambda: (tmp_path / "cut" / "metrics.json").exists() and len(metrics(tmp_path / "cut")) >= 2,
                 timeout=150, what="round 2 of the run to kill")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        stop(proc)
    done = len(metrics(tmp_path / "cut"))
    assert done < 6, "the run finished before it could be killed"
    log = run(fedml_prism(cfg, tmp_path / "cut", "--resume"), tmp_path, "resume.log", timeout=180)
    assert "resumed from" in log
    assert [r["round"] for r in metrics(tmp_path / "cut")] == list(range(1, 7))
    a, b = final_state(tmp_path / "full"), final_state(tmp_path / "cut")
    for key in a:
        assert torch.equal(a[key], b[key]), f"resumed run differs at {key}"


def test_grpc_server_and_two_client_processes(tmp_path) -> None:
    cfg = grpc_config(tmp_path, workers=2, train_args={"client_num_per_round": 6},
                      prism_args={"optimizer_state": "aggregate"})
    made = set(os.listdir(tmp_path))
    run_grpc_job(cfg, tmp_path / "out", tmp_path, workers=2)
    assert_prism_ran(tmp_path / "out", rounds=2, clients=6)
    # fedml.init ran in all three processes (cwd tmp_path, HOME tmp_path): its working directory is
    # OUTPUT_DIR/fedml, and it left nothing in the cwd but our logs and its ~/.fedml
    assert (tmp_path / "out" / "fedml").is_dir()
    left = set(os.listdir(tmp_path)) - made - {"out", "server.log", "client1.log", "client2.log", ".fedml"}
    assert not left, f"FedML wrote {sorted(left)} into the working directory"
    # the safe wire format moves every tensor (momentum included) exactly: the same model as sp
    assert_same_as_sp(tmp_path, tmp_path / "out", train_args={"client_num_per_round": 6},
                      prism_args={"optimizer_state": "aggregate"})


def test_fedml_init_puts_fedml_logs_under_the_output_dir(tmp_path) -> None:
    """``init_fedml`` (every cross-silo and cross-device process) runs FedML from OUTPUT_DIR/fedml, so
    FedML's ``./logs`` land there when FedML writes them (its run logs are off in ``fedml-prism run``;
    here they are switched on as FedML's default would), never in the caller's directory."""
    cfg = grpc_config(tmp_path, workers=1, tracking_args={"output_dir": str(tmp_path / "out")})
    code = (
        "import os, sys\n"
        "from fedml_prism.runtimes.cross_silo.launch import fedml_args\n"
        "from fedml_prism.runtimes.fedml_env import init_fedml\n"
        "from fedml_prism.job import build_job\n"
        "job = build_job(sys.argv[1])\n"
        "args = init_fedml(job, fedml_args(job, 0, 'server', 'logs1'))\n"
        "from fedml.core.mlops.mlops_runtime_log import MLOpsRuntimeLog\n"
        "MLOpsRuntimeLog.get_instance(args).init_logs()\n"
        "import logging; logging.getLogger().warning('prism log check')\n"
        "sys.__stdout__.write(os.getcwd() + '\\n')\n"
    )
    out = run([str(BIN / "python"), "-c", code, str(cfg)], tmp_path, "init.log", timeout=120)
    workdir = tmp_path / "out" / "fedml"
    assert str(workdir) in out
    log_files = set(re.findall(r"(/\S+/fedml-run-\S+\.log):prism log check", out))
    assert log_files == {str(workdir / "logs" / "fedml-run-logs1-edge-0.log")}, out[-2000:]
    assert (workdir / "logs").is_dir() and not (tmp_path / "logs").exists()


def test_grpc_worker_killed_mid_run_server_finishes(tmp_path) -> None:
    cfg = grpc_config(tmp_path, workers=2, train_args={"client_num_per_round": 6, "comm_round": 4},
                      tracking_args={"round_timeout_s": 8})
    out = tmp_path / "out"
    server, clients = start_grpc(cfg, out, tmp_path, workers=2)
    try:
        wait_for(lambda: (out / "metrics.json").exists() and len(metrics(out)) >= 1, timeout=120, what="round 1")
        os.killpg(clients[1].pid, signal.SIGKILL)
        assert server.wait(timeout=150) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert clients[0].wait(timeout=30) == 0
    finally:
        for p in [server, *clients]:
            stop(p)
    rows = metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["clients"] == 6 and rows[-1]["clients"] == 3  # worker 2's three clients are left out
    log = (tmp_path / "server.log").read_text()
    assert "left out" in log or "without them" in log


def test_mqtt_s3_with_mosquitto_and_local_s3(tmp_path) -> None:
    mosquitto = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    assert mosquitto, "mosquitto missing: .ci/run installs it (apt-get install mosquitto)"
    assert (BIN / "moto_server").exists(), "moto_server missing: pip install 'moto[server]'"
    mqtt_port, s3_port = free_ports(2)
    cfg = write_config(
        tmp_path / "mqtt.yaml",
        common_args={"training_type": "cross_silo", "scenario": "horizontal"},
        train_args={"client_num_per_round": 6},
        tracking_args={"output_dir": str(tmp_path / "out"), "round_timeout_s": 60},
        comm_args={
            "backend": "MQTT_S3", "worker_num": 2,
            "customized_training_mqtt_config": {"BROKER_HOST": "127.0.0.1", "BROKER_PORT": mqtt_port,
                                                "MQTT_USER": "", "MQTT_PWD": "", "MQTT_KEEPALIVE": 180},
            "customized_training_s3_config": {"BUCKET_NAME": "fedml-prism", "CN_S3_ENDPOINT": f"http://127.0.0.1:{s3_port}",
                                              "CN_REGION_NAME": "us-east-1", "CN_S3_AKI": "testing", "CN_S3_SAK": "testing"},
        },
    )
    script = Path(__file__).resolve().parents[2] / "run" / "mqtt_s3.sh"
    proc = start(["bash", str(script), str(cfg), "2", "200"], tmp_path, "mqtt.log",
                 extra_env={"MQTT_PORT": str(mqtt_port), "S3_PORT": str(s3_port), "BIN": str(BIN)})
    try:
        assert proc.wait(timeout=220) == 0, (tmp_path / "mqtt.log").read_text()[-3000:]
    finally:
        stop(proc)
    log = (tmp_path / "mqtt.log").read_text()
    assert log.count("FINISHED delivered") == 2 and "did not report FINISHED" not in log
    assert_prism_ran(tmp_path / "out", rounds=2, clients=6)
    assert_same_as_sp(tmp_path, tmp_path / "out", train_args={"client_num_per_round": 6})


def test_octopus_packages_build_offline_and_run_the_job(tmp_path) -> None:
    """``fedml build`` packages of a tiny gRPC job, unpacked and started as Octopus's agents start a
    party (cwd the package's ``fedml/`` folder, ``python <entry_file> --cf <conf_file> --rank R
    --role server|client``): the server and its worker run the job to the end."""
    import zipfile

    import yaml

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    cfg = grpc_config(tmp_path, workers=1, train_args={"client_num_in_total": 4, "client_num_per_round": 2},
                      comm_args={"grpc_ipconfig_path": str(tmp_path / "grpc_ipconfig.csv")},
                      tracking_args={"output_dir": str(out)})
    run(["bash", str(root / "run" / "octopus" / "build.sh"), str(cfg), str(tmp_path / "dist")], tmp_path, "build.log",
        timeout=120)
    commands = {}
    for role, rank in (("server", 0), ("client", 1)):
        package = tmp_path / "dist" / role / "dist-packages" / f"{role}-package.zip"
        zipfile.ZipFile(package).extractall(tmp_path / role)
        base = tmp_path / role / f"{role}-package"
        conf = yaml.safe_load((base / "conf" / "fedml.yaml").read_text())
        entry = base / conf["entry_config"]["entry_file"]
        config = entry.parent / conf["entry_config"]["conf_file"]
        assert entry.exists() and config.exists()
        assert yaml.safe_load(config.read_text()) == yaml.safe_load(cfg.read_text()), "the package carries the job"
        commands[role] = [str(BIN / "python"), str(entry), "--cf", str(config), "--rank", str(rank), "--role", role]
    cwd = {role: tmp_path / role / f"{role}-package" / "fedml" for role in commands}
    server = subprocess.Popen(commands["server"], cwd=cwd["server"], env=env_for(tmp_path), start_new_session=True,
                              stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    procs = [server]
    try:
        wait_for(lambda: "cross-silo GRPC server" in (tmp_path / "server.log").read_text() or server.poll() is not None,
                 timeout=90, what="the packaged server to start")
        time.sleep(1.0)
        client = subprocess.Popen(commands["client"], cwd=cwd["client"], env=env_for(tmp_path), start_new_session=True,
                                  stdout=open(tmp_path / "client.log", "w"), stderr=subprocess.STDOUT)
        procs.append(client)
        assert server.wait(timeout=150) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert client.wait(timeout=30) == 0, (tmp_path / "client.log").read_text()[-3000:]
    finally:
        for p in procs:
            stop(p)
    rows = metrics(out)
    assert [r["round"] for r in rows] == [1, 2] and all(r["clients"] == 2 for r in rows)
    assert (out / "checkpoint.pt").is_file() and (out / "metrics.csv").is_file()


def test_grpc_silent_worker_is_left_out_after_the_round_deadline(tmp_path) -> None:
    # 10 local epochs: a worker spends seconds training, so it can be frozen in the middle of round 2
    cfg = grpc_config(tmp_path, workers=2, train_args={"client_num_per_round": 6, "comm_round": 3, "epochs": 10},
                      tracking_args={"round_timeout_s": 15})
    out = tmp_path / "out"
    server, clients = start_grpc(cfg, out, tmp_path, workers=2)
    try:
        wait_for(lambda: (out / "metrics.json").exists() and len(metrics(out)) >= 1, timeout=120, what="round 1")
        time.sleep(0.3)
        os.killpg(clients[1].pid, signal.SIGSTOP)  # alive but silent: no upload, no FINISHED
        assert server.wait(timeout=180) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        for p in [server, *clients]:
            stop(p)
    rows = metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["clients"] == 6 and all(r["clients"] == 3 for r in rows[1:])
    assert "within 15 s: closing the round without them" in (tmp_path / "server.log").read_text()
