"""Planning: every (partition, keep ratio, strategy, seed) of a profile as a validated Job."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

from ...job import Job, job_from_sections
from ...strategies import OTHER_METHODS
from .matching import KeepMatcher, resolve_match
from .profiles import COMMON, partition_name


def _runs_here(variant: Mapping[str, Any], keep: float, partition: str) -> bool:
    """Whether a variant runs at this keep ratio and partition (by default: everywhere)."""
    return keep in variant.get("keep_ratios", [keep]) and partition in variant.get("partitions", [partition])


def _run_sections(
    profile: Mapping[str, Any], variant: Mapping[str, Any], partition: tuple[str, float | None],
    base: str, keep: float, seed: int, overrides: Mapping[str, Any],
) -> dict[str, dict[str, Any]]:
    """One run's config sections: the common ones, the profile's, the partition, the variant's
    sections and prism_args, then strategy, keep ratio and seed, and the ``--rounds`` / ``--data-path``
    overrides."""
    method, alpha = partition
    sections = copy.deepcopy(COMMON) | copy.deepcopy(dict(profile["sections"]))
    sections.setdefault("data_args", {})["partition_method"] = method
    if alpha is not None:
        sections["data_args"]["partition_alpha"] = alpha
    for name, values in variant.get("sections", {}).items():
        sections.setdefault(name, {}).update(copy.deepcopy(values))
    prism_args = sections.setdefault("prism_args", {})
    prism_args.update(variant.get("prism_args", {}))
    prism_args.update({"strategy": base, "keep_ratio": keep, "seed": seed})
    if overrides.get("rounds"):
        sections.setdefault("train_args", {})["comm_round"] = overrides["rounds"]
    if overrides.get("data_path"):
        sections["data_args"]["data_path"] = overrides["data_path"]
    return sections


def _rates(profile: Mapping[str, Any], variant: Mapping[str, Any], seed: int, seeds: list[int],
           best: Mapping[tuple, float] | None, group: tuple) -> list[float | None]:
    """The learning rates one (strategy, seed) runs at: ``[None]`` (the sections' own) without a sweep;
    the whole grid on a sweep seed; on another seed the group's best rate once ``best`` knows it, else
    nothing yet."""
    grid = variant.get("learning_rates") or profile.get("learning_rates")
    if not grid:
        return [None]
    if seed in (profile.get("sweep_seeds") or seeds):
        return list(grid)
    return [best[group]] if best and group in best else []


def plan_runs(
    profile: Mapping[str, Any], base_dir: str, overrides: Mapping[str, Any], match: str | None = None,
    best_lr: Mapping[tuple, float] | None = None,
) -> list[tuple[dict, Job]]:
    """Every (partition, keep ratio, strategy, seed) of the profile as a validated Job; with a learning-rate
    sweep (``learning_rates``), every rate of the grid on the sweep seeds and, on the other seeds, the best
    rate of each (partition, keep ratio, strategy) from ``best_lr`` (none of them before it is known).

    With ``match="params"`` (or the profile's ``"match": "params"``) every non-full strategy runs at
    the keep ratio whose client sub-model has as many parameters as the ``prism`` sub-model at the
    profile's keep ratio (orthdrop / uniform: the same keep; origdrop / rolex: a larger one). Each
    key holds the nominal ``keep_ratio`` (for grouping) and the ``actual_keep`` used; the run folder
    is named after the actual keep."""
    match = resolve_match(match, profile)
    keeps = overrides.get("keep_ratios") or profile["keep_ratios"]
    matcher = KeepMatcher()
    bench_yaml = os.path.join(os.getcwd(), "bench.yaml")  # relative paths in the sections: from here
    runs = []
    for partition in overrides.get("partitions") or profile["partitions"]:
        part = partition_name(*partition)
        for keep in keeps:
            for strategy in overrides.get("strategies") or profile["strategies"]:
                variant = profile.get("variants", {}).get(strategy, {})
                base = variant.get("prism_args", {}).get("strategy", strategy)
                no_keep = base == "full" or base in OTHER_METHODS  # they do not use the keep ratio
                if (no_keep and keep != keeps[0]) or not _runs_here(variant, keep, part):
                    continue
                seeds = list(overrides.get("seeds") or profile["seeds"])
                if profile.get("sweep_seeds") and not set(seeds) & set(profile["sweep_seeds"]):
                    raise ValueError(f"--seeds {seeds} is invalid for this profile: it holds none of its sweep_seeds "
                                     f"{profile['sweep_seeds']} (the seeds that choose each strategy's learning rate)")
                group = (part, keep if not no_keep else 1.0, strategy)
                for seed in seeds:
                    if seed not in variant.get("seeds", [seed]):
                        continue
                    for lr in _rates(profile, variant, seed, seeds, best_lr, group):
                        sections = _run_sections(profile, variant, partition, base, keep, seed, overrides)
                        real = keep
                        if match is not None and not no_keep:
                            real = matcher.keep(base, keep, lambda s=sections: job_from_sections(s, bench_yaml))
                            sections["prism_args"]["keep_ratio"] = real
                        key = {"partition": part, "keep_ratio": group[1],
                               "actual_keep": real if not no_keep else 1.0, "strategy": strategy, "seed": seed}
                        # full keeps its historical folder name (nominal first keep): it does not use the ratio
                        name = f"{part}_{strategy}_k{real:g}_s{seed}"
                        if lr is not None:
                            sections.setdefault("train_args", {})["learning_rate"] = lr
                            key["learning_rate"] = lr
                            name = f"{part}_{strategy}_k{real:g}_lr{lr:g}_s{seed}"
                        runs.append((key, job_from_sections(sections, bench_yaml, os.path.join(base_dir, "runs", name))))
    return runs
