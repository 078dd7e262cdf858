"""``fedml-prism bench``: strategies side by side on the same partition, seeds and schedule.

Every run goes through the same runtime code as ``fedml-prism run`` (a :class:`~fedml_prism.job.Job`
driven by :func:`~fedml_prism.runtimes.simulation.run_sp`). Outputs in ``--out``: ``results.json``,
``results.md`` (final / best accuracy as mean ± spread over seeds, actual keep ratio, budget = client
params as % of the dense model's, gap to the same partition's full run in points, client params / MACs
/ bytes per round, wall time, and a diagnostics table of the principal strategies),
``accuracy_vs_round_<partition>.png`` (with the gap to full below), ``diagnostics_<partition>.png``
and ``accuracy_vs_keep_ratio.png``, plus one sub-folder per run with its metrics and checkpoint
(finished runs are skipped on a re-run: resumable). In ``results.json`` ``budget`` and
``gap_to_full`` are fractions, like ``final_acc``.

Equal budgets (``--match params`` or a profile's ``"match": "params"``): at each keep ratio k every
non-full strategy runs at the keep ratio whose client sub-model has as many parameters (within 2 %)
as prism's at k (:func:`match_keep_ratio`); rows keep the nominal ``keep_ratio`` for grouping and the
``actual_keep`` used, and run folders are named after the actual keep.

Profiles:
- ``smoke``: digits, a tiny CNN, 2 rounds: seconds, for tests.
- ``cpu``: CIFAR-10, ResNet-18 at width 0.25, 100 clients × 500 samples, 10 per round, 1 local epoch,
  25 rounds (cosine lr from 0.05), Dirichlet α = 0.1 and iid, keep 0.2, strategies full / prism /
  orthdrop / origdrop; sized to finish within 45 minutes on 2 CPU cores (a width-0.25 step takes
  ~0.08 s, so a round of 10 × 16 steps is ~15 s; test accuracy every 5 rounds on all 10 000 images).
- ``fidelity``: does PriSM's claim hold where it can be checked on 2 CPU cores within an hour?
  CIFAR-10, the paper's CNN in RGB at width 0.5 with a 160-unit hidden Linear (factorized layers of
  rank 32 and 160), 50 clients × 500 samples (disjoint pools), 10 per round, 1 local epoch, 30 rounds
  of cosine lr from 0.05, iid and Dirichlet α = 0.1. Every strategy at keep 0.2 and the main ones at
  0.5, baselines at PriSM's client parameter budget (``match: params``), the authors' training
  details on (``factor_scale: sqrt``, aggregated momentum, 2 top-k warm-up rounds, κ = 2.5), and
  ablations on Dirichlet 0.1 that turn each detail off (κ = 4 for the authors' non-iid choice; the
  authors' kaiming fan-out init and overlapping client pools, each next to full FedAvg with the same
  change). Diagnostics on.
- ``fidelity_long``: the fidelity setting at 100 rounds on Dirichlet 0.1 for full, PriSM (κ = 2.5 and
  4) and OrthDrop at keep 0.2: does the gap close with a longer schedule? (~20 min)
- ``paper``: the paper's ResNet-18 / CIFAR-10 setting (appendix A) for a GPU, with the authors'
  training details and equal-budget baselines.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ..engine.config import OTHER_METHODS, PRINCIPAL_STRATEGIES, STRATEGIES, PrismConfig
from ..engine.decompose import factorizable_layers
from ..engine.principal import PrincipalModel
from ..job import Job, job_from_sections, load_data
from ..runtimes.simulation import run_method, run_sp, submodel_peak_train_mb, summarize
from ..workloads.models import create_model

log = logging.getLogger("fedml_prism")

_COMMON = {
    "common_args": {"training_type": "simulation"},
    "comm_args": {"backend": "sp"},
    "tracking_args": {"using_mlops": False, "checkpoint_every": 5},
    "validation_args": {"frequency_of_the_test": 1},
}

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {
        # every strategy and method on one tiny ResNet (SuperFed needs residual stages; layer-wise
        # learning needs a round per block: stem, two blocks)
        "sections": {
            "data_args": {"dataset": "digits"},
            "model_args": {"model": "resnet_tiny", "model_kwargs": {"in_channels": 1, "width": 0.25, "num_classes": 10}},
            "train_args": {"client_num_in_total": 6, "client_num_per_round": 3, "comm_round": 3, "epochs": 1,
                           "batch_size": 32, "learning_rate": 0.05, "torch_threads": 1},
            "prism_args": {"kappa": 2.5},
            "method_args": {"superfed": {"widths": [0.125, 0.25, 0.5, 1.0], "measure_memory": False}},
        },
        "strategies": ["full", "prism", "orthdrop", "origdrop", "rolex", "uniform"],
        "variants": {"superfed-capped": {"prism_args": {"strategy": "superfed"},
                                         "sections": {"method_args": {"superfed": {
                                             "widths": [0.125, 0.25, 0.5, 1.0], "measure_memory": False,
                                             "cap": True, "max_params_ratio": 0.3}}}}},
        "keep_ratios": [0.2, 0.5],
        "partitions": [("iid", None)],
        "seeds": [0],
    },
    "cpu": {
        "sections": {
            "data_args": {"dataset": "cifar10", "data_path": "../shared/data/cifar10/cifar-10-batches-py.tar.xz",
                          "samples_per_client": 500, "partition_disjoint": False},
            "model_args": {"model": "resnet18_cifar", "model_kwargs": {"width": 0.25, "num_classes": 10}},
            "train_args": {"client_num_in_total": 100, "client_num_per_round": 10, "comm_round": 25, "epochs": 1,
                           "batch_size": 32, "learning_rate": 0.05, "weight_decay": 5e-4, "lr_schedule": "cosine",
                           "augment": "flip_crop", "torch_threads": 2},
            "validation_args": {"frequency_of_the_test": 5},
            # pinned to the settings benchmarks/results/cpu was measured with (before the fidelity work)
            "prism_args": {"kappa": 2.5, "factor_scale": "frozen", "optimizer_state": "reset"},
        },
        "strategies": ["full", "prism", "orthdrop", "origdrop"],
        "keep_ratios": [0.2],
        "partitions": [("dirichlet", 0.1), ("iid", None)],
        "seeds": [0],
    },
    "fidelity": {
        "sections": {
            "data_args": {"dataset": "cifar10", "data_path": "../shared/data/cifar10/cifar-10-batches-py.tar.xz",
                          "samples_per_client": 500, "partition_disjoint": True},
            "model_args": {"model": "cnn", "model_kwargs": {"in_channels": 3, "image_size": 32, "width": 0.5,
                                                             "hidden": 160, "num_classes": 10}},
            "train_args": {"client_num_in_total": 50, "client_num_per_round": 10, "comm_round": 30, "epochs": 1,
                           "batch_size": 32, "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                           "lr_schedule": "cosine", "torch_threads": 2, "diagnostics": True},
            "validation_args": {"frequency_of_the_test": 5},
            "prism_args": {"kappa": 2.5, "factor_scale": "sqrt", "optimizer_state": "aggregate", "warmup_rounds": 2},
        },
        "strategies": ["full", "prism", "orthdrop", "origdrop", "uniform", "rolex",
                       "prism-reset", "prism-frozen", "prism-nowarmup", "prism-kappa4",
                       "prism-kaiming", "full-kaiming", "prism-overlap", "full-overlap", "prism-defaults"],
        "variants": {
            "uniform": {"keep_ratios": [0.2]},
            "rolex": {"keep_ratios": [0.2]},
            "prism-reset": {"prism_args": {"strategy": "prism", "optimizer_state": "reset"}, "keep_ratios": [0.2],
                            "partitions": ["dirichlet0.1"]},
            "prism-frozen": {"prism_args": {"strategy": "prism", "factor_scale": "frozen"}, "keep_ratios": [0.2],
                             "partitions": ["dirichlet0.1"]},
            "prism-nowarmup": {"prism_args": {"strategy": "prism", "warmup_rounds": 0}, "keep_ratios": [0.2],
                               "partitions": ["dirichlet0.1"]},
            "prism-kappa4": {"prism_args": {"strategy": "prism", "kappa": 4.0}, "keep_ratios": [0.2],
                             "partitions": ["dirichlet0.1"]},
            "prism-kaiming": {"prism_args": {"strategy": "prism"}, "keep_ratios": [0.2],
                              "partitions": ["dirichlet0.1"],
                              "sections": {"model_args": {"model_init": "kaiming_fan_out"}}},
            "full-kaiming": {"prism_args": {"strategy": "full"}, "keep_ratios": [0.2], "partitions": ["dirichlet0.1"],
                             "sections": {"model_args": {"model_init": "kaiming_fan_out"}}},
            "prism-overlap": {"prism_args": {"strategy": "prism"}, "keep_ratios": [0.2],
                              "partitions": ["dirichlet0.1"],
                              "sections": {"data_args": {"partition_disjoint": False}}},
            "full-overlap": {"prism_args": {"strategy": "full"}, "keep_ratios": [0.2], "partitions": ["dirichlet0.1"],
                             "sections": {"data_args": {"partition_disjoint": False}}},
            # the package defaults chosen from the ablations above, measured together
            "prism-defaults": {"prism_args": {"strategy": "prism", "warmup_rounds": 0, "kappa": 4.0}, "keep_ratios": [0.2]},
        },
        "keep_ratios": [0.2, 0.5],
        "partitions": [("iid", None), ("dirichlet", 0.1)],
        "seeds": [0],
        "match": "params",
    },
    "fidelity_long": {
        "sections": {},  # the fidelity profile's settings (filled in below) at 100 rounds
        "strategies": ["full", "prism", "orthdrop", "prism-kappa4"],
        "variants": {"prism-kappa4": {"prism_args": {"strategy": "prism", "kappa": 4.0}}},
        "keep_ratios": [0.2],
        "partitions": [("dirichlet", 0.1)],
        "seeds": [0],
        "match": "params",
    },
    # the other methods side by side with PriSM (issue 12): the fidelity profile's data, partitions,
    # clients, seed, schedule and rounds, on resnet_tiny (SuperFed needs residual stages; layer-wise
    # learning trains one block of it per stage)
    "fidelity_methods": {
        "sections": {},  # filled in below from "fidelity", with the model replaced
        "strategies": ["full", "prism", "layerwise", "layerwise-dd", "superfed", "superfed-capped", "fedgkt"],
        "variants": {
            "layerwise-dd": {"prism_args": {"strategy": "layerwise"},
                             "sections": {"method_args": {"layerwise": {"depth_dropout": 0.5}}}},
            "superfed-capped": {"prism_args": {"strategy": "superfed"},
                                "sections": {"method_args": {"superfed": {"widths": [0.125, 0.25, 0.5, 0.75, 1.0],
                                                                          "cap": True, "max_params_ratio": 0.2}}}},
        },
        "keep_ratios": [0.2],
        "partitions": [("dirichlet", 0.1)],
        "seeds": [0],
        "memory": True,
    },
    "paper": {
        "sections": {
            "data_args": {"dataset": "cifar10", "data_path": "../shared/data/cifar10/cifar-10-batches-py.tar.xz",
                          "samples_per_client": 500},
            "model_args": {"model": "resnet18_cifar", "model_kwargs": {"width": 1.0, "num_classes": 10}},
            "train_args": {"client_num_in_total": 100, "client_num_per_round": 20, "comm_round": 1000, "epochs": 2,
                           "batch_size": 32, "learning_rate": 0.1, "weight_decay": 5e-4, "lr_schedule": "cosine",
                           "augment": "flip_crop"},
            "device_args": {"using_gpu": True, "device": "cuda"},
            "validation_args": {"frequency_of_the_test": 10},
            "prism_args": {"kappa": 2.5, "factor_scale": "sqrt", "optimizer_state": "aggregate", "warmup_rounds": 20},
        },
        "strategies": ["full", "prism", "orthdrop", "origdrop", "rolex", "uniform"],
        "keep_ratios": [0.2],
        "partitions": [("dirichlet", 0.1), ("iid", None)],
        "seeds": [0],
        "match": "params",
    },
}


PROFILES["fidelity_long"]["sections"] = copy.deepcopy(PROFILES["fidelity"]["sections"])
PROFILES["fidelity_long"]["sections"]["train_args"]["comm_round"] = 100
PROFILES["fidelity_long"]["sections"]["validation_args"]["frequency_of_the_test"] = 10
PROFILES["fidelity_methods"]["sections"] = copy.deepcopy(PROFILES["fidelity"]["sections"])
PROFILES["fidelity_methods"]["sections"]["model_args"] = {"model": "resnet_tiny", "model_kwargs": {"width": 0.25,
                                                                                                   "num_classes": 10}}
PROFILES["fidelity_methods"]["sections"]["train_args"]["diagnostics"] = False
PROFILES["fidelity_methods"]["sections"]["prism_args"].update(kappa=4.0, warmup_rounds=0)  # the package defaults
PROFILES["fidelity_methods"]["sections"]["method_args"] = {
    "superfed": {"widths": [0.125, 0.25, 0.5, 0.75, 1.0]},
    "fedgkt": {"server_data": "round"},  # the server trains on the round's uploads, as FedML's FedGKT does
}


def _partition_name(method: str, alpha: float | None) -> str:
    return method if alpha is None else f"{method}{alpha:g}"


# ---------------------------------------------------------------------------- equal-budget matching
class ParamCounter:
    """Client sub-model parameter counts of one model by strategy and keep ratio, cached.

    A :class:`PrincipalModel` is built once per distinct structure (the factorized layer set for the
    principal strategies, which can change with the keep ratio; the channel plan for origdrop /
    rolex; the dense model for full) and reused for every keep ratio with that structure, so the
    SVDs of big layers run once."""

    def __init__(self, model: nn.Module, base_config: PrismConfig | Mapping[str, Any] | None = None) -> None:
        self.model = model
        if base_config is None:
            base_config = PrismConfig()
        elif not isinstance(base_config, PrismConfig):
            base_config = PrismConfig.from_mapping(base_config)
        self.base = dataclasses.replace(base_config, capacities=None)
        self._models: dict[tuple, PrincipalModel] = {}
        self._counts: dict[tuple[str, float], int] = {}

    def config(self, strategy: str, keep_ratio: float) -> PrismConfig:
        """The base config with ``strategy`` and a fixed ``keep_ratio`` (no capacities)."""
        return dataclasses.replace(self.base, strategy=strategy, keep_ratio=keep_ratio)

    def dense_params(self) -> int:
        """Parameters of the dense model."""
        return sum(p.numel() for p in self.model.parameters())

    def sizes(self) -> set[int]:
        """Every channel count / rank whose multiples ``j / C`` can be a step of the count."""
        out: set[int] = set()
        for p in self.model.parameters():
            if p.dim() >= 2:
                out |= {p.shape[0], p.shape[1], min(p.shape[0], math.prod(p.shape[1:]))}
        for pm in self._models.values():
            if pm.plan is not None:
                out |= set(pm.plan.sizes.values())
        return {c for c in out if c > 0}

    def count(self, strategy: str, keep_ratio: float) -> int:
        """Parameters of client 0's round-0 sub-model (``sample_submodel(0, 0, record=False)``)."""
        key = (strategy, float(keep_ratio))
        if key not in self._counts:
            cfg = self.config(strategy, keep_ratio)
            if cfg.principal:
                structure: tuple = ("principal", tuple(factorizable_layers(self.model, cfg)))
            else:
                structure = (cfg.strategy == "full",)
            pm = self._models.get(structure)
            if pm is None:
                pm = self._models[structure] = PrincipalModel(self.model, cfg)
            view = copy.copy(pm)  # shares the factors; only the config (strategy, keep ratio) differs
            view.config = cfg
            sub = view.sample_submodel(0, 0, record=False)
            self._counts[key] = sum(p.numel() for p in sub.module.parameters())
        return self._counts[key]


def match_keep_ratio(
    model: nn.Module,
    strategy: str,
    target_params: int,
    base_config: PrismConfig | Mapping[str, Any] | None = None,
    *,
    tolerance: float = 0.02,
    counter: ParamCounter | None = None,
) -> float:
    """The keep ratio in (0, 1] whose ``strategy`` client sub-model has the parameter count closest
    to ``target_params`` (within ``tolerance``, relative).

    Channel / component counts are ``ceil(k·C)``, so the count is a step function of ``k`` whose steps
    end at ``j / C``: a bisection over those step points finds where the count crosses the target,
    then the step points around it are scanned and the closest (smallest ``k`` on ties) is returned.
    ``counter`` (built for the same model and base config) shares its cached models between calls.

    Raises ``ValueError`` (naming strategy and target) when no keep ratio is within tolerance."""
    counter = counter or ParamCounter(model, base_config)
    target = int(target_params)
    if target <= 0:
        raise ValueError(f"match_keep_ratio: target_params={target_params!r} is invalid: allowed an integer > 0")
    if strategy == "full":
        candidates = [1.0]
    else:
        # the count only changes right after a step point j / C (C: a channel count or rank), and
        # the step point itself is the largest keep ratio of its step: bisect over the step points
        counter.count(strategy, 1.0)  # builds the strategy's model first, so sizes() knows its channel plan
        steps = sorted({j / c for c in counter.sizes() for j in range(1, c + 1)} | {1.0})
        lo, hi = -1, len(steps) - 1  # count(steps[lo]) < target <= count(steps[hi]) (lo = -1: below all)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if counter.count(strategy, steps[mid]) >= target:
                hi = mid
            else:
                lo = mid
        candidates = steps[max(0, hi - 6): hi + 7]
    best = min(candidates, key=lambda k: (abs(counter.count(strategy, k) - target), k))
    got = counter.count(strategy, best)
    if abs(got - target) > tolerance * target:
        raise ValueError(
            f"match_keep_ratio: no keep ratio gives {strategy} a sub-model within {tolerance:.0%} of "
            f"{target:,} parameters (closest: {got:,} at keep {best:.4g})"
        )
    return best


def _resolve_match(match: str | None, profile: Mapping[str, Any]) -> str | None:
    """``match`` argument (None: the profile's ``match``; ``"none"``: off) as ``"params"`` or None."""
    value = match if match is not None else profile.get("match")
    if value in (None, "none"):
        return None
    if value != "params":
        raise ValueError(f"match={value!r} is invalid: allowed params, none")
    return "params"


# ---------------------------------------------------------------------------- planning and running
def plan_runs(
    profile: dict[str, Any], base_dir: str, overrides: dict[str, Any], match: str | None = None
) -> list[tuple[dict, Job]]:
    """Every (partition, keep ratio, strategy, seed) of the profile as a validated Job.

    With ``match="params"`` (or the profile's ``"match": "params"``) every non-full strategy runs at
    the keep ratio whose client sub-model has as many parameters as the ``prism`` sub-model at the
    profile's keep ratio (orthdrop / uniform: the same keep; origdrop / rolex: a larger one). Each
    key holds the nominal ``keep_ratio`` (for grouping) and the ``actual_keep`` used; the run folder
    is named after the actual keep."""
    match = _resolve_match(match, profile)
    keeps = overrides.get("keep_ratios") or profile["keep_ratios"]
    counter: ParamCounter | None = None
    matched: dict[tuple[str, float], float] = {}

    def matched_keep(strategy: str, keep: float, job: Job) -> float:
        nonlocal counter
        if job.prism.capacities:
            raise ValueError("match=params needs a fixed keep_ratio: the profile's prism_args set capacities")
        if counter is None:
            counter = ParamCounter(create_model(job.model, **job.model_kwargs), job.prism)
        target = counter.count("prism", keep)
        if counter.count(strategy, keep) == target:
            return keep
        return match_keep_ratio(counter.model, strategy, target, counter=counter)

    runs = []
    for method, alpha in overrides.get("partitions") or profile["partitions"]:
        for keep in keeps:
            for strategy in overrides.get("strategies") or profile["strategies"]:
                variant = profile.get("variants", {}).get(strategy, {})
                base = variant.get("prism_args", {}).get("strategy", strategy)
                no_keep = base == "full" or base in OTHER_METHODS
                if no_keep and keep != keeps[0]:
                    continue  # full FedAvg and the other methods do not use the keep ratio
                if keep not in variant.get("keep_ratios", [keep]) or (
                    _partition_name(method, alpha) not in variant.get("partitions", [_partition_name(method, alpha)])
                ):
                    continue
                for seed in overrides.get("seeds") or profile["seeds"]:
                    sections = copy.deepcopy(_COMMON) | copy.deepcopy(profile["sections"])
                    sections["data_args"]["partition_method"] = method
                    if alpha is not None:
                        sections["data_args"]["partition_alpha"] = alpha
                    for name, values in variant.get("sections", {}).items():
                        sections.setdefault(name, {}).update(copy.deepcopy(values))
                    sections["prism_args"].update(variant.get("prism_args", {}))
                    sections["prism_args"].update({"strategy": base, "keep_ratio": keep, "seed": seed})
                    if overrides.get("rounds"):
                        sections["train_args"]["comm_round"] = overrides["rounds"]
                    if overrides.get("data_path"):
                        sections["data_args"]["data_path"] = overrides["data_path"]
                    bench_yaml = os.path.join(os.getcwd(), "bench.yaml")
                    real = keep
                    if match is not None and not no_keep:
                        if (base, keep) not in matched:
                            matched[(base, keep)] = matched_keep(base, keep, job_from_sections(sections, bench_yaml))
                        real = sections["prism_args"]["keep_ratio"] = matched[(base, keep)]
                    key = {"partition": _partition_name(method, alpha), "keep_ratio": keep if not no_keep else 1.0,
                           "actual_keep": real if not no_keep else 1.0, "strategy": strategy, "seed": seed}
                    # full keeps its historical folder name (nominal first keep): it does not use the ratio
                    out = os.path.join(base_dir, "runs", f"{key['partition']}_{strategy}_k{real:g}_s{seed}")
                    runs.append((key, job_from_sections(sections, bench_yaml, out)))
    return runs


def _read_metrics(run_dir: str) -> list[dict[str, Any]] | None:
    """The run's ``metrics.json`` rows, or None when it is missing or unreadable."""
    path = os.path.join(run_dir, "metrics.json")
    try:
        with open(path) as f:
            rows = json.load(f)
    except (OSError, ValueError):
        return None
    return rows if isinstance(rows, list) else None


def run_bench(
    profile_name: str, out_dir: str, overrides: dict[str, Any] | None = None, match: str | None = None
) -> list[dict[str, Any]]:
    """Run a profile; returns the result rows (also written to ``out_dir``). ``match``: ``"params"``
    for equal-budget runs, ``"none"`` for nominal keep ratios, None for the profile's setting."""
    if profile_name not in PROFILES:
        raise ValueError(f"--profile {profile_name!r} is invalid: allowed {', '.join(PROFILES)}")
    overrides = overrides or {}
    out_dir = os.path.abspath(out_dir)
    profile = PROFILES[profile_name]
    runs = plan_runs(profile, out_dir, overrides, match=match)
    # loads the data once before any training: missing dataset files fail here, and every run
    # shares the dataset, so one real sample probes every run's costs in the data's dtype and shape
    example = load_data(runs[0][1]).x_train[:1].clone()
    results = []
    started = last_plot = time.time()
    for i, (key, job) in enumerate(runs, 1):
        log.info("bench %d/%d: %s", i, len(runs), key)
        row = dict(key)
        if job.prism.strategy in OTHER_METHODS:
            row.update(run_method(job, resume=True, progress=False))
            metrics = _read_metrics(job.settings.output_dir) or []
        else:
            server = run_sp(job, resume=True, progress=False)
            row.update(summarize(server, example))
            row["dense_params"] = sum(p.numel() for p in server.pm.dense_model().parameters())
            if profile.get("memory"):
                row["peak_train_mb"] = submodel_peak_train_mb(job, server, example)
            metrics = _read_metrics(job.settings.output_dir) or server.metrics
        row["strategy"] = key["strategy"]  # a variant's name, not its base strategy
        row["base_strategy"] = job.prism.strategy
        row["keep_ratio"] = key["keep_ratio"]
        row["actual_keep"] = key["actual_keep"]
        row["budget"] = row["client_params"] / row["dense_params"]
        row["curve"] = [_num(m.get("test_acc")) for m in metrics]
        row["run_dir"] = os.path.relpath(job.settings.output_dir, out_dir)
        results.append(row)
        # tables after every run; plots at the end and at most once a minute in between
        plots = i == len(runs) or time.time() - last_plot > 60
        write_results(out_dir, profile_name, results, time.time() - started, plots=plots)
        last_plot = time.time() if plots else last_plot
    return results


# ---------------------------------------------------------------------------- tables
def _num(value: Any) -> float:
    """``value`` as a float; None / non-numbers become NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _fmean(values: Iterable[Any]) -> float:
    """Mean of the finite values (NaN if none)."""
    vals = [v for v in map(_num, values) if math.isfinite(v)]
    return statistics.fmean(vals) if vals else math.nan


def _budget(row: Mapping[str, Any], results: list[dict[str, Any]]) -> float | None:
    """Client params / dense params of a run; for rows of older benches without ``budget`` the same
    partition's full run gives the dense count."""
    if row["strategy"] == "full":
        return 1.0
    if row.get("budget") is not None:
        return float(row["budget"])
    dense = row.get("dense_params") or next(
        (r["client_params"] for r in results if r["strategy"] == "full" and r["partition"] == row["partition"]), None)
    return row["client_params"] / dense if dense else None


def aggregate_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± spread (sample std; 0 for one seed) over seeds of each (partition, keep, strategy), with
    the actual keep ratio, the budget (client params / dense params) and ``gap_to_full`` (mean final
    accuracy minus the same partition's full run's, as a fraction like ``final_acc``; None without
    a full run)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["partition"], r["keep_ratio"], r["strategy"]), []).append(r)
    out = []
    for (partition, keep, strategy), rows in groups.items():
        def stat(field: str, rows: list[dict[str, Any]] = rows) -> tuple[float, float]:
            vals = [r[field] for r in rows]
            return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

        budgets = [b for b in (_budget(r, results) for r in rows) if b is not None]
        out.append({
            "partition": partition, "keep_ratio": keep, "strategy": strategy, "seeds": len(rows),
            "actual_keep": rows[0].get("actual_keep", keep),
            "final_acc": stat("final_acc"), "best_acc": stat("best_acc"),
            "last3_acc": _last3([r.get("curve") or [] for r in rows]),
            "client_params": rows[0]["client_params"], "client_macs": rows[0]["client_macs"],
            "dense_macs": rows[0].get("dense_macs"), "budget": statistics.fmean(budgets) if budgets else None,
            "peak_train_mb": _fmean(r.get("peak_train_mb") for r in rows),
            "setting": rows[0].get("setting", ""), "method": rows[0].get("base_strategy") in OTHER_METHODS,
            "bytes_per_round": statistics.fmean(r["bytes_per_round"] for r in rows),
            "wall_s": statistics.fmean(r["wall_s"] for r in rows),
        })
    full = {r["partition"]: r["final_acc"][0] for r in out if r["strategy"] == "full"}
    for r in out:
        ref = full.get(r["partition"])
        r["gap_to_full"] = r["final_acc"][0] - ref if ref is not None else None
    return out


def _last3(curves: list[list[Any]]) -> float:
    """Mean over seeds of each run's last three evaluated accuracies (non-iid accuracy swings by
    several points between evaluations; this is the steadier number)."""
    means = []
    for curve in curves:
        finite = [v for v in map(_num, curve) if math.isfinite(v)]
        if finite:
            means.append(statistics.fmean(finite[-3:]))
    return statistics.fmean(means) if means else math.nan


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results table: one line per aggregated row, sorted by partition, keep and strategy."""
    lines = ["| partition | strategy | setting | keep | actual keep | budget (% of dense params) | final acc (%) | "
             "gap to full (pts) | last 3 evals (%) | best acc (%) | client params | client MACs | peak train MB | "
             "MB / round | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["partition"], r["keep_ratio"], r["strategy"])):
        (fm, fs), (bm, bs) = r["final_acc"], r["best_acc"]
        budget = "100.0" if r["strategy"] == "full" else (
            f"{100 * r['budget']:.1f}" if r.get("budget") is not None else "")
        gap = f"{100 * r['gap_to_full']:+.2f}" if r.get("gap_to_full") is not None else ""
        keep = ("—", "—") if r.get("method") else (f"{r['keep_ratio']:g}", f"{r.get('actual_keep', r['keep_ratio']):.4g}")
        lines.append(
            f"| {r['partition']} | {r['strategy']} | {r.get('setting', '')} | {keep[0]} | {keep[1]} | "
            f"{budget} | {100 * fm:.2f} ± {100 * fs:.2f} | {gap} | {_fmt(100 * _num(r.get('last3_acc')), 2)} | "
            f"{100 * bm:.2f} ± {100 * bs:.2f} | "
            f"{r['client_params']:,} | {r['client_macs']:,} | {_fmt(_num(r.get('peak_train_mb')), 1)} | "
            f"{r['bytes_per_round'] / 1e6:.2f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def _layer_mean(row: Mapping[str, Any], field: str) -> float:
    """Mean over the row's ``layers`` of ``field`` (NaN without layers)."""
    layers = row.get("layers") or {}
    return _fmean(v.get(field) for v in layers.values() if isinstance(v, Mapping))


def _rank_ratio(row: Mapping[str, Any]) -> float:
    """Mean over the row's ``layers`` of effective_rank / rank."""
    layers = row.get("layers") or {}
    return _fmean(_num(v.get("effective_rank")) / v["rank"] for v in layers.values()
                  if isinstance(v, Mapping) and _num(v.get("rank")) > 0)


def _run_dir(results_dir: str, row: Mapping[str, Any]) -> str:
    """The run folder of a result row (rows of older benches: rebuilt from the naming scheme)."""
    if row.get("run_dir"):
        return os.path.join(results_dir, row["run_dir"])
    runs = os.path.join(results_dir, "runs")
    path = os.path.join(runs, f"{row['partition']}_{row['strategy']}_k{row['keep_ratio']:g}_s{row['seed']}")
    if row["strategy"] == "full" and not os.path.isdir(path):  # named after the bench's first keep ratio
        found = glob.glob(os.path.join(glob.escape(runs), f"{glob.escape(row['partition'])}_{row['strategy']}_k*_s{row['seed']}"))
        path = found[0] if len(found) == 1 else path
    return path


def _diagnostic_runs(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs the diagnostics show: the first seed and, per partition, the first keep ratio (and full)."""
    if not results:
        return []
    seed = results[0]["seed"]
    first_keep = next((r["keep_ratio"] for r in results if r["strategy"] != "full"), None)
    return [r for r in results if r["seed"] == seed and (r["strategy"] == "full" or r["keep_ratio"] == first_keep)]


def diagnostics_table(results_dir: str) -> str:
    """Markdown table of the principal strategies' diagnostics (every run with per-layer rows, first
    seed): layer means, averaged over the rounds, of the energy share the
    sub-models carried, coverage, effective rank / rank (last round), and the mean relative change
    per component per round of the top-k components and of the others; then the mean over the
    diagnosed rounds of the sub-models' loss before training, their training loss, and the dense
    model's loss on the same client data (read from each run's ``metrics.json``)."""
    path = os.path.join(results_dir, "results.json")
    if not os.path.isfile(path):
        raise ValueError(f"results folder {results_dir!r} has no results.json")
    with open(path) as f:
        results = json.load(f).get("runs", [])
    seed = results[0]["seed"] if results else None
    lines = ["| partition | strategy | keep | energy kept | coverage | eff. rank / rank | Δ top-k / round | "
             "Δ others / round | start loss | train loss | dense client loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    body = []
    for r in sorted(results, key=lambda r: (r["partition"], r["keep_ratio"], r["strategy"])):
        if r["seed"] != seed:
            continue
        metrics = _read_metrics(_run_dir(results_dir, r)) or []
        with_layers = [m for m in metrics if m.get("layers")]
        if not with_layers:
            continue
        sampled = with_layers
        diagnosed = [m for m in metrics if math.isfinite(_num(m.get("start_loss")))]

        def over(rows: list[dict[str, Any]], fn: Any) -> float:
            return _fmean(fn(m) for m in rows)

        cells = [over(sampled, lambda m: _layer_mean(m, "energy_kept")), over(sampled, lambda m: _layer_mean(m, "coverage")),
                 _rank_ratio(with_layers[-1]), over(sampled, lambda m: _layer_mean(m, "delta_top")),
                 over(sampled, lambda m: _layer_mean(m, "delta_rest"))]
        losses = [over(diagnosed, lambda m, k=k: _num(m.get(k))) for k in ("start_loss", "train_loss", "dense_client_loss")]
        body.append(f"| {r['partition']} | {r['strategy']} | {r['keep_ratio']:g} | "
                    + " | ".join(_fmt(v, 3) for v in cells) + " | " + " | ".join(_fmt(v, 3) for v in losses) + " |")
    if not body:
        return "No per-round diagnostics: no principal-strategy run has a metrics.json."
    return "\n".join(lines + body)


def _fmt(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else ""


def write_results(
    out_dir: str, profile: str, results: list[dict[str, Any]], elapsed: float, plots: bool = True
) -> None:
    """``results.json``, ``results.md`` (results and diagnostics tables) and, with ``plots``, the plots."""
    os.makedirs(out_dir, exist_ok=True)
    rows = aggregate_rows(results)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"profile": profile, "elapsed_s": elapsed, "runs": results, "summary": rows}, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(f"# fedml-prism bench, profile `{profile}`\n\n{markdown_table(rows)}\n\n"
                f"Total wall time: {elapsed / 60:.1f} min (this invocation); the runs' own wall times sum to "
                f"{sum(_num(r.get('wall_s')) for r in results) / 60:.1f} min.\n\n## Diagnostics\n\n"
                "Runs with factorized layers, first seed; layer means averaged over the rounds "
                "(effective rank: last round); losses averaged over the diagnosed rounds.\n\n"
                f"{diagnostics_table(out_dir)}\n")
    if plots:
        plot_accuracy(out_dir, results)
        plot_diagnostics(out_dir, results)


# ---------------------------------------------------------------------------- plots
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(curves: list[list[Any]]) -> list[float]:
    """Round-wise mean over seeds of accuracy curves, ignoring NaN (NaN where no seed has a value)."""
    length = max((len(c) for c in curves), default=0)
    return [_fmean(c[i] for c in curves if i < len(c)) for i in range(length)]


def _finite_points(values: list[float]) -> tuple[list[int], list[float]]:
    pts = [(i, v) for i, v in enumerate(values, 1) if math.isfinite(v)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_accuracy(out_dir: str, results: list[dict[str, Any]]) -> list[str]:
    """``accuracy_vs_round_<partition>.png`` (accuracy over rounds and, below, the gap to full in
    points; mean over seeds) and ``accuracy_vs_keep_ratio.png``. Returns the written paths."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    written = []
    named = STRATEGIES + OTHER_METHODS  # everything else is a variant
    figures = [("accuracy_vs_round", lambda r: r["strategy"] in named)]
    if any(r["strategy"] not in named for r in results):  # variants: with prism and full at their keep
        variant_keeps = {r["keep_ratio"] for r in results if r["strategy"] not in named}
        figures.append(("ablations", lambda r: r["strategy"] not in named or r["strategy"] == "full"
                        or (r["strategy"] == "prism" and r["keep_ratio"] in variant_keeps)))
    for (stem, keep_row), partition in [(f, p) for f in figures for p in sorted({r["partition"] for r in results})]:
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for r in results:
            if r["partition"] == partition and keep_row(r):
                groups.setdefault((r["strategy"], r["keep_ratio"]), []).append(r)
        if stem == "ablations" and not any(s not in named for s, _ in groups):
            continue
        full = next((rows for (s, _), rows in groups.items() if s == "full"), None)
        full_curve = _mean_curve([r["curve"] for r in full]) if full else None
        fig, (ax, gap_ax) = plt.subplots(2, 1, sharex=True, figsize=(7, 7), gridspec_kw={"height_ratios": [3, 2]})
        for i, ((strategy, keep), rows) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0]))):
            budgets = [b for b in (_budget(r, results) for r in rows) if b is not None]
            budget = f"{100 * statistics.fmean(budgets):.1f} %" if budgets else "?"
            kept = "" if rows[0].get("base_strategy") in OTHER_METHODS else f"keep {rows[0].get('actual_keep', keep):.3g}, "
            label = f"{strategy} ({kept}budget {budget})"
            curve = _mean_curve([r["curve"] for r in rows])
            styles = {"color": f"C{i % 10}", "linestyle": ("-", "--", ":")[i // 10 % 3]}
            ax.plot(*_finite_points(curve), marker=".", label=label, **styles)
            if full_curve is not None and strategy != "full":
                gap = [100 * (a - full_curve[j]) if j < len(full_curve) else math.nan for j, a in enumerate(curve)]
                gap_ax.plot(*_finite_points(gap), marker=".", label=label, **styles)
        seeds = len({r["seed"] for r in results if r["partition"] == partition})
        ax.set(ylabel="test accuracy", title=f"{stem.replace('_', ' ')}, {partition}"
               + (f" (mean of {seeds} seeds)" if seeds > 1 else ""))
        ax.legend(fontsize=7)
        gap_ax.axhline(0.0, color="gray", linewidth=0.8)
        gap_ax.set(xlabel="round", ylabel="gap to full (pts)")
        gap_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if full_curve is None:
            gap_ax.text(0.5, 0.5, "no full run", ha="center", va="center", transform=gap_ax.transAxes)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}_{partition}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = aggregate_rows(results)
    for row_key in sorted({(r["partition"], r["strategy"]) for r in rows}):
        pts = sorted((r["keep_ratio"], r["final_acc"][0]) for r in rows if (r["partition"], r["strategy"]) == row_key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{row_key[1]} ({row_key[0]})")
    ax.set(xlabel="keep ratio", ylabel="final test accuracy", title="final accuracy vs keep ratio")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "accuracy_vs_keep_ratio.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return written + [path]


def _draw(ax: Any, rounds: list[int], values: list[float], style: str, color: str, label: str) -> bool:
    """Plot the finite points of ``values`` over ``rounds``; False when there are none."""
    pts = [(x, v) for x, v in zip(rounds, values, strict=True) if math.isfinite(v)]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=label)
    return bool(pts)


def plot_diagnostics(out_dir: str, results: list[dict[str, Any]]) -> list[str]:
    """``diagnostics_<partition>.png`` per partition (first seed, first keep ratio, plain strategies),
    2×3 panels over rounds: energy kept and effective rank / rank (layer means), coverage, the train
    (solid), start (dashed) and dense-client (dotted) losses, and the relative change per component
    of the top-k components and of the others. Returns the written paths."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    written = []
    runs = [r for r in _diagnostic_runs(results) if r["strategy"] in STRATEGIES]  # variants: see the table
    for partition in sorted({r["partition"] for r in runs}):
        fig, axes = plt.subplots(2, 3, sharex=True, figsize=(14, 7))
        (energy_ax, cov_ax, top_ax), (rank_ax, loss_ax, rest_ax) = axes
        drawn = {id(ax): False for ax in axes.flat}
        for r in sorted((r for r in runs if r["partition"] == partition), key=lambda r: r["strategy"]):
            metrics = _read_metrics(_run_dir(out_dir, r))
            if not metrics:
                continue
            color = f"C{STRATEGIES.index(r['strategy']) % 10}" if r["strategy"] in STRATEGIES else "k"
            rounds = [int(_num(m.get("round"))) if math.isfinite(_num(m.get("round"))) else j
                      for j, m in enumerate(metrics, 1)]
            name = r["strategy"]
            series = [(energy_ax, [_layer_mean(m, "energy_kept") for m in metrics], "-", name),
                      (rank_ax, [_rank_ratio(m) for m in metrics], "-", name),
                      (top_ax, [_layer_mean(m, "delta_top") for m in metrics], "-", name),
                      (rest_ax, [_layer_mean(m, "delta_rest") for m in metrics], "-", name)]
            if name in PRINCIPAL_STRATEGIES or any(_num(m.get("coverage")) > 0 for m in metrics):
                series.append((cov_ax, [_num(m.get("coverage")) for m in metrics], "-", name))
            for field, style in (("train_loss", "-"), ("start_loss", "--"), ("dense_client_loss", ":")):
                label = name if field == "train_loss" else f"_{name} {field}"  # one legend entry per strategy
                series.append((loss_ax, [_num(m.get(field)) for m in metrics], style, label))
            for ax, values, style, label in series:
                if _draw(ax, rounds, values, style, color, label):
                    drawn[id(ax)] = True
        energy_ax.set(ylabel="energy kept (layer mean)", title="(a) energy kept")
        cov_ax.set(ylabel="coverage", title="(b) coverage")
        rank_ax.set(xlabel="round", ylabel="effective rank / rank", title="(c) effective rank ratio")
        loss_ax.set(xlabel="round", ylabel="loss", title="(d) train — / start -- / dense client ··")
        top_ax.set(ylabel="relative change", title="(e) Δ per component, top-k components")
        rest_ax.set(xlabel="round", ylabel="relative change", title="(f) Δ per component, the others")
        for ax in axes.flat:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if drawn[id(ax)]:
                ax.legend(fontsize=6)
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        fig.suptitle(f"diagnostics, {partition}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"diagnostics_{partition}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
