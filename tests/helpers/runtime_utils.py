"""Helpers for the end-to-end runtime tests: small configs, processes with timeouts, checkpoints."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from fedml_prism import PrincipalModel, PrismConfig
from fedml_prism.workloads.models import create_model

BIN = Path(sys.executable).parent
HELPERS = Path(__file__).resolve().parent  # tests/helpers: these modules and the rogue scripts
REPO = HELPERS.parents[1]
MODEL_KWARGS = {"in_channels": 1, "image_size": 8, "width": 0.25, "hidden": 32, "num_classes": 10}

BASE: dict[str, dict[str, Any]] = {
    "common_args": {"training_type": "simulation", "random_seed": 0},
    "data_args": {"dataset": "digits", "partition_method": "iid"},
    "model_args": {"model": "cnn", "model_kwargs": MODEL_KWARGS},
    "train_args": {
        "federated_optimizer": "FedAvg", "client_num_in_total": 12, "client_num_per_round": 4, "comm_round": 2,
        "epochs": 1, "batch_size": 16, "learning_rate": 0.05, "torch_threads": 1,
    },
    "validation_args": {"frequency_of_the_test": 1},
    "device_args": {"using_gpu": False},
    "comm_args": {"backend": "sp"},
    "tracking_args": {"using_mlops": False, "enable_tracking": False, "enable_wandb": False, "checkpoint_every": 1},
    "prism_args": {"strategy": "prism", "keep_ratio": 0.3, "kappa": 2.5, "seed": 3},
}


def write_config(path: Path, **sections: dict[str, Any]) -> Path:
    cfg = copy.deepcopy(BASE)
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def env_for(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HOME=str(tmp), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def helpers_env() -> dict[str, str]:
    """``PYTHONPATH`` for a process that imports the test helpers (``runtime_utils``, ``hostile_utils``): a
    rogue script of tests/helpers/, or a test file run as a script. The repository comes second."""
    return {"PYTHONPATH": os.pathsep.join([str(HELPERS), str(REPO)])}


def start(cmd: list[str], tmp: Path, log_name: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """A process in its own session, its output in tmp/log_name."""
    out = open(tmp / log_name, "w")
    env = {**env_for(tmp), **(extra_env or {})}
    return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """End a process we started, and its children, by process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def run(cmd: list[str], tmp: Path, log_name: str, timeout: float) -> str:
    proc = start(cmd, tmp, log_name)
    try:
        proc.wait(timeout=timeout)
    finally:
        stop(proc)
    text = (tmp / log_name).read_text()
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{text[-4000:]}"
    return text


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def metrics(out_dir: Path) -> list[dict[str, Any]]:
    return json.loads((out_dir / "metrics.json").read_text())


def final_state(out_dir: Path) -> dict[str, torch.Tensor]:
    """Dense weights of the checkpointed global model."""
    state = torch.load(out_dir / "checkpoint.pt", weights_only=True)["server"]
    cfg = PrismConfig.from_mapping(state["config"])
    pm = PrincipalModel(create_model("cnn", **MODEL_KWARGS), cfg)
    pm.load_state_dict(state)
    return pm.dense_state_dict()


def initial_state(seed: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    pm = PrincipalModel(create_model("cnn", **MODEL_KWARGS), PrismConfig(seed=seed, keep_ratio=0.3))
    return pm.dense_state_dict()


def assert_prism_ran(out_dir: Path, rounds: int, clients: int) -> None:
    rows = metrics(out_dir)
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for r in rows:
        assert r["strategy"] == "prism" and r["clients"] == clients and 0 < r["coverage"] <= 1
        assert r["distinct_submodels"] == clients, "clients should receive different sub-models"
        assert r["bytes_up"] > 0 and r["test_acc"] == r["test_acc"]
    before, after = initial_state(), final_state(out_dir)
    assert any(not torch.allclose(before[k], after[k]) for k in before), "the global model did not change"


def free_ports(n: int) -> list[int]:
    import socket

    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def grpc_config(tmp: Path, workers: int, **sections: dict[str, Any]) -> Path:
    ports = free_ports(workers + 1)
    rows = ["eid,rank,grpc_server_ip,grpc_server_port"] + [f"{r},{r},127.0.0.1,{p}" for r, p in enumerate(ports)]
    (tmp / "grpc_ipconfig.csv").write_text("\n".join(rows) + "\n")
    comm = {"backend": "GRPC", "worker_num": workers, "grpc_ipconfig_path": "grpc_ipconfig.csv"}
    comm.update(sections.pop("comm_args", {}))
    return write_config(tmp / "grpc.yaml", common_args={"training_type": "cross_silo", "scenario": "horizontal"},
                        comm_args=comm, **sections)


def start_grpc(cfg: Path, out: Path, tmp: Path, workers: int) -> tuple[subprocess.Popen, list[subprocess.Popen]]:
    """Server first (FedML's gRPC clients crash if they start before it), then the workers."""
    cli = [str(BIN / "fedml-prism"), "run", "--cf", str(cfg), "--output-dir", str(out), "--run_id", "t"]
    server = start([*cli, "--rank", "0", "--role", "server"], tmp, "server.log")
    wait_for(lambda: "cross-silo GRPC server" in (tmp / "server.log").read_text() or server.poll() is not None,
             timeout=90, what="the gRPC server to start")
    time.sleep(1.0)
    clients = [start([*cli, "--rank", str(r), "--role", "client"], tmp, f"client{r}.log") for r in range(1, workers + 1)]
    return server, clients


def checkpoint_round(out_dir: Path) -> int:
    """Rounds aggregated in ``out_dir/checkpoint.pt`` (0 when there is none yet)."""
    path = out_dir / "checkpoint.pt"
    if not path.exists():
        return 0
    return int(torch.load(path, weights_only=True)["server"]["rounds_done"])


def checkpoint_metrics(out_dir: Path) -> list[dict[str, Any]]:
    """The metrics rows saved in ``out_dir/checkpoint.pt`` (the rounds a resumed run starts after)."""
    return list(torch.load(out_dir / "checkpoint.pt", weights_only=True)["metrics"])


def start_grpc_parties(cfg: Path, out: Path, tmp: Path, workers: int, *extra: str,
                       tag: str = "") -> tuple[subprocess.Popen, list[subprocess.Popen]]:
    """:func:`start_grpc` with ``extra`` arguments for every party (e.g. ``--resume``) and logs
    ``server{tag}.log`` / ``client{rank}{tag}.log``, so a restarted job keeps the first job's logs."""
    server = start_grpc_server(cfg, out, tmp, *extra, tag=tag)
    time.sleep(1.0)
    return server, start_grpc_workers(cfg, out, tmp, workers, *extra, tag=tag)


def _party_cli(cfg: Path, out: Path, extra: tuple[str, ...]) -> list[str]:
    return [str(BIN / "fedml-prism"), "run", "--cf", str(cfg), "--output-dir", str(out), "--run_id", "t", *extra]


def start_grpc_server(cfg: Path, out: Path, tmp: Path, *extra: str, tag: str = "") -> subprocess.Popen:
    """The server (rank 0) of a gRPC job, once it has logged its start (log ``server{tag}.log``)."""
    server_log = tmp / f"server{tag}.log"
    server = start([*_party_cli(cfg, out, extra), "--rank", "0", "--role", "server"], tmp, server_log.name)
    wait_for(lambda: "cross-silo GRPC server" in server_log.read_text() or server.poll() is not None,
             timeout=90, what="the gRPC server to start")
    return server


def start_grpc_workers(cfg: Path, out: Path, tmp: Path, workers: int, *extra: str,
                       tag: str = "") -> list[subprocess.Popen]:
    """Workers 1..``workers`` of a gRPC job (logs ``client{rank}{tag}.log``); start the server first."""
    cli = _party_cli(cfg, out, extra)
    return [start([*cli, "--rank", str(r), "--role", "client"], tmp, f"client{r}{tag}.log") for r in range(1, workers + 1)]


def assert_same_as_sp(tmp: Path, out_dir: Path, **sections: dict[str, Any]) -> None:
    """The job of ``sections`` run in-process (sp) reaches the same global model and accuracies as the
    distributed run whose output is ``out_dir``: the transport moves tensors exactly."""
    sp_cfg = write_config(tmp / "sp_reference.yaml", **sections)
    cmd = [str(BIN / "fedml-prism"), "run", "--cf", str(sp_cfg), "--output-dir", str(tmp / "sp_reference")]
    run(cmd, tmp, "sp_reference.log", timeout=180)
    sp, dist = final_state(tmp / "sp_reference"), final_state(out_dir)
    assert sp.keys() == dist.keys()
    for key in sp:
        assert torch.allclose(sp[key], dist[key], atol=1e-5), f"sp and {out_dir.name} differ at {key}"
    sp_acc = [r["test_acc"] for r in metrics(tmp / "sp_reference")]
    dist_acc = [r["test_acc"] for r in metrics(out_dir)]
    assert len(sp_acc) == len(dist_acc) and all(abs(a - b) <= 1e-3 for a, b in zip(sp_acc, dist_acc, strict=True))


def mosquitto_path() -> str:
    """The mosquitto binary (and moto_server for the local S3 endpoint), or a clear failure."""
    import shutil

    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    assert path, "mosquitto missing: .ci/run installs it (apt-get install mosquitto)"
    assert (BIN / "moto_server").exists(), "moto_server missing: pip install 'moto[server]'"
    return path


def start_broker_and_s3(tmp: Path, mqtt_port: int, s3_port: int,
                        broker_args: list[str] | None = None) -> tuple[list[subprocess.Popen], Any]:
    """mosquitto (``-p mqtt_port``, or ``broker_args``) and moto_server on ``s3_port``, with the bucket
    ``fedml-prism`` made. Returns the processes (stop them with :func:`stop`) and a boto3 S3 client."""
    import boto3

    procs = [start([mosquitto_path(), *(broker_args or ["-p", str(mqtt_port)])], tmp, "mosquitto.log"),
             start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], tmp, "s3.log")]
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}", aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")

    def bucket_made() -> bool:
        try:
            s3.create_bucket(Bucket="fedml-prism")
            return True
        except Exception:  # noqa: BLE001 - the endpoint is not up yet
            return False

    try:
        wait_for(bucket_made, 60, "the local S3 endpoint")
    except BaseException:
        for p in procs:
            stop(p)
        raise
    return procs, s3


def run_grpc_job(cfg: Path, out: Path, tmp: Path, workers: int) -> None:
    """A whole gRPC job (server, then ``workers`` workers): every party must exit 0."""
    server, clients = start_grpc(cfg, out, tmp, workers=workers)
    try:
        assert server.wait(timeout=150) == 0, (tmp / "server.log").read_text()[-3000:]
        for c in clients:
            assert c.wait(timeout=30) == 0
    finally:
        for p in [server, *clients]:
            stop(p)


#: channels of one process share a connection unless each has a subchannel pool of its own
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


class IdleCalls:
    """``count`` calls to ``target``'s FedML ``sendMessage`` whose request message never comes (a stream-unary
    call whose request stream never yields), each on a connection of its own (``shared``: all on one); a
    call the listener ends is recorded in ``ended`` (status code, seconds open) and, with ``reopen``,
    opened again. ``credentials``/``options``: a TLS channel (e.g. another party's certificate)."""

    METHOD = "/gRPCCommManager/sendMessage"

    def __init__(self, target: str, count: int, reopen: bool = True, shared: bool = False, credentials: Any = None,
                 options: list[tuple[str, Any]] | None = None) -> None:
        import grpc

        self._grpc, self.target, self.ended, self._reopen = grpc, target, [], reopen
        self._credentials, self._options = credentials, [*OWN_CONNECTION, *(options or [])]
        self._lock, self._stopping, self._channels = threading.Lock(), threading.Event(), []
        self._shared = self._channel() if shared else None
        for _ in range(count):
            self._open()

    def _channel(self) -> Any:
        if self._credentials is None:
            return self._grpc.insecure_channel(self.target, options=self._options)
        return self._grpc.secure_channel(self.target, self._credentials, options=self._options)

    def _open(self) -> None:
        channel = self._shared or self._channel()
        with self._lock:
            self._channels.append(channel)
        self._grpc.channel_ready_future(channel).result(timeout=10)  # connected: the call's headers leave at once
        release = threading.Event()

        def withheld():  # never yields: the listener waits for a message that never comes
            release.wait()
            return
            yield b""  # noqa: B901 - makes this a generator

        method = channel.stream_unary(self.METHOD, request_serializer=bytes, response_deserializer=bytes)
        call = method.future(withheld())
        opened = time.monotonic()

        def ended(done: Any) -> None:
            release.set()
            with self._lock:
                self.ended.append((done.code(), time.monotonic() - opened))
            if self._reopen and not self._stopping.is_set():
                threading.Thread(target=self._reopen_quietly, daemon=True).start()

        call.add_done_callback(ended)

    def _reopen_quietly(self) -> None:
        try:
            self._open()
        except self._grpc.FutureTimeoutError:  # the listener is gone (its process ended): nothing to hold
            pass

    def close(self) -> None:
        self._stopping.set()
        with self._lock:
            channels = list(self._channels)
        for channel in channels:
            channel.close()


def mqtt_args(run_id: str, mqtt: Any, s3: Any, base_dir: str = ".", rank: int = 0) -> Any:
    """FedML's args of an MQTT_S3 party as ``fedml_args`` leaves them: the broker and bucket resolved
    (``Job.broker`` / ``Job.s3``) from the two config sections."""
    import argparse

    from fedml_prism.settings.mqtt import MQTT_SECTION, S3_SECTION, BrokerSettings, S3Settings, config_section

    return argparse.Namespace(
        run_id=run_id, prism_broker=BrokerSettings.from_config(config_section(mqtt, MQTT_SECTION, base_dir), base_dir, rank),
        prism_s3=S3Settings.from_config(config_section(s3, S3_SECTION, base_dir)))
