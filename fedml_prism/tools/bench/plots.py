"""The plots: accuracy (and the gap to full) over rounds, final accuracy over keep ratios, and the
per-round diagnostics of the principal strategies."""

from __future__ import annotations

import math
import os
import statistics
from typing import Any

from ...engine.config import PRINCIPAL_STRATEGIES, STRATEGIES
from ...strategies import OTHER_METHODS
from .rows import diagnostic_runs, fmean, layer_mean, num, rank_ratio, read_metrics, run_budget, run_dir
from .tables import aggregate_rows


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(curves: list[list[Any]]) -> list[float]:
    """Round-wise mean over seeds of accuracy curves, ignoring NaN (NaN where no seed has a value)."""
    length = max((len(c) for c in curves), default=0)
    return [fmean(c[i] for c in curves if i < len(c)) for i in range(length)]


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
            budgets = [b for b in (run_budget(r, results) for r in rows) if b is not None]
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
    runs = [r for r in diagnostic_runs(results) if r["strategy"] in STRATEGIES]  # variants: see the table
    for partition in sorted({r["partition"] for r in runs}):
        fig, axes = plt.subplots(2, 3, sharex=True, figsize=(14, 7))
        (energy_ax, cov_ax, top_ax), (rank_ax, loss_ax, rest_ax) = axes
        drawn = {id(ax): False for ax in axes.flat}
        for r in sorted((r for r in runs if r["partition"] == partition), key=lambda r: r["strategy"]):
            metrics = read_metrics(run_dir(out_dir, r))
            if not metrics:
                continue
            color = f"C{STRATEGIES.index(r['strategy']) % 10}" if r["strategy"] in STRATEGIES else "k"
            rounds = [int(num(m.get("round"))) if math.isfinite(num(m.get("round"))) else j
                      for j, m in enumerate(metrics, 1)]
            name = r["strategy"]
            series = [(energy_ax, [layer_mean(m, "energy_kept") for m in metrics], "-", name),
                      (rank_ax, [rank_ratio(m) for m in metrics], "-", name),
                      (top_ax, [layer_mean(m, "delta_top") for m in metrics], "-", name),
                      (rest_ax, [layer_mean(m, "delta_rest") for m in metrics], "-", name)]
            if name in PRINCIPAL_STRATEGIES or any(num(m.get("coverage")) > 0 for m in metrics):
                series.append((cov_ax, [num(m.get("coverage")) for m in metrics], "-", name))
            for field, style in (("train_loss", "-"), ("start_loss", "--"), ("dense_client_loss", ":")):
                label = name if field == "train_loss" else f"_{name} {field}"  # one legend entry per strategy
                series.append((loss_ax, [num(m.get(field)) for m in metrics], style, label))
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
