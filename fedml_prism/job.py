"""A job: one ``fedml_config.yaml`` read and validated into everything a run needs, and its data.

Below every runtime (``runtimes.simulation``, ``runtimes.cross_silo``, ``runtimes.cross_device``) and
the tools: they take a :class:`Job`; nothing here imports them. The whole config is validated before
any work starts (cross-device checks included: :func:`check_cross_device`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any

from .engine.config import PrismConfig
from .engine.server import RunSettings
from .settings.config_file import read_config
from .settings.grpc import GrpcAddress, check_ipconfig
from .settings.limits import ParseLimits
from .settings.mqtt import MQTT_SECTION, S3_SECTION, SECRET_FIELDS, BrokerSettings, S3Settings, config_section
from .settings.security import KEY_ENV, SecuritySettings
from .settings.security import KEYS as SECURITY_KEYS
from .strategies import ALL_STRATEGIES, OTHER_METHODS
from .workloads.data import PARTITIONS, FederatedData, load_federated
from .workloads.models import check_init_scheme, create_model

log = logging.getLogger("fedml_prism")

#: torch threads of a party of a multi-process job when ``torch_threads`` is not set
PARTY_THREADS = 1
#: ``train_args.parallel_clients`` (:mod:`fedml_prism.runtimes.parallel`)
PARALLEL_MODES = ("auto", "sequential", "processes", "vectorized")


RUNTIMES = {
    ("simulation", "sp"), ("simulation", "MPI"), ("cross_silo", "MPI"), ("cross_silo", "GRPC"), ("cross_silo", "MQTT_S3"),
    ("cross_device", "MQTT_S3_MNN"),
}


#: The keys FedML 0.9.6 reads from a fedml_config.yaml. FedML loads every section flat onto ``args``, so a
#: key counts in any section. Collected from the installed ``fedml`` 0.9.6 package: the keys of its example
#: configs (``fedml/config/simulation_sp``, ``fedml/config/simulaton_mpi`` and the MLOps client and server
#: packages' ``fedml_config.yaml``), the flags of ``fedml/arguments.py``, and every attribute its code reads
#: off an ``args`` object (``args.X``, ``self.args.X``, ``getattr(args, "X")``); names that are no keys
#: (``self``, list methods) left out.
FEDML_KEYS = frozenset("""
    C account_id action agent_config alpha api_key arch arch_learning_rate arch_weight_decay attack_case
    attack_iteration_idxs attack_mode attack_prob attack_round_num attack_training_rounds attack_type auxiliary
    auxiliary_weight b_symmetric backbone backbone_freezed backbone_pretrained backend batch_idx batch_size
    bootstrap byzantine_client_num checkname ci client_id client_id_list client_idx client_model
    client_num_in_total client_num_per_round client_optimizer clipping clipping_norm cloud_region comm
    comm_round config_version contribution_alg cpu_transfer cuda_rpc_gpu_mapping current_device_id
    current_running_dir custom_logger customized_training_mqtt_config customized_training_s3_config
    customized_training_thetastore_config customized_training_web3_config cutout cutout_length dampening data
    data_cache_dir data_col_idx data_file_path data_parallel data_silo_config dataset deeplearning_backend
    defense_type delta device device_id device_type distribution dp_solution_type drop_path_prob early_stopping
    edge_id enable_attack enable_contribution enable_cuda_rpc enable_defense enable_dp enable_fhe
    enable_rdp_accountant enable_tracking enable_wandb end_point_id end_point_name endpoint_id env_version
    environment_hetero_ratio epoch epochs epochs_client epochs_server epsilon evaluation_frequency
    extra_save_steps extra_url extract_feat fa_task feddyn_alpha federated_optimizer fedprox_mu fl_trainer flag
    fraction freeze_bn frequency_of_the_test frequency_of_train_acc_report general_edge_id
    global_model_file_path gmf gpu gpu_hetero_ratio gpu_id gpu_mapping_file gpu_mapping_key gpu_num_per_server
    gpu_server_num gpu_util_parse grad_clip group_comm_round group_method group_num group_server_id_list
    grpc_ipconfig_path infer_port infer_url init_channels initialize_all_clients is_browser is_from_docker
    is_mobile iteration_number k lambda_train_regularizer lambda_valid_regularizer latency launcher_rdzv_port
    layers learning_rate learning_rate_min local_iterations local_on_premise_platform_host
    local_on_premise_platform_port local_rank log_file_dir log_file_path log_server_url loss_type lr
    lr_decay_rate lr_milestones lr_schedule lr_scheduler lr_step_size main_process_first malicious_client_id
    manual_launch marketplace_type master_address max_grad_norm max_seq_length max_word_len mechanism_type
    metric mimelite ml_engine mlops_api_key mlops_project_name mlops_run_name mode model model_file_cache_folder
    model_id model_name model_path model_type model_version momentum mqtt_config_path mu multi_gpu_server
    n_node_in_silo n_proc_in_silo n_proc_per_node name nesterov network_interface no_bn_wd no_gpu_check
    node_addresses node_rank noise_multiplier num num_images optimizer original_class_list os_name output_dir
    outstride part_file partition_alpha partition_file_path partition_method pg_master_address pg_master_port
    poison_end_round_id poison_start_round_id poison_type poisoned_training_round precision_parameter
    price_per_hour prime_number private_local_data proc_rank_in_silo process_id protected_layers random_seed
    rank rank_in_node ratio_of_poisoned_client rdp_alpha redis_addr redis_password redis_port report_freq role
    round_idx run_device_id run_id run_name runner_cmd runtime_est_mode s3_config_path save save_client_model
    save_model save_on_each_node save_strategy scale_factor_S scenario seed sensitivity seperator
    server_agent_id server_id server_lr server_momentum server_optimizer should_save sigma
    simulation_environment_hetero simulation_gpu_hetero simulation_schedule simulator_daemon skip_log_model_net
    stage subdir sweep sync_bn synthetic_data_url sys_perf_profiling target_class_list temperature test
    test_batch_size test_on_clients test_size time_varying topology_neighbors_num_directed
    topology_neighbors_num_undirected train_data_num_in_total train_portion train_size training_type
    trpc_master_config_path type unique_device_id use_all_data use_updates user user_name using_gpu using_mlops
    version wandb_entity wandb_group_id wandb_key wandb_name wandb_only_server wandb_project wd weight_decay
    whether_distill_on_the_server whether_training_on_client worker_num yaml_config_file
""".split())
#: The keys of FedML's sections fedml_prism reads besides :class:`RunSettings`' fields and ``security_args``'
#: keys: the job (this module), the runtimes (``torch_threads``, ``device``, ``client_idle_timeout_s``,
#: ``grpc_ipconfig_path``; ``train_size`` / ``test_size`` in the cross-device run announcement) and the MNN
#: parse limits (:class:`~fedml_prism.settings.limits.ParseLimits`).
PRISM_KEYS = frozenset("""
    backend client_id_list client_idle_timeout_s compare_strategies customized_training_mqtt_config
    customized_training_s3_config data_kwargs data_path dataset device grpc_ipconfig_path input_shape
    mnn_parse_memory_mb mnn_parse_timeout_s model model_init model_kwargs output_dir parallel_clients
    parallel_processes partition_alpha partition_disjoint partition_method random_seed samples_per_client
    strict_config test_size torch_threads train_size training_type using_gpu worker_num
""".split()) | {f.name for f in fields(RunSettings)} | set(SECURITY_KEYS)
#: Sections whose keys are checked where they are read: PrismConfig, the other methods' options, SecuritySettings.
CHECKED_SECTIONS = ("prism_args", "method_args", "security_args")


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
    #: one line per key of FedML's sections that nothing reads (:func:`unread_keys`)
    unread: list[str] = field(default_factory=list)
    #: ``torch_threads`` (None: torch's default in one process, :data:`PARTY_THREADS` in a party of many)
    threads: int | None = None
    #: a worker (or reference device) exits after this long without a server message
    client_idle_timeout_s: float = 0.0
    #: ``device`` when ``using_gpu``, else ``cpu``
    device: str = "cpu"
    #: FedML's ``train_size`` / ``test_size`` (announced to cross-device SDK devices)
    train_size: int = 0
    test_size: int = 0
    #: cross-device: limits of the sandboxed parse of a device's graph
    parse_limits: ParseLimits = field(default_factory=ParseLimits)
    #: simulation: how a round's clients train (``runtimes.parallel``: auto, sequential, processes, vectorized)
    parallel_clients: str = "sequential"
    #: ``parallel_clients: processes``: worker processes (None: one per core, at most the clients per round)
    parallel_processes: int | None = None

    @property
    def folder(self) -> str:
        """The config file's folder: relative paths in the config are relative to it."""
        return os.path.dirname(self.path)

    @property
    def party_threads(self) -> int:
        """Torch threads of one party of a multi-process job (they share the machine)."""
        return self.threads or PARTY_THREADS

    def security(self, rank: int) -> SecuritySettings:
        """Party ``rank``'s ``security_args`` (key files, TLS files, size cap), checked."""
        return SecuritySettings.from_flat(self.flat, self.folder, rank)

    def grpc_addresses(self) -> dict[int, GrpcAddress]:
        """Every party's row of ``grpc_ipconfig_path``, checked."""
        return check_ipconfig(self.flat.get("grpc_ipconfig_path"), self.folder, self.worker_num)

    def broker(self, rank: int) -> BrokerSettings:
        """The MQTT broker as party ``rank`` reaches it (``customized_training_mqtt_config``)."""
        return BrokerSettings.from_config(config_section(self.flat.get(MQTT_SECTION), MQTT_SECTION, self.folder),
                                          self.folder, rank)

    def s3(self) -> S3Settings:
        """The bucket of an MQTT_S3 job (``customized_training_s3_config``)."""
        return S3Settings.from_config(config_section(self.flat.get(S3_SECTION), S3_SECTION, self.folder))

    def secret_values(self) -> list[str]:
        """Credentials in the config (the broker's and S3's, which FedML logs with ``args.__dict__``) and
        the key in the environment: what every log line must not show."""
        found = []
        for section in (MQTT_SECTION, S3_SECTION):
            values = self.flat.get(section)
            if isinstance(values, dict):
                found += [str(values[k]) for k in SECRET_FIELDS if values.get(k) not in (None, "")]
        if env := os.environ.get(KEY_ENV):
            found.append(env.strip())
        return found


def _resolved_keys(flat: dict[str, Any], settings: RunSettings) -> dict[str, Any]:
    """The keys the runtimes use that are not FedML's training keys, each checked once."""
    threads = flat.get("torch_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"torch_threads={threads!r} is invalid: allowed an integer >= 1")
    idle = flat.get("client_idle_timeout_s", 2 * settings.round_timeout_s + 60)
    if isinstance(idle, bool) or not isinstance(idle, int | float) or not idle > 0:
        raise ValueError(f"client_idle_timeout_s={idle!r} is invalid: allowed a number of seconds > 0")
    sizes = {}
    for key in ("train_size", "test_size"):
        value = flat.get(key) or 0
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key}={value!r} is invalid: allowed an integer >= 0")
        sizes[key] = value
    mode = flat.get("parallel_clients", "sequential")
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel_clients={mode!r} is invalid: allowed {', '.join(PARALLEL_MODES)}")
    processes = flat.get("parallel_processes")
    if processes is not None and (isinstance(processes, bool) or not isinstance(processes, int) or processes < 1):
        raise ValueError(f"parallel_processes={processes!r} is invalid: allowed an integer >= 1")
    return {"threads": threads, "client_idle_timeout_s": float(idle), "parallel_clients": mode,
            "parallel_processes": processes,
            "device": str(flat.get("device", "cpu")) if flat.get("using_gpu") else "cpu",
            "parse_limits": ParseLimits.from_flat(flat), **sizes}


def unread_keys(sections: dict[str, dict[str, Any]]) -> list[str]:
    """One line per key of FedML's sections (every section but :data:`CHECKED_SECTIONS`) that neither
    FedML 0.9.6 nor fedml_prism reads (a typo, or a key of another FedML version), with the closest
    known key when there is one."""
    known = FEDML_KEYS | PRISM_KEYS
    lines = []
    for name, section in sections.items():
        if name in CHECKED_SECTIONS:
            continue
        for key in section:
            if key in known:
                continue
            line = f"{name}.{key} is not a key FedML 0.9.6 or fedml_prism reads"
            if close := difflib.get_close_matches(str(key), known, n=1, cutoff=0.75):
                line += f"; did you mean {close[0]}?"
            lines.append(line)
    return lines


def key_files_of(path: str) -> tuple[Any, Any]:
    """``security_args.auth_key_file`` and ``comm_args.worker_num`` of a config, read without building the
    job (building checks that the key files exist; ``fedml-prism keys --cf`` makes them)."""
    sections = read_config(path)
    return (sections.get("security_args") or {}).get("auth_key_file"), (sections.get("comm_args") or {}).get("worker_num", 1)


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
    strict = flat.get("strict_config", False)
    if not isinstance(strict, bool):
        raise ValueError(f"strict_config={strict!r} is invalid: allowed true or false")
    unread = unread_keys(sections)
    if unread and strict:
        raise ValueError("strict_config: true refuses keys nothing reads (remove or correct them):\n  "
                         + "\n  ".join(unread))
    for line in unread:
        log.warning(line)
    unknown = sorted(set(sections.get("security_args") or {}) - set(SECURITY_KEYS))
    if unknown:
        raise ValueError(f"security_args has unknown key(s) {unknown}: allowed keys are {list(SECURITY_KEYS)}")
    flat.setdefault("random_seed", prism.seed)
    training_type = flat.get("training_type", "simulation")
    backend = flat.get("backend", "sp")
    if (training_type, backend) not in RUNTIMES:
        allowed = ", ".join(f"{t}/{b}" for t, b in sorted(RUNTIMES))
        raise ValueError(f"training_type/backend={training_type}/{backend} is invalid: allowed {allowed}")
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
    ranks = mpi_world_size()
    worker_num = int(flat.get("worker_num", (ranks or 2) - 1 if backend == "MPI" else 1))
    if backend == "MPI" and ranks is not None and ranks != worker_num + 1:
        raise ValueError(f"worker_num={worker_num} is invalid for mpiexec -np {ranks}: allowed worker_num={ranks - 1} "
                         "(rank 0 serves, the other ranks train)")
    if (training_type == "cross_silo" or backend == "MPI") and not 1 <= worker_num <= settings.client_num_per_round:
        raise ValueError(
            f"worker_num={worker_num} is invalid: allowed 1 to client_num_per_round={settings.client_num_per_round}"
        )
    job = Job(
        path=os.path.abspath(path), flat=flat, prism=prism, settings=settings, training_type=training_type,
        backend=backend, dataset=flat.get("dataset", "digits"), partition_method=method,
        partition_alpha=float(flat.get("partition_alpha", 0.5)), model=flat.get("model", "cnn"),
        model_kwargs=dict(flat.get("model_kwargs") or {}), worker_num=worker_num, compare=compare,
        partition_disjoint=disjoint, model_init=model_init, method_args=dict(sections.get("method_args") or {}),
        unread=unread, **_resolved_keys(flat, settings),
    )
    _check_methods(job)
    create_model(job.model, init=job.model_init, **job.model_kwargs)  # fail early on a bad model name or keyword
    if training_type == "cross_device":
        check_cross_device(job)
    if training_type != "simulation":
        job.security(0)  # files and values, before any work
    return job


def mpi_world_size() -> int | None:
    """The process count of the ``mpiexec`` that started this process (MPICH's ``PMI_SIZE``, Open MPI's
    ``OMPI_COMM_WORLD_SIZE``), read without initializing MPI; None when not under ``mpiexec``."""
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if (value := os.environ.get(name, "")).isdigit():
            return int(value)
    return None


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
        model = create_model(job.model, init=job.model_init, **job.model_kwargs)
        method_options(name, job.method_args.get(name), model)


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
