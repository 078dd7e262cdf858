"""``fedml-prism bench``: strategies side by side on the same partition, seeds and schedule.

Every run goes through the same runtime code as ``fedml-prism run`` (a :class:`~fedml_prism.runner.Job`
driven by :func:`~fedml_prism.simulation.run_sp`). Outputs in ``--out``: ``results.json``,
``results.md`` (final / best accuracy as mean ± spread over seeds, client params / MACs / bytes per
round, wall time), ``accuracy_vs_round_<partition>.png`` and ``accuracy_vs_keep_ratio.png``, plus one
sub-folder per run with its metrics and checkpoint (finished runs are skipped on a re-run: resumable).

Profiles:
- ``smoke``: digits, a tiny CNN, 2 rounds: seconds, for tests.
- ``cpu``: CIFAR-10, ResNet-18 at width 0.25, 100 clients × 500 samples, 10 per round, 1 local epoch,
  25 rounds (cosine lr from 0.05), Dirichlet α = 0.1 and iid, keep 0.2, strategies full / prism /
  orthdrop / origdrop; sized to finish within 45 minutes on 2 CPU cores (a width-0.25 step takes
  ~0.08 s, so a round of 10 × 16 steps is ~15 s; test accuracy every 5 rounds on all 10 000 images).
- ``paper``: the paper's ResNet-18 / CIFAR-10 setting (appendix A) for a GPU.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import statistics
import time
from typing import Any

from .runner import Job, job_from_sections, load_data
from .simulation import run_sp, summarize

log = logging.getLogger("fedml_prism")

_COMMON = {
    "common_args": {"training_type": "simulation"},
    "comm_args": {"backend": "sp"},
    "tracking_args": {"using_mlops": False, "checkpoint_every": 5},
    "validation_args": {"frequency_of_the_test": 1},
}

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {
        "sections": {
            "data_args": {"dataset": "digits"},
            "model_args": {"model": "cnn", "model_kwargs": {"in_channels": 1, "image_size": 8, "width": 0.25,
                                                             "hidden": 32, "num_classes": 10}},
            "train_args": {"client_num_in_total": 6, "client_num_per_round": 3, "comm_round": 2, "epochs": 1,
                           "batch_size": 32, "learning_rate": 0.05},
            "prism_args": {"kappa": 2.5},
        },
        "strategies": ["full", "prism", "orthdrop", "origdrop", "rolex", "uniform"],
        "keep_ratios": [0.2, 0.5],
        "partitions": [("iid", None)],
        "seeds": [0],
    },
    "cpu": {
        "sections": {
            "data_args": {"dataset": "cifar10", "data_path": "../shared/data/cifar10/cifar-10-batches-py.tar.xz",
                          "samples_per_client": 500},
            "model_args": {"model": "resnet18_cifar", "model_kwargs": {"width": 0.25, "num_classes": 10}},
            "train_args": {"client_num_in_total": 100, "client_num_per_round": 10, "comm_round": 25, "epochs": 1,
                           "batch_size": 32, "learning_rate": 0.05, "weight_decay": 5e-4, "lr_schedule": "cosine",
                           "augment": "flip_crop", "torch_threads": 2},
            "validation_args": {"frequency_of_the_test": 5},
            "prism_args": {"kappa": 2.5},
        },
        "strategies": ["full", "prism", "orthdrop", "origdrop"],
        "keep_ratios": [0.2],
        "partitions": [("dirichlet", 0.1), ("iid", None)],
        "seeds": [0],
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
            "prism_args": {"kappa": 2.5},
        },
        "strategies": ["full", "prism", "orthdrop", "origdrop", "rolex", "uniform"],
        "keep_ratios": [0.2],
        "partitions": [("dirichlet", 0.1), ("iid", None)],
        "seeds": [0],
    },
}


def _partition_name(method: str, alpha: float | None) -> str:
    return method if alpha is None else f"{method}{alpha:g}"


def plan_runs(profile: dict[str, Any], base_dir: str, overrides: dict[str, Any]) -> list[tuple[dict, Job]]:
    """Every (partition, keep ratio, strategy, seed) of the profile as a validated Job."""
    runs = []
    for method, alpha in overrides.get("partitions") or profile["partitions"]:
        for keep in overrides.get("keep_ratios") or profile["keep_ratios"]:
            for strategy in overrides.get("strategies") or profile["strategies"]:
                if strategy == "full" and keep != (overrides.get("keep_ratios") or profile["keep_ratios"])[0]:
                    continue  # full FedAvg does not depend on the keep ratio
                for seed in overrides.get("seeds") or profile["seeds"]:
                    sections = copy.deepcopy(_COMMON) | copy.deepcopy(profile["sections"])
                    sections["data_args"]["partition_method"] = method
                    if alpha is not None:
                        sections["data_args"]["partition_alpha"] = alpha
                    sections["prism_args"].update({"strategy": strategy, "keep_ratio": keep, "seed": seed})
                    if overrides.get("rounds"):
                        sections["train_args"]["comm_round"] = overrides["rounds"]
                    if overrides.get("data_path"):
                        sections["data_args"]["data_path"] = overrides["data_path"]
                    key = {"partition": _partition_name(method, alpha), "keep_ratio": keep if strategy != "full" else 1.0,
                           "strategy": strategy, "seed": seed}
                    out = os.path.join(base_dir, "runs", f"{key['partition']}_{strategy}_k{keep:g}_s{seed}")
                    runs.append((key, job_from_sections(sections, os.path.join(os.getcwd(), "bench.yaml"), out)))
    return runs


def run_bench(profile_name: str, out_dir: str, overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run a profile; returns the result rows (also written to ``out_dir``)."""
    if profile_name not in PROFILES:
        raise ValueError(f"--profile {profile_name!r} is invalid: allowed {', '.join(PROFILES)}")
    overrides = overrides or {}
    out_dir = os.path.abspath(out_dir)
    runs = plan_runs(PROFILES[profile_name], out_dir, overrides)
    # loads the data once before any training: missing dataset files fail here, and every run
    # shares the dataset, so its input shape is known
    input_shape = tuple(load_data(runs[0][1]).x_train.shape[1:])
    results = []
    started = time.time()
    for i, (key, job) in enumerate(runs, 1):
        log.info("bench %d/%d: %s", i, len(runs), key)
        server = run_sp(job, resume=True, progress=False)
        row = dict(key)
        row.update(summarize(server, input_shape))
        row["keep_ratio"] = key["keep_ratio"]
        row["curve"] = [m["test_acc"] for m in server.metrics]
        results.append(row)
        _write(out_dir, profile_name, results, time.time() - started)
    return results


def aggregate_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± spread (sample std; 0 for one seed) over seeds of each (partition, keep, strategy)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["partition"], r["keep_ratio"], r["strategy"]), []).append(r)
    out = []
    for (partition, keep, strategy), rows in groups.items():
        def stat(field: str, rows: list[dict[str, Any]] = rows) -> tuple[float, float]:
            vals = [r[field] for r in rows]
            return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

        out.append({
            "partition": partition, "keep_ratio": keep, "strategy": strategy, "seeds": len(rows),
            "final_acc": stat("final_acc"), "best_acc": stat("best_acc"),
            "client_params": rows[0]["client_params"], "client_macs": rows[0]["client_macs"],
            "dense_macs": rows[0]["dense_macs"], "bytes_per_round": statistics.fmean(r["bytes_per_round"] for r in rows),
            "wall_s": statistics.fmean(r["wall_s"] for r in rows),
        })
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| partition | strategy | keep | final acc (%) | best acc (%) | client params | client MACs | MB / round | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["partition"], r["keep_ratio"], r["strategy"])):
        (fm, fs), (bm, bs) = r["final_acc"], r["best_acc"]
        lines.append(
            f"| {r['partition']} | {r['strategy']} | {r['keep_ratio']:g} | {100 * fm:.2f} ± {100 * fs:.2f} | "
            f"{100 * bm:.2f} ± {100 * bs:.2f} | {r['client_params']:,} | {r['client_macs']:,} | "
            f"{r['bytes_per_round'] / 1e6:.2f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def _write(out_dir: str, profile: str, results: list[dict[str, Any]], elapsed: float) -> None:
    os.makedirs(out_dir, exist_ok=True)
    rows = aggregate_rows(results)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"profile": profile, "elapsed_s": elapsed, "runs": results, "summary": rows}, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(f"# fedml-prism bench, profile `{profile}`\n\n{markdown_table(rows)}\n\n"
                f"Total wall time: {elapsed / 60:.1f} min.\n")
    _plots(out_dir, results)


def _plots(out_dir: str, results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for partition in sorted({r["partition"] for r in results}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in results:
            if r["partition"] == partition and r["seed"] == results[0]["seed"]:
                points = [(i, a) for i, a in enumerate(r["curve"], 1) if a is not None and not math.isnan(a)]
                ax.plot([p[0] for p in points], [p[1] for p in points], marker=".",
                        label=f"{r['strategy']} ({r['keep_ratio']:g})")
        ax.set(xlabel="round", ylabel="test accuracy", title=f"accuracy vs round, {partition}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"accuracy_vs_round_{partition}.png"), dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for row_key in sorted({(r["partition"], r["strategy"]) for r in aggregate_rows(results)}):
        pts = sorted((r["keep_ratio"], r["final_acc"][0]) for r in aggregate_rows(results)
                     if (r["partition"], r["strategy"]) == row_key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{row_key[1]} ({row_key[0]})")
    ax.set(xlabel="keep ratio", ylabel="final test accuracy", title="final accuracy vs keep ratio")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy_vs_keep_ratio.png"), dpi=120)
    plt.close(fig)

