"""Result rows and run folders as numbers: finite means, budgets, each run's ``metrics.json`` and the
per-layer diagnostics in it (shared by the tables and the plots)."""

from __future__ import annotations

import glob
import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping
from typing import Any


def num(value: Any) -> float:
    """``value`` as a float; None / non-numbers become NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def fmean(values: Iterable[Any]) -> float:
    """Mean of the finite values (NaN if none)."""
    vals = [v for v in map(num, values) if math.isfinite(v)]
    return statistics.fmean(vals) if vals else math.nan


def fmt(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else ""


def run_budget(row: Mapping[str, Any], results: list[dict[str, Any]]) -> float | None:
    """Client params / dense params of a run; for rows of older benches without ``budget`` the same
    partition's full run gives the dense count."""
    if row["strategy"] == "full":
        return 1.0
    if row.get("budget") is not None:
        return float(row["budget"])
    dense = row.get("dense_params") or next(
        (r["client_params"] for r in results if r["strategy"] == "full" and r["partition"] == row["partition"]), None)
    return row["client_params"] / dense if dense else None


def read_metrics(folder: str) -> list[dict[str, Any]] | None:
    """The run's ``metrics.json`` rows, or None when it is missing or unreadable."""
    path = os.path.join(folder, "metrics.json")
    try:
        with open(path) as f:
            rows = json.load(f)
    except (OSError, ValueError):
        return None
    return rows if isinstance(rows, list) else None


def run_dir(results_dir: str, row: Mapping[str, Any]) -> str:
    """The run folder of a result row (rows of older benches: rebuilt from the naming scheme)."""
    if row.get("run_dir"):
        return os.path.join(results_dir, row["run_dir"])
    runs = os.path.join(results_dir, "runs")
    path = os.path.join(runs, f"{row['partition']}_{row['strategy']}_k{row['keep_ratio']:g}_s{row['seed']}")
    if row["strategy"] == "full" and not os.path.isdir(path):  # named after the bench's first keep ratio
        found = glob.glob(os.path.join(glob.escape(runs), f"{glob.escape(row['partition'])}_{row['strategy']}_k*_s{row['seed']}"))
        path = found[0] if len(found) == 1 else path
    return path


def layer_mean(row: Mapping[str, Any], field: str) -> float:
    """Mean over the row's ``layers`` of ``field`` (NaN without layers)."""
    layers = row.get("layers") or {}
    return fmean(v.get(field) for v in layers.values() if isinstance(v, Mapping))


def rank_ratio(row: Mapping[str, Any]) -> float:
    """Mean over the row's ``layers`` of effective_rank / rank."""
    layers = row.get("layers") or {}
    return fmean(num(v.get("effective_rank")) / v["rank"] for v in layers.values()
                  if isinstance(v, Mapping) and num(v.get("rank")) > 0)


def diagnostic_runs(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs the diagnostics show: the first seed and, per partition, the first keep ratio (and full)."""
    if not results:
        return []
    seed = results[0]["seed"]
    first_keep = next((r["keep_ratio"] for r in results if r["strategy"] != "full"), None)
    return [r for r in results if r["seed"] == seed and (r["strategy"] == "full" or r["keep_ratio"] == first_keep)]


def lr_group(row: Mapping[str, Any]) -> tuple:
    """The runs a learning-rate sweep compares: one (partition, keep ratio, strategy)."""
    return (row["partition"], row["keep_ratio"], row["strategy"])


def best_learning_rates(results: list[dict[str, Any]]) -> dict[tuple, float]:
    """Per :func:`lr_group` of the swept runs (rows with ``learning_rate``), the rate with the highest mean
    final accuracy over the seeds that ran every rate of the group (over each rate's runs while no seed
    has run them all); a tie goes to the smaller rate."""
    groups: dict[tuple, dict[float, dict[int, float]]] = {}
    for r in results:
        if r.get("learning_rate") is not None:
            groups.setdefault(lr_group(r), {}).setdefault(float(r["learning_rate"]), {})[r["seed"]] = num(r.get("final_acc"))
    best = {}
    for group, by_rate in groups.items():
        common = set.intersection(*(set(seeds) for seeds in by_rate.values()))
        score = {lr: fmean(v for s, v in seeds.items() if not common or s in common) for lr, seeds in by_rate.items()}
        ranked = sorted(score, key=lambda lr: (-(score[lr] if math.isfinite(score[lr]) else -math.inf), lr))
        best[group] = ranked[0]
    return best


def at_best_learning_rate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs a results table shows: every run outside a sweep, and the swept runs at their group's best rate."""
    best = best_learning_rates(results)
    return [r for r in results if r.get("learning_rate") is None or float(r["learning_rate"]) == best[lr_group(r)]]
