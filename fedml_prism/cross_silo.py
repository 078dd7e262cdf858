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

from .models import create_model
from .runner import Job, load_data
from .server import PrismClient, PrismServer, RunSettings

log = logging.getLogger("fedml_prism")


def fedml_args(job: Job, rank: int, role: str, run_id: str) -> Any:
    """FedML's ``Arguments`` from the yaml, with ``--rank/--role/--run_id`` winning over it."""
    from fedml.arguments import Arguments

    cmd = argparse.Namespace(
        yaml_config_file=job.path, rank=rank, role=role, run_id=str(run_id), local_rank=0, node_rank=0,
        run_device_id="0", using_mlops=False,
    )
    args = Arguments(cmd, training_type="cross_silo", comm_backend=job.backend, override_cmd_args=False)
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
    return args


def init_fedml(job: Job, args: Any) -> Any:
    """``fedml.init`` for one process of a job: offline, FedML's ``./logs`` under OUTPUT_DIR/fedml, quiet
    logging, the job's thread count and seed. Returns FedML's args."""
    import fedml

    workdir = os.path.join(job.settings.output_dir, "fedml")  # FedML writes ./logs: keep it out of the cwd
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    _offline_mlops()
    args = fedml.init(args, check_env=False, should_init_logs=False)
    _quiet_fedml()
    torch.set_num_threads(int(job.flat.get("torch_threads", 1)))
    torch.manual_seed(job.prism.seed)
    return args


def _worker_dataset(job: Job, fedml_data: list) -> list:
    """FedML's 8-item list as FedML's cross-silo code indexes it: by worker (data silo) index."""
    workers = range(job.worker_num)
    return [fedml_data[0], fedml_data[1], fedml_data[2], fedml_data[3],
            {w: 1 for w in workers}, {w: None for w in workers}, {w: None for w in workers}, fedml_data[7]]


def run_cross_silo(job: Job, rank: int, role: str, run_id: str) -> int:

    from .client_manager import run_client
    from .fedml_glue import PrismClientTrainer, PrismServerAggregator

    args = init_fedml(job, fedml_args(job, rank, role, run_id))
    device = torch.device("cpu")
    data = load_data(job)
    fedml_data = data.fedml_dataset(job.settings.batch_size)
    model = create_model(job.model, init=job.model_init, **job.model_kwargs)
    dataset = _worker_dataset(job, fedml_data)
    if args.rank == 0:
        server = PrismServer(model, job.prism, job.settings, fedml_data[3], device)
        aggregator = PrismServerAggregator(model, args, server, workers=job.worker_num)
        log.info("cross-silo %s server: %d PriSM clients, %d per round, %d workers", job.backend,
                 job.settings.client_num_in_total, job.settings.client_num_per_round, job.worker_num)
        _run_server(args, device, dataset, aggregator, job.settings)
        log.info("server finished after %d rounds", server.round_idx)
    else:
        client = PrismClient(model, job.prism, job.settings, fedml_data[5], device)
        trainer = PrismClientTrainer(model, args, client)
        _watchdog(trainer, idle_s=float(job.flat.get("client_idle_timeout_s", 2 * job.settings.round_timeout_s + 60)))
        run_client(args, device, dataset, model, trainer)
        log.info("worker %d finished", args.rank)
    return 0


def _run_server(args: Any, device: Any, dataset: list, aggregator: Any, settings: RunSettings) -> None:
    """FedML's ``cross_silo/server/server_initializer.py:init_server`` with ``PrismServerManager``
    (deadlines, dead workers) in place of ``FedMLServerManager``."""
    from fedml.cross_silo.server.fedml_aggregator import FedMLAggregator

    from .server_manager import PrismServerManager

    aggregator.set_id(0)
    fedml_aggregator = FedMLAggregator(
        dataset[2], dataset[3], dataset[0], dataset[5], dataset[6], dataset[4], args.worker_num, device, args,
        aggregator,
    )
    manager = PrismServerManager(args, fedml_aggregator, args.comm, args.rank, args.worker_num, args.backend,
                                 round_timeout_s=settings.round_timeout_s, start_timeout_s=settings.start_timeout_s)
    manager.run()


def _watchdog(trainer: Any, idle_s: float) -> None:
    """End this worker if the server is silent for ``idle_s`` (FedML's clients wait forever)."""
    def watch() -> None:
        while True:
            time.sleep(min(5.0, idle_s / 4))
            if time.time() - trainer.last_message_at > idle_s:
                log.error("no message from the server for %.0f s: worker exits", idle_s)
                logging.shutdown()
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="prism-watchdog").start()


def _offline_mlops() -> None:
    """Keep FedML from calling its cloud when ``using_mlops`` is off.

    ``fedml.init`` → ``fedml/core/mlops/__init__.py:106`` always runs ``fetch_config``, which retries
    https://open.fedml.ai five times and prints a failure each time. Replace it, for this process only,
    with the part that does not touch the network (the attributes later code reads).
    """
    import platform

    from fedml.core import mlops

    def fetch_config_offline(args: Any, version: str = "release") -> None:
        args.current_running_dir = os.getcwd()
        args.os_name = "MacOS" if platform.system() == "Darwin" else platform.system()
        args.version = args.config_version = version
        args.log_file_dir = os.path.join(os.getcwd(), "logs")
        args.device_id = f"fedml-prism-{args.rank}"
        args.cloud_region = ""

    mlops.fetch_config = fetch_config_offline


def _quiet_fedml() -> None:
    """FedML logs every message at INFO on the root logger; keep only its warnings."""
    logging.getLogger().setLevel(logging.WARNING)
