"""A job: one ``fedml_config.yaml`` read and validated into everything a run needs, and its data.

Below every runtime (``runtimes.simulation``, ``runtimes.cross_silo``, ``runtimes.cross_device``) and
the tools: they take a :class:`Job`; nothing here imports them. The whole config is validated before
any work starts (cross-device checks included: :func:`check_cross_device`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from .engine.config import ALL_STRATEGIES, OTHER_METHODS, PrismConfig
from .engine.server import RunSettings
from .runtimes.mnn_sandbox import ParseLimits
from .runtimes.security import KEYS as SECURITY_KEYS
from .runtimes.security import SecuritySettings
from .workloads.data import PARTITIONS, FederatedData, load_federated
from .workloads.models import check_init_scheme, create_model

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
    method_args: dict[str, Any] = field(default_factory=dict)


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
        if name in ("prism_args", "method_args"):
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
        if s not in ALL_STRATEGIES:
            raise ValueError(f"compare_strategies entry {s!r} is invalid: allowed {', '.join(ALL_STRATEGIES)}")
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
        partition_disjoint=disjoint, model_init=model_init, method_args=dict(sections.get("method_args") or {}),
    )
    _check_methods(job)
    create_model(job.model, init=job.model_init, **job.model_kwargs)  # fail early on a bad model name or keyword
    if training_type == "cross_device":
        check_cross_device(job)
    if training_type != "simulation":
        SecuritySettings.from_flat(flat, os.path.dirname(job.path), rank=0)  # files and values, before any work
    return job


def _check_methods(job: Job) -> None:
    """The other methods (``layerwise``, ``fedgkt``, ``superfed``) run in-process only; their options
    (``method_args: {<method>: {...}}``) are checked here, before any work."""
    from .strategies import method_options

    unknown = sorted(set(job.method_args) - set(OTHER_METHODS))
    if unknown:
        raise ValueError(f"method_args has unknown key(s) {unknown}: allowed {list(OTHER_METHODS)}, each a mapping of "
                         "that method's options")
    used = [m for m in [job.prism.strategy, *job.compare] if m in OTHER_METHODS]
    if used and (job.training_type, job.backend) != ("simulation", "sp"):
        raise ValueError(f"strategy={used[0]!r} is invalid for {job.training_type}/{job.backend}: allowed simulation/sp "
                         "(the other methods have their own in-process training loop)")
    for name in used:
        method_options(name, job.method_args.get(name))


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


def edge_ids(job: Job) -> list[int]:
    """The devices' edge ids: ``client_id_list`` (a list or FedML's JSON string) or 1..client_num_in_total."""
    raw = job.flat.get("client_id_list")
    if raw in (None, "", "[]"):
        return list(range(1, job.settings.client_num_in_total + 1))
    ids = json.loads(raw) if isinstance(raw, str) else list(raw)
    return [int(i) for i in ids]


def input_shape(job: Job) -> tuple[int, ...]:
    """The model's input ``[C, H, W]`` (``input_shape``, or from the built-in models' keywords)."""
    shape = job.flat.get("input_shape")
    if shape is None:
        kw = job.model_kwargs
        size = kw.get("image_size", 32)
        shape = (kw.get("in_channels", 1 if job.model == "cnn" else 3), size, size)
    return tuple(int(d) for d in shape)


def check_cross_device(job: Job) -> None:
    """Cross-device specific checks, before any work starts."""
    ids = edge_ids(job)
    n = job.settings.client_num_in_total
    if len(ids) != n or len(set(ids)) != n:
        raise ValueError(f"client_id_list={ids} is invalid: allowed {n} distinct edge ids (client_num_in_total={n}),"
                         " one per device; device i trains data partition i")
    for key in ("customized_training_mqtt_config", "customized_training_s3_config"):
        if not isinstance(job.flat.get(key), dict):
            raise ValueError(f"{key} is missing: cross_device needs the broker and S3 settings in comm_args")
    if job.prism.optimizer_state != "reset":
        raise ValueError(f"optimizer_state={job.prism.optimizer_state!r} is invalid for cross_device: allowed reset"
                         " (MNN devices train with their own optimizer and return no momentum buffers)")
    if len(input_shape(job)) != 3:
        raise ValueError(f"input_shape={input_shape(job)} is invalid: cross_device exports image models [C, H, W]")
    ParseLimits.from_flat(job.flat)  # mnn_parse_timeout_s / mnn_parse_memory_mb
