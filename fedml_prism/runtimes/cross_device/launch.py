"""Starting a cross-device party: the PriSM server (:func:`run_server`) or a reference device
(:func:`run_device`) of a job (see :mod:`fedml_prism.runtimes.cross_device`). Imports without FedML;
FedML is imported when a party starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

import torch

from ...engine.server import PrismServer
from ...job import Job, edge_ids, input_shape, load_data
from ...workloads.models import create_model
from .._fedml_import import silence_fedml_import_warnings

log = logging.getLogger("fedml_prism")


def fedml_args(job: Job, run_id: str) -> Any:
    silence_fedml_import_warnings()
    from fedml.arguments import Arguments

    cmd = argparse.Namespace(yaml_config_file=job.path, rank=0, role="server", run_id=str(run_id), local_rank=0,
                             node_rank=0, run_device_id="0", using_mlops=False)
    args = Arguments(cmd, training_type="cross_device", comm_backend="MQTT_S3_MNN", override_cmd_args=False)
    edges = edge_ids(job)
    out = job.settings.output_dir
    args.client_id_list = json.dumps(edges)
    args.client_num_in_total = args.client_num_per_round = len(edges)
    args.worker_num = len(edges)
    args.rank, args.server_id, args.run_id = 0, 0, str(run_id)
    args.using_mlops = args.enable_tracking = args.enable_wandb = False
    args.federated_optimizer = "FedAvg"
    args.model_file_cache_folder = os.path.join(out, "model_file_cache")
    args.global_model_file_path = os.path.join(out, "global_model.mnn")
    os.makedirs(args.model_file_cache_folder, exist_ok=True)
    return args


def run_server(job: Job, run_id: str) -> int:
    """The PriSM cross-device server, until every device has FINISHED (or the deadlines passed)."""
    from ..fedml_env import init_fedml, security_settings
    from .mnn_export import MnnExporter
    from .server_manager import PrismMNNServerManager

    security = security_settings(job, 0)  # max_message_mb; broker and S3 credentials scrubbed from the logs
    args = init_fedml(job, fedml_args(job, run_id))
    data = load_data(job)
    model = create_model(job.model, init=job.model_init, **job.model_kwargs)
    test = data.fedml_dataset(job.settings.batch_size)[3]
    server = PrismServer(model, job.prism, job.settings, test, "cpu")
    exporter = MnnExporter(input_shape(job), seed=job.prism.seed)
    manager = PrismMNNServerManager(args, server, exporter, edge_ids(job), job, job.settings.round_timeout_s,
                                      job.settings.start_timeout_s, security.max_bytes, job.parse_limits)
    log.info("cross-device server: run %s, devices %s, %d rounds, strategy %s keep %.2f", run_id, edge_ids(job),
             job.settings.comm_round, job.prism.strategy, job.prism.keep_ratio)
    manager.run()
    return 0 if server.finished else 1


def run_device(job: Job, edge_id: int) -> int:
    """A reference device (:mod:`fedml_prism.runtimes.cross_device.device`) serving edge ``edge_id`` of this job."""
    from .device import ReferenceDevice

    if edge_id not in edge_ids(job):
        raise ValueError(f"edge id {edge_id} is invalid: allowed {edge_ids(job)} (client_id_list)")
    torch.set_num_threads(job.party_threads)
    data = load_data(job)

    def partition(idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        ds = data.client_dataset(idx)
        return ds.tensors[0], ds.tensors[1]

    cache = os.path.join(job.settings.output_dir, f"device{edge_id}")
    device = ReferenceDevice(edge_id, job.broker(edge_id), job.s3(), partition, data.num_classes, cache,
                             idle_timeout_s=job.client_idle_timeout_s, seed=job.prism.seed)
    return device.run()
