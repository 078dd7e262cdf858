"""``fedml-prism run --cf fedml_config.yaml``: one config, every FedML runtime.

- ``training_type: simulation`` + ``backend: sp``: FedML 0.9.6 ignores custom trainers/aggregators in
  its own sp simulator, so the same ``PrismClientTrainer`` / ``PrismServerAggregator`` are driven
  in-process (:mod:`fedml_prism.runtimes.simulation`).
- ``training_type: cross_silo`` + ``backend: MPI | GRPC | MQTT_S3``: FedML's cross-silo managers with
  the PriSM trainer/aggregator (:mod:`fedml_prism.runtimes.cross_silo`).
- ``training_type: simulation`` + ``backend: MPI`` (FedML's "MPI-based multi-process simulation", under
  ``mpiexec -np N``): FedML 0.9.6's MPI simulators never call a custom aggregator either, so it runs on
  the cross-silo MPI machinery: rank 0 the server, ranks 1..N-1 each training its share of every round's
  clients (``worker_num`` = N-1, read from ``mpiexec`` when the config leaves it out).
- ``training_type: cross_device`` + ``backend: MQTT_S3_MNN``: the PriSM MNN server or a reference device
  (:mod:`fedml_prism.runtimes.cross_device`).

The whole config is validated (:func:`fedml_prism.job.build_job`) before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..engine.decompose import little_saving_warning
from ..job import build_job
from ..runtimes.security import scrub_logs
from ..workloads.models import create_model

log = logging.getLogger("fedml_prism")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (FedML and pytest both replace it; a
    handler holding the stream of the moment it was made writes to a closed file later)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - the stream logging.StreamHandler writes to
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001 - StreamHandler assigns it; sys.stderr is always used
        pass


def _setup_logging() -> None:
    root = logging.getLogger("fedml_prism")
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[fedml_prism] %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


def main(cli: argparse.Namespace) -> int:
    _setup_logging()
    job = build_job(cli.cf, cli.output_dir)
    scrub_logs(job.secret_values())  # FedML logs args.__dict__, broker and S3 credentials included
    if warning := little_saving_warning(create_model(job.model, **job.model_kwargs), job.prism):
        log.warning(warning)
    if getattr(cli, "role", None) == "device" and job.training_type != "cross_device":
        raise ValueError(f"--role device is only for training_type: cross_device, not {job.training_type}")
    if getattr(cli, "check", False):
        print(f"config OK: {job.training_type}/{job.backend}, strategy={job.prism.strategy}, "
              f"keep_ratio={job.prism.keep_ratio}, {job.settings.client_num_in_total} clients, "
              f"{job.settings.client_num_per_round} per round, {job.settings.comm_round} rounds, "
              f"model={job.model}, dataset={job.dataset}, output_dir={job.settings.output_dir}")
        for line in job.unread:
            print(f"warning: {line}")
        return 0
    if job.training_type == "simulation" and job.backend == "sp":
        from ..runtimes.simulation import run_comparison

        run_comparison(job, resume=cli.resume)
        return 0
    if job.training_type == "cross_device":
        from ..runtimes.cross_device.launch import run_device, run_server

        if cli.role == "device":
            if cli.edge_id is None:
                raise ValueError("--role device needs --edge-id (one of client_id_list)")
            return run_device(job, cli.edge_id)
        return run_server(job, run_id=cli.run_id)
    from ..runtimes.cross_silo.launch import run_cross_silo

    return run_cross_silo(job, rank=cli.rank, role=cli.role, run_id=cli.run_id, resume=cli.resume)
