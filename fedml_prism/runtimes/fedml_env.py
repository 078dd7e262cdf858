"""FedML's process environment for PriSM's runtimes: ``fedml.init`` offline and quiet, and each party's
security settings (checked before any work; credentials scrubbed from the logs from then on).

Below the runtimes that use it (cross-silo, cross-device, the FedML glue's ``offline()``).
"""

from __future__ import annotations

import logging
import os
from typing import Any
from urllib.parse import urlsplit

import torch

from ..job import Job
from ._fedml_import import silence_fedml_import_warnings
from .security import SecuritySettings, check_network_auth, scrub_logs

log = logging.getLogger("fedml_prism")


def security_settings(job: Job, rank: int) -> SecuritySettings:
    """Party ``rank``'s ``security_args`` (checked before any work starts); its key and the job's
    broker and S3 credentials are scrubbed from every log line of this process from now on."""
    settings = job.security(rank)
    scrub_logs([*job.secret_values(), *([settings.auth_key] if settings.auth_key else [])])
    if job.training_type == "cross_silo" and job.backend in ("GRPC", "MQTT_S3"):
        check_network_auth(settings, network_hosts(job, rank), rank)
    return settings


def network_hosts(job: Job, rank: int) -> dict[str, str]:
    """What party ``rank`` of a gRPC or MQTT_S3 job listens on or connects to: ``{what: host}``
    (the gRPC table checked first: a bad table is named before anything else)."""
    if job.backend == "GRPC":
        table = job.grpc_addresses()
        peers = [0] if rank else sorted(r for r in table if r)
        return {f"its gRPC listening address (rank {rank})": table[rank].host,
                **{f"the gRPC address of rank {r}": table[r].ingress or table[r].host for r in peers}}
    endpoint = job.s3().endpoint or "https://s3.amazonaws.com"
    return {"the MQTT broker": job.broker(rank).host,
            "the S3 endpoint": urlsplit(endpoint if "//" in endpoint else f"//{endpoint}").hostname or endpoint}


def init_fedml(job: Job, args: Any) -> Any:
    """``fedml.init`` for one process of a job: offline, FedML's ``./logs`` under OUTPUT_DIR/fedml, quiet
    logging, the job's thread count and seed. Returns FedML's args."""
    silence_fedml_import_warnings()
    import fedml

    workdir = os.path.join(job.settings.output_dir, "fedml")  # FedML writes ./logs: keep it out of the cwd
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    _offline_mlops()
    args = fedml.init(args, check_env=False, should_init_logs=False)
    _quiet_fedml()
    torch.set_num_threads(job.party_threads)
    torch.manual_seed(job.prism.seed)
    return args


def _offline_mlops() -> None:
    """Keep FedML from calling its cloud when ``using_mlops`` is off.

    ``fedml.init`` → ``fedml/core/mlops/__init__.py:106`` always runs ``fetch_config``, which retries
    https://open.fedml.ai five times and prints a failure each time. Replace it, for this process only,
    with the part that does not touch the network (the attributes later code reads).
    """
    import platform

    silence_fedml_import_warnings()
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
