"""Cross-silo runtimes (``training_type: cross_silo``; ``backend: MPI | GRPC | MQTT_S3``).

The server and the workers are FedML's cross-silo managers, set up as ``FedMLRunner`` sets them up
(``server_initializer`` / ``client_initializer``), with two extensions: ``PrismServerManager``
(deadlines, dead workers) and ``PrismClientManager`` (MQTT FINISHED fix). ``PrismServerAggregator``
and ``PrismClientTrainer`` also work when passed to ``FedMLRunner`` directly, without those extensions.

Rank 0 is the server (``PrismServerAggregator``); ranks 1..K are worker processes
(``PrismClientTrainer``), each training the PriSM clients the server assigns it every round. FedML's
own client counts (``client_num_in_total``, ``client_num_per_round``) are set to K here, so FedML's
silo selection sends worker w the bundle keyed w; the PriSM counts stay in the server.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from typing import Any

import torch

from ...engine.server import PrismClient, PrismServer, RunSettings
from ...job import Job, load_data
from ...workloads.models import create_model
from .._fedml_import import silence_fedml_import_warnings
from ..fedml_env import init_fedml, security_settings

log = logging.getLogger("fedml_prism")


def fedml_args(job: Job, rank: int, role: str, run_id: str) -> Any:
    """FedML's ``Arguments`` from the yaml, with ``--rank/--role/--run_id`` winning over it."""
    silence_fedml_import_warnings()
    from fedml.arguments import Arguments

    cmd = argparse.Namespace(
        yaml_config_file=job.path, rank=rank, role=role, run_id=str(run_id), local_rank=0, node_rank=0,
        run_device_id="0", using_mlops=False,
    )
    args = Arguments(cmd, training_type="cross_silo", comm_backend=job.backend, override_cmd_args=False)
    args.training_type = "cross_silo"  # a simulation/MPI job runs on the cross-silo MPI machinery
    args.prism_client_num_in_total = job.settings.client_num_in_total
    args.prism_client_num_per_round = job.settings.client_num_per_round
    args.client_num_in_total = job.worker_num
    args.client_num_per_round = job.worker_num
    args.worker_num = job.worker_num
    args.using_mlops = False
    args.enable_tracking = False
    args.enable_wandb = False
    args.scenario = "horizontal"
    args.federated_optimizer = "FedAvg"  # FedML's cross-silo message protocol; the PriSM aggregator does the math
    args.client_id_list = None
    args.random_seed = job.prism.seed
    for key in ("grpc_ipconfig_path", "customized_training_mqtt_config", "customized_training_s3_config"):
        value = getattr(args, key, None)
        if isinstance(value, str) and value and not os.path.isabs(value):
            setattr(args, key, os.path.join(os.path.dirname(job.path), value))
    args.prism_security = security_settings(job, rank)
    if job.backend == "GRPC":
        args.prism_grpc_addresses = job.grpc_addresses()
    if job.backend == "MQTT_S3":
        args.prism_broker, args.prism_s3 = job.broker(rank), job.s3()
    return args


def _worker_dataset(job: Job, fedml_data: list) -> list:
    """FedML's 8-item list as FedML's cross-silo code indexes it: by worker (data silo) index."""
    workers = range(job.worker_num)
    return [fedml_data[0], fedml_data[1], fedml_data[2], fedml_data[3],
            {w: 1 for w in workers}, {w: None for w in workers}, {w: None for w in workers}, fedml_data[7]]


def run_cross_silo(job: Job, rank: int, role: str, run_id: str, resume: bool = False) -> int:
    """Run this process's party of a cross-silo job: the server on rank 0, a worker otherwise.

    ``resume``: the server continues from ``checkpoint.pt`` in the output dir (written every
    ``checkpoint_every`` rounds), before it makes any sub-model, and FedML's round counter starts at the
    checkpoint's round. Workers hold no state but their data: after a server crash, start fresh ones
    (an ``mpiexec`` job restarts as a whole; ``run/*.sh`` pass ``--resume`` to every party).
    """
    args = init_fedml(job, fedml_args(job, rank, role, run_id))
    device = torch.device("cpu")
    data = load_data(job)
    fedml_data = data.fedml_dataset(job.settings.batch_size)
    model = create_model(job.model, init=job.model_init, **job.model_kwargs)
    dataset = _worker_dataset(job, fedml_data)
    try:
        if args.rank == 0:
            _serve(job, args, model, device, fedml_data, dataset, resume)
        else:
            _work(job, args, model, device, fedml_data, dataset)
    except Exception as err:
        if job.backend == "MPI":
            _abort_mpi_job(args.rank, err)
        raise
    return 0


def _serve(job: Job, args: Any, model: torch.nn.Module, device: torch.device, fedml_data: list, dataset: list,
           resume: bool) -> None:
    """Rank 0: the PriSM server, from its checkpoint when ``resume`` (loaded before any bundle is made)."""
    from ..fedml_glue import PrismServerAggregator

    server = PrismServer(model, job.prism, job.settings, fedml_data[3], device)
    if resume and not server.load_checkpoint():
        log.info("no checkpoint in %s: starting from round 1", job.settings.output_dir)
    aggregator = PrismServerAggregator(model, args, server, workers=job.worker_num)
    log.info("cross-silo %s server: %d PriSM clients, %d per round, %d workers, rounds %d..%d", job.backend,
             job.settings.client_num_in_total, job.settings.client_num_per_round, job.worker_num,
             server.round_idx + 1, job.settings.comm_round)
    _run_server(args, device, dataset, aggregator, job.settings, start_round=server.round_idx)
    log.info("server finished after %d rounds", server.round_idx)


def _work(job: Job, args: Any, model: torch.nn.Module, device: torch.device, fedml_data: list, dataset: list) -> None:
    """Ranks 1..K: a worker training the PriSM clients the server assigns it each round."""
    from ..fedml_glue import PrismClientTrainer
    from .client_manager import run_client

    client = PrismClient(model, job.prism, job.settings, fedml_data[5], device)
    trainer = PrismClientTrainer(model, args, client)
    done = threading.Event()
    _watchdog(trainer, idle_s=job.client_idle_timeout_s, server=_grpc_server_address(args), done=done)
    run_client(args, device, dataset, model, trainer)
    done.set()
    log.info("worker %d finished", args.rank)


def _abort_mpi_job(rank: int, err: Exception) -> None:
    """One rank failed (e.g. a checkpoint written with other prism_args on ``--resume``): end the whole
    ``mpiexec`` job, whose other ranks would otherwise wait for it forever."""
    log.error("rank %d failed: %s: %s; aborting the MPI job", rank, type(err).__name__, err)
    logging.shutdown()
    from mpi4py import MPI

    MPI.COMM_WORLD.Abort(2)


def _run_server(args: Any, device: Any, dataset: list, aggregator: Any, settings: RunSettings,
                start_round: int = 0) -> None:
    """FedML's ``cross_silo/server/server_initializer.py:init_server`` with ``PrismServerManager``
    (deadlines, dead workers, resume at ``start_round``) in place of ``FedMLServerManager``."""
    silence_fedml_import_warnings()
    from fedml.cross_silo.server.fedml_aggregator import FedMLAggregator

    from .server_manager import PrismServerManager

    aggregator.set_id(0)
    fedml_aggregator = FedMLAggregator(
        dataset[2], dataset[3], dataset[0], dataset[5], dataset[6], dataset[4], args.worker_num, device, args,
        aggregator,
    )
    manager = PrismServerManager(args, fedml_aggregator, args.comm, args.rank, args.worker_num, args.backend,
                                 round_timeout_s=settings.round_timeout_s, start_timeout_s=settings.start_timeout_s,
                                 start_round=start_round)
    manager.run()


def _watchdog(trainer: Any, idle_s: float, server: tuple[str, int] | None = None, done: threading.Event | None = None,
              probe_s: float = 1.0, misses: int = 3) -> None:
    """End this worker if the server is silent for ``idle_s`` (FedML's clients wait forever), or, over
    gRPC (``server`` = its host and port), once the server has stopped listening for ``misses`` probes
    ``probe_s`` apart: a crashed server is restarted with ``--resume`` and fresh workers, and a worker
    left from the old run would hold its port and ignore the new server's first round (FedML's client
    accepts one init message per process). Stops watching once ``done`` is set."""
    def watch() -> None:
        missed = 0
        while done is None or not done.is_set():
            time.sleep(min(probe_s if server else 5.0, idle_s / 4))
            if done is not None and done.is_set():
                return
            if time.time() - trainer.last_message_at > idle_s:
                _exit_worker(f"no message from the server for {idle_s:.0f} s")
            if server is not None:
                missed = 0 if _listening(server) else missed + 1
                if missed >= misses:
                    _exit_worker(f"the server at {server[0]}:{server[1]} is gone; start a fresh worker for the "
                                 "restarted server (fedml-prism run ... --role server --resume)")

    threading.Thread(target=watch, daemon=True, name="prism-watchdog").start()


def _exit_worker(reason: str) -> None:
    log.error("%s: worker exits", reason)
    logging.shutdown()
    os._exit(3)


def _grpc_server_address(args: Any) -> tuple[str, int] | None:
    """Where this gRPC worker sends to the server (rank 0's row of ``grpc_ipconfig_path``, its
    ``ingress_ip`` first, as the transport does); ``None`` for other backends."""
    addresses = getattr(args, "prism_grpc_addresses", None)
    if args.backend != "GRPC" or not addresses:
        return None
    host, _, port = addresses[0].target.rpartition(":")
    return host.strip("[]"), int(port)


def _listening(address: tuple[str, int]) -> bool:
    """Whether something accepts TCP connections at ``address`` (a refused or timed-out connect: no)."""
    import socket

    try:
        socket.create_connection(address, timeout=2.0).close()
    except OSError:
        return False
    return True


