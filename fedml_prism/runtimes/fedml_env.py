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
from .security import SecuritySettings, check_network_auth, scrub_logs, secret_values

log = logging.getLogger("fedml_prism")


def security_settings(job: Job, rank: int) -> SecuritySettings:
    """Party ``rank``'s ``security_args`` (checked before any work starts); its key and the job's
    broker and S3 credentials are scrubbed from every log line of this process from now on."""
    settings = SecuritySettings.from_flat(job.flat, os.path.dirname(job.path), rank)
    scrub_logs([*secret_values(job.flat), *([settings.auth_key] if settings.auth_key else [])])
    if job.training_type == "cross_silo" and job.backend in ("GRPC", "MQTT_S3"):
        check_network_auth(settings, network_hosts(job, rank), rank)
    return settings


def network_hosts(job: Job, rank: int) -> dict[str, str]:
    """What party ``rank`` of a gRPC or MQTT_S3 job listens on or connects to: ``{what: host}``
    (the gRPC table checked first: a bad table is named before anything else)."""
    if job.backend == "GRPC":
        from .cross_silo.grpc_transport import check_ipconfig

        table = check_ipconfig(job.flat.get("grpc_ipconfig_path"), os.path.dirname(job.path), job.worker_num)
        peers = [0] if rank else sorted(r for r in table if r)
        return {f"its gRPC listening address (rank {rank})": table[rank].host,
                **{f"the gRPC address of rank {r}": table[r].ingress or table[r].host for r in peers}}
    from types import SimpleNamespace

    from .cross_silo.mqtt_broker import MQTT_SECTION, S3_SECTION, config_section

    def section(name: str) -> dict[str, Any]:  # a mapping, or a yaml file's path relative to the job's folder
        value = job.flat.get(name)
        if isinstance(value, str) and value and not os.path.isabs(value):
            value = os.path.join(os.path.dirname(job.path), value)
        return config_section(SimpleNamespace(**{name: value}), name)

    mqtt, s3 = section(MQTT_SECTION), section(S3_SECTION)
    endpoint = str(s3.get("CN_S3_ENDPOINT") or "https://s3.amazonaws.com")
    return {"the MQTT broker": str(mqtt.get("BROKER_HOST") or ""),
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
    torch.set_num_threads(int(job.flat.get("torch_threads", 1)))
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
