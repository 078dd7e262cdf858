"""The results and diagnostics tables (markdown) and the aggregation over seeds behind them."""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any

from ...strategies import OTHER_METHODS
from .rows import (
    best_learning_rates,
    fmean,
    fmt,
    layer_mean,
    lr_group,
    num,
    rank_ratio,
    read_metrics,
    run_budget,
    run_dir,
)


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

        budgets = [b for b in (run_budget(r, results) for r in rows) if b is not None]
        out.append({
            "partition": partition, "keep_ratio": keep, "strategy": strategy, "seeds": len(rows),
            "actual_keep": rows[0].get("actual_keep", keep),
            "final_acc": stat("final_acc"), "best_acc": stat("best_acc"),
            "last3_acc": _last3([r.get("curve") or [] for r in rows]),
            "client_params": rows[0]["client_params"], "client_macs": rows[0]["client_macs"],
            "dense_macs": rows[0].get("dense_macs"), "budget": statistics.fmean(budgets) if budgets else None,
            "peak_train_mb": fmean(r.get("peak_train_mb") for r in rows),
            "setting": rows[0].get("setting", ""), "learning_rate": rows[0].get("learning_rate"),
            "method": rows[0].get("base_strategy") in OTHER_METHODS,
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
        finite = [v for v in map(num, curve) if math.isfinite(v)]
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
        setting = r.get("setting", "") + (f"; lr {r['learning_rate']:g}" if r.get("learning_rate") is not None else "")
        keep = ("—", "—") if r.get("method") else (f"{r['keep_ratio']:g}", f"{r.get('actual_keep', r['keep_ratio']):.4g}")
        lines.append(
            f"| {r['partition']} | {r['strategy']} | {setting} | {keep[0]} | {keep[1]} | "
            f"{budget} | {100 * fm:.2f} ± {100 * fs:.2f} | {gap} | {fmt(100 * num(r.get('last3_acc')), 2)} | "
            f"{100 * bm:.2f} ± {100 * bs:.2f} | "
            f"{r['client_params']:,} | {r['client_macs']:,} | {fmt(num(r.get('peak_train_mb')), 1)} | "
            f"{r['bytes_per_round'] / 1e6:.2f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def sweep_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of a learning-rate sweep: per (partition, keep, strategy), the mean final accuracy at
    every rate and the number of seeds behind it, the best rate starred; empty without swept runs."""
    swept = [r for r in results if r.get("learning_rate") is not None]
    if not swept:
        return ""
    best = best_learning_rates(results)
    rates = sorted({float(r["learning_rate"]) for r in swept})
    lines = ["| partition | strategy | keep | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |",
             "|---|---|---|" + "---|" * len(rates)]
    for group in sorted({lr_group(r) for r in swept}):
        cells = []
        for lr in rates:
            accs = [r["final_acc"] for r in swept if lr_group(r) == group and float(r["learning_rate"]) == lr]
            star = "*" if best[group] == lr else ""
            cells.append(f"{100 * fmean(accs):.2f}{star} ({len(accs)})" if accs else "")
        lines.append(f"| {group[0]} | {group[2]} | {group[1]:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: the per-run diagnostics :func:`run_diagnostics` gives, in the diagnostics table's column order
DIAGNOSTICS = ("energy_kept", "coverage", "rank_ratio", "delta_top", "delta_rest", "start_loss", "train_loss",
               "dense_client_loss")


def run_diagnostics(metrics: list[dict[str, Any]]) -> dict[str, float] | None:
    """One run's diagnostics from its ``metrics.json`` rows (None without per-layer rows): layer means,
    averaged over the rounds, of ``energy_kept``, ``coverage``, ``delta_top``, ``delta_rest``; ``rank_ratio``
    (effective rank / rank, last round); and the means over the diagnosed rounds of ``start_loss``,
    ``train_loss`` and ``dense_client_loss``."""
    with_layers = [m for m in metrics if m.get("layers")]
    if not with_layers:
        return None
    diagnosed = [m for m in metrics if math.isfinite(num(m.get("start_loss")))]
    out = {k: fmean(layer_mean(m, k) for m in with_layers) for k in ("energy_kept", "coverage", "delta_top", "delta_rest")}
    out["rank_ratio"] = rank_ratio(with_layers[-1])
    out.update({k: fmean(num(m.get(k)) for m in diagnosed) for k in ("start_loss", "train_loss", "dense_client_loss")})
    return out


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
        if r["seed"] != seed or r.get("at_best_lr") is False:
            continue
        d = run_diagnostics(read_metrics(run_dir(results_dir, r)) or [])
        if d is None:
            continue
        body.append(f"| {r['partition']} | {r['strategy']} | {r['keep_ratio']:g} | "
                    + " | ".join(fmt(d[k], 3) for k in DIAGNOSTICS) + " |")
    if not body:
        return "No per-round diagnostics: no principal-strategy run has a metrics.json."
    return "\n".join(lines + body)
