"""``fedml-prism run --cf fedml_config.yaml``: one config, every FedML runtime.

- ``training_type: simulation`` + ``backend: sp``: FedML 0.9.6 ignores custom trainers/aggregators in
  its own sp simulator, so the same ``PrismClientTrainer`` / ``PrismServerAggregator`` are driven
  in-process here, with FedML's args and dataset format.
- ``training_type: cross_silo`` + ``backend: MPI | GRPC | MQTT_S3``: ``FedMLRunner`` with the PriSM
  trainer/aggregator; ``worker_num`` processes serve ``client_num_in_total`` PriSM clients (FedML's own
  client counts are set to the number of worker processes, see :mod:`fedml_prism.fedml_glue`).

The whole config is validated before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from .config import STRATEGIES, PrismConfig
from .data import PARTITIONS, FederatedData, load_federated
from .decompose import little_saving_warning
from .models import check_init_scheme, create_model
from .security import KEYS as SECURITY_KEYS
from .security import SecuritySettings, scrub_logs, secret_values
from .server import RunSettings

log = logging.getLogger("fedml_prism")

RUNTIMES = {
    ("simulation", "sp"), ("cross_silo", "MPI"), ("cross_silo", "GRPC"), ("cross_silo", "MQTT_S3"),
    ("cross_device", "MQTT_S3_MNN"),
}


@dataclass
class Job:
    """Everything a run needs, validated."""

    path: str
    flat: dict[str, Any]
    prism: PrismConfig
    settings: RunSettings
    training_type: str
    backend: str
    dataset: str
    partition_method: str
    partition_alpha: float
    model: str
    model_kwargs: dict[str, Any]
    worker_num: int
    compare: list[str] = field(default_factory=list)
    partition_disjoint: bool = True
    model_init: str = "default"


def read_config(path: str) -> dict[str, dict[str, Any]]:
    """The YAML sections; a missing file or a non-mapping section is an error (FedML ignores both)."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    with open(path) as f:
        try:
            sections = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path!r} is not valid YAML: {err}") from err
    if not isinstance(sections, dict):
        raise ValueError(f"config file {path!r} must be a mapping of sections (common_args:, train_args:, …)")
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise ValueError(f"config section {name!r} must be a mapping of key: value, got {section!r}")
    return sections


def build_job(path: str, output_dir: str | None = None) -> Job:
    return job_from_sections(read_config(path), path, output_dir)


def job_from_sections(sections: dict[str, dict[str, Any]], path: str, output_dir: str | None = None) -> Job:
    """Validate config sections (as read from a fedml_config.yaml) into a :class:`Job`."""
    flat: dict[str, Any] = {}
    for name, section in sections.items():
        if name == "prism_args":
            continue
        flat.update(section)
    prism = PrismConfig.from_mapping(sections.get("prism_args", {}))
    unknown = sorted(set(sections.get("security_args") or {}) - set(SECURITY_KEYS))
    if unknown:
        raise ValueError(f"security_args has unknown key(s) {unknown}: allowed keys are {list(SECURITY_KEYS)}")
    flat.setdefault("random_seed", prism.seed)
    training_type = flat.get("training_type", "simulation")
    backend = flat.get("backend", "sp")
    if (training_type, backend) not in RUNTIMES:
        hint = ""
        if training_type == "simulation" and backend == "MPI":
            hint = " (FedML's MPI simulation ignores custom aggregators: use training_type: cross_silo, backend: MPI)"
        allowed = ", ".join(f"{t}/{b}" for t, b in sorted(RUNTIMES))
        raise ValueError(f"training_type/backend={training_type}/{backend} is invalid: allowed {allowed}{hint}")
    out = output_dir or flat.get("output_dir") or os.path.join("outputs", os.path.splitext(os.path.basename(path))[0])
    settings = RunSettings.from_args(argparse.Namespace(**flat), output_dir=os.path.abspath(out))
    method = flat.get("partition_method", "iid")
    if method not in PARTITIONS + ("natural",):
        raise ValueError(f"partition_method={method!r} is invalid: allowed {', '.join(PARTITIONS)}, natural")
    disjoint = flat.get("partition_disjoint", True)
    if not isinstance(disjoint, bool):
        raise ValueError(f"partition_disjoint={disjoint!r} is invalid: allowed true or false")
    model_init = flat.get("model_init", "default")
    check_init_scheme(model_init)
    compare = list(flat.get("compare_strategies") or [])
    for s in compare:
        if s not in STRATEGIES:
            raise ValueError(f"compare_strategies entry {s!r} is invalid: allowed {', '.join(STRATEGIES)}")
    worker_num = int(flat.get("worker_num", 1))
    if training_type == "cross_silo" and not 1 <= worker_num <= settings.client_num_per_round:
        raise ValueError(
            f"worker_num={worker_num} is invalid: allowed 1 to client_num_per_round={settings.client_num_per_round}"
        )
    job = Job(
        path=os.path.abspath(path), flat=flat, prism=prism, settings=settings, training_type=training_type,
        backend=backend, dataset=flat.get("dataset", "digits"), partition_method=method,
        partition_alpha=float(flat.get("partition_alpha", 0.5)), model=flat.get("model", "cnn"),
        model_kwargs=dict(flat.get("model_kwargs") or {}), worker_num=worker_num, compare=compare,
        partition_disjoint=disjoint, model_init=model_init,
    )
    create_model(job.model, init=job.model_init, **job.model_kwargs)  # fail early on a bad model name or keyword
    if training_type == "cross_device":
        from .cross_device import validate

        validate(job)
    if training_type != "simulation":
        SecuritySettings.from_flat(flat, os.path.dirname(job.path), rank=0)  # files and values, before any work
    return job


def load_data(job: Job) -> FederatedData:
    f = job.flat
    path = f.get("data_path")
    if path and not os.path.isabs(path):
        path = os.path.normpath(os.path.join(os.path.dirname(job.path), path))
    return load_federated(
        job.dataset, job.settings.client_num_in_total, job.partition_method, job.partition_alpha, job.prism.seed,
        data_path=path, samples_per_client=f.get("samples_per_client"), loader_kwargs=f.get("data_kwargs"),
        disjoint=job.partition_disjoint,
    )


def _setup_logging() -> None:
    root = logging.getLogger("fedml_prism")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[fedml_prism] %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


def main(cli: argparse.Namespace) -> int:
    _setup_logging()
    job = build_job(cli.cf, cli.output_dir)
    scrub_logs(secret_values(job.flat))  # FedML logs args.__dict__, broker and S3 credentials included
    if warning := little_saving_warning(create_model(job.model, **job.model_kwargs), job.prism):
        log.warning(warning)
    if getattr(cli, "role", None) == "device" and job.training_type != "cross_device":
        raise ValueError(f"--role device is only for training_type: cross_device, not {job.training_type}")
    if getattr(cli, "check", False):
        print(f"config OK: {job.training_type}/{job.backend}, strategy={job.prism.strategy}, "
              f"keep_ratio={job.prism.keep_ratio}, {job.settings.client_num_in_total} clients, "
              f"{job.settings.client_num_per_round} per round, {job.settings.comm_round} rounds, "
              f"model={job.model}, dataset={job.dataset}, output_dir={job.settings.output_dir}")
        return 0
    if job.training_type == "simulation":
        from .simulation import run_comparison

        run_comparison(job, resume=cli.resume)
        return 0
    if job.training_type == "cross_device":
        from .cross_device import run_device, run_server

        if cli.role == "device":
            if cli.edge_id is None:
                raise ValueError("--role device needs --edge-id (one of client_id_list)")
            return run_device(job, cli.edge_id)
        return run_server(job, run_id=cli.run_id)
    from .cross_silo import run_cross_silo

    return run_cross_silo(job, rank=cli.rank, role=cli.role, run_id=cli.run_id, resume=cli.resume)
