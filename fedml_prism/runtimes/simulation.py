"""Single-process simulation (``training_type: simulation``, ``backend: sp``).

FedML 0.9.6's sp simulator never calls a custom trainer or aggregator, so this loop drives the same
``PrismClientTrainer`` / ``PrismServerAggregator`` FedML's cross-silo runtimes use, in-process, in the
order FedML calls their hooks. Each selected client is its own "worker": its sub-model is built,
trained and uploaded, and no model copy is kept for clients that are not training.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..engine.config import PrismConfig
from ..engine.costs import layer_costs
from ..engine.files import write_private_bytes
from ..engine.server import PrismClient, PrismServer
from ..engine.train import evaluate
from ..job import Job, load_data
from ..strategies import OTHER_METHODS
from ..workloads.models import create_model
from .parallel import ProcessClients, available_cores, build_client, resolve_mode

log = logging.getLogger("fedml_prism")


def run_sp(job: Job, resume: bool = False, progress: bool = True) -> PrismServer:
    """Run ``job`` to ``comm_round``; returns the server (metrics, final model)."""
    from .fedml_glue import PrismClientTrainer, PrismServerAggregator

    torch.manual_seed(job.prism.seed)
    if job.threads:
        torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    data = load_data(job)
    model = create_model(job.model, init=job.model_init, **job.model_kwargs)
    args = argparse.Namespace(**job.flat)  # FedML's args: the whole config, as fedml.init would make them
    fedml_data = data.fedml_dataset(job.settings.batch_size)
    server = PrismServer(model, job.prism, job.settings, fedml_data[3], device)
    if resume and not server.load_checkpoint():
        log.info("no checkpoint in %s: starting from round 1", job.settings.output_dir)
    client = PrismClient(model, job.prism, job.settings, fedml_data[5], device)
    aggregator = PrismServerAggregator(model, args, server, workers=job.settings.client_num_per_round)
    trainer = PrismClientTrainer(model, args, client)
    mode = resolve_mode(job.parallel_clients, job.device, job.settings.client_num_per_round)
    pool = _process_pool(job, fedml_data[5]) if mode == "processes" and not server.finished else None
    if job.parallel_clients != "sequential":
        log.info("parallel_clients: %s%s", mode, f" ({pool.processes} processes x {pool.threads} threads)" if pool else "")
    try:
        while not server.finished:
            bundles = aggregator.get_model_params()
            if client.diagnose_round(server.round_idx):
                dense = server.pm.dense_model(device)
                losses = [evaluate(dense, client.eval_batches(c), device)[1] for c in server.selected]
                server.record_dense_client_loss(sum(losses) / len(losses))
            if pool is not None:
                trained = pool.train(bundles)
            elif mode == "vectorized":
                trained = client.train_bundles_vectorized(bundles)
            else:
                trained = _train_in_turn(trainer, bundles, device, args, progress,
                                         f"{job.prism.strategy} round {server.round_idx + 1}/{job.settings.comm_round}")
            uploads, _ = aggregator.on_before_aggregation([(1, trained[w]) for w in bundles])
            outgoing = aggregator.aggregate(uploads)
            for worker in outgoing:
                outgoing[worker] = aggregator.on_after_aggregation(outgoing[worker])
    finally:
        if pool is not None:
            pool.close()
    return server


def _train_in_turn(trainer: Any, bundles: dict[int, Any], device: torch.device, args: argparse.Namespace,
                   progress: bool, desc: str) -> dict[int, Any]:
    """The round's bundles trained one after the other through FedML's ``ClientTrainer`` hooks (which act
    only after ``fedml.init`` enabled FHE or local DP: never in this process)."""
    trained = {}
    for worker, bundle in tqdm(bundles.items(), desc=desc, leave=False, disable=not progress, unit="client"):
        trainer.set_id(worker)
        trainer.set_model_params(bundle)
        trainer.on_before_local_training(None, device, args)
        trainer.train(None, device, args)
        trainer.on_after_local_training(None, device, args)
        trained[worker] = trainer.get_model_params()
    return trained


def _process_pool(job: Job, client_data: dict[int, Any]) -> ProcessClients:
    """``parallel_clients: processes``: one worker per core (``parallel_processes``), at most one per
    client of a round, sharing the job's threads (``torch_threads``, default the cores)."""
    cores = available_cores()
    count = min(job.parallel_processes or cores, job.settings.client_num_per_round)
    threads = max(1, (job.threads or cores) // count)
    data = {cid: d.dataset if isinstance(d, DataLoader) else d for cid, d in client_data.items()}
    build = functools.partial(build_client, job.model, job.model_init, dict(job.model_kwargs), job.prism, job.settings,
                              data, "cpu")
    return ProcessClients(build, count, threads)


def summarize(server: PrismServer, example: torch.Tensor) -> dict[str, Any]:
    """Final/best accuracy and per-round client costs of a finished run; MACs are measured on the
    first sample of ``example``, a batch of the run's real inputs (``x_train[:1]``), so every dataset
    probes the model with its own dtype and shape (token ids for the LSTMs)."""
    from ..strategies import setting_of

    accs = [m["test_acc"] for m in server.metrics if not math.isnan(m["test_acc"])]
    pm = server.pm
    sub = pm.sample_submodel(client_id=0, round_idx=server.round_idx, record=False)
    sub_costs = layer_costs(sub.module, example)
    dense_costs = layer_costs(pm.dense_model(), example)
    rounds = max(len(server.metrics), 1)
    return {
        "strategy": server.config.strategy,
        "keep_ratio": server.config.keep_ratio if server.config.strategy != "full" else 1.0,
        "final_acc": accs[-1] if accs else float("nan"),
        "best_acc": max(accs) if accs else float("nan"),
        "client_params": sum(p.numel() for p in sub.module.parameters()),
        "client_macs": sum(c[2] for c in sub_costs.values()),
        "dense_macs": sum(c[2] for c in dense_costs.values()),
        "bytes_per_round": sum(m["bytes_down"] + m["bytes_up"] for m in server.metrics) / rounds,
        "wall_s": server.metrics[-1]["elapsed_s"] if server.metrics else 0.0,
        "setting": setting_of(server.config.strategy),
    }


def run_method(job: Job, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """One of the other methods (``layerwise``, ``fedgkt``, ``superfed``: :mod:`fedml_prism.strategies`)
    on the job's data, model, schedule and seed (the same clients per round as PriSM's runs); its
    metrics and checkpoint go to the job's output folder. Returns its summary row."""
    from ..strategies import method_module, setting_of

    module = method_module(job.prism.strategy)
    if job.parallel_clients != "sequential":
        log.warning("parallel_clients=%s applies to PriSM and its baselines; %s trains its clients one after the "
                    "other", job.parallel_clients, job.prism.strategy)
    torch.manual_seed(job.prism.seed)
    if job.threads:
        torch.set_num_threads(job.threads)
    model = create_model(job.model, init=job.model_init, **job.model_kwargs)
    options = job.method_args.get(job.prism.strategy) or {}
    result = module.run(model, load_data(job), job.settings, options, job.prism.seed, resume=resume, progress=progress)
    row = {"strategy": job.prism.strategy, "keep_ratio": float("nan"), "setting": setting_of(job.prism.strategy, options)}
    row.update(result.summary)
    row["client_macs"] = int(row.get("client_macs", 0))
    return row


def submodel_peak_train_mb(job: Job, server: PrismServer, example: torch.Tensor) -> float:
    """Peak resident memory (MB) of a client training its sub-model, measured in a fresh process
    (:func:`fedml_prism.strategies.base.peak_train_memory_mb`): the sub-model is built from its wire
    payload on a meta-device template, as a client builds it, never from the dense weights."""
    import functools
    import tempfile

    from ..strategies.base import peak_train_memory_mb

    sub = server.pm.sample_submodel(client_id=0, round_idx=server.round_idx, record=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "payload.pt")
        torch.save(sub.to_payload("down"), path)
        batch = example.expand(job.settings.batch_size, *example.shape[1:]).clone()
        build = functools.partial(_client_submodel, path, job.model, job.model_init, dict(job.model_kwargs),
                                  server.config.static_bn, batch, server.config.activation_memory)
        return peak_train_memory_mb(build)


def _client_submodel(path: str, model: str, init: str, kwargs: dict[str, Any], static_bn: bool,
                     batch: torch.Tensor, activation_memory: str) -> tuple[torch.nn.Module, Any]:
    """In the measuring process: the sub-model from its payload and one step's loss on ``batch``
    (with ``activation_memory: principal``, the forward keeps what the recomputation keeps)."""
    from ..engine.attention import convert_attention
    from ..engine.layers import convert_static_bn
    from ..engine.recompute import principal_width
    from ..engine.submodel import SubModel

    template = create_model(model, init=init, **kwargs)
    template = convert_attention(convert_static_bn(template) if static_bn else template).to("meta")
    module = SubModel.from_payload(torch.load(path, weights_only=True), template).module.train()
    out_dim = module(batch[:1]).shape[-1]
    labels = torch.randint(0, out_dim, (batch.shape[0],), generator=torch.Generator().manual_seed(0))

    def loss() -> torch.Tensor:
        with principal_width(module, activation_memory == "principal"):
            return torch.nn.functional.cross_entropy(module(batch), labels)

    return module, loss


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'strategy':10}{'keep':>6}{'final acc':>11}{'best acc':>10}{'client params':>15}{'client MACs':>13}" \
           f"{'MB/round':>10}{'wall s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['strategy']:10}{r['keep_ratio']:>6.2f}{r['final_acc']:>11.4f}{r['best_acc']:>10.4f}"
            f"{r['client_params']:>15,}{r['client_macs']:>13,}{r['bytes_per_round'] / 1e6:>10.2f}{r['wall_s']:>8.1f}"
        )
    return "\n".join(lines)


def run_comparison(job: Job, resume: bool = False) -> list[dict[str, Any]]:
    """Run the configured strategy and every ``compare_strategies`` entry on the same partition,
    seeds and schedule; print and save the accuracy table."""
    strategies = [job.prism.strategy] + [s for s in job.compare if s != job.prism.strategy]
    base_dir = job.settings.output_dir
    rows = []
    example = load_data(job).x_train[:1].clone()  # one real sample: probes the costs in the data's dtype and shape
    for strategy in strategies:
        sub_job = job
        if len(strategies) > 1:
            prism = PrismConfig.from_mapping({**job.prism.to_dict(), "strategy": strategy})
            settings = dataclasses.replace(job.settings, output_dir=os.path.join(base_dir, strategy))
            sub_job = dataclasses.replace(job, prism=prism, settings=settings)
        if strategy in OTHER_METHODS:
            rows.append(run_method(sub_job, resume=resume))
        else:
            rows.append(summarize(run_sp(sub_job, resume=resume), example))
    table = format_table(rows)
    print(table)
    os.makedirs(base_dir, exist_ok=True)
    write_private_bytes(os.path.join(base_dir, "summary.json"), json.dumps(rows, indent=1))
    with open(os.path.join(base_dir, "summary.md"), "w") as f:
        f.write(table + "\n")
    return rows
