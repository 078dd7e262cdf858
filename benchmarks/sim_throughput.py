"""Simulation throughput per ``parallel_clients`` mode: rounds per second and client-samples per second.

Runs one strategy of a bench profile (``config/bench/<profile>.yaml``, its ``sections``) end to end with
``fedml-prism``'s sp driver once per mode, side by side on one machine, and reports per mode: the run's
wall time (pool start and evaluation included, data loading excluded), the median round time (rounds
without evaluation), client-samples per second (clients per round × samples per client × epochs /
median round time), the final accuracy and its difference from the sequential run, and the speed-up
over sequential. Each mode's result is saved as soon as it is measured (``<out>/runs/<tag>_<mode>.json``)
and reused by a later invocation (``--force`` measures again), so an interrupted benchmark resumes.

    python benchmarks/sim_throughput.py --profile fidelity --rounds 30 --out benchmarks/results/sim_throughput
    python benchmarks/sim_throughput.py --profile paper --rounds 2 --clients-per-round 4 --samples-per-client 64 \\
        --epochs 1 --device cpu --out benchmarks/results/sim_throughput   # a CPU-sized paper round
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from fedml_prism.job import job_from_sections, load_data
from fedml_prism.runtimes.parallel import available_cores
from fedml_prism.runtimes.simulation import run_sp
from fedml_prism.tools.bench.profiles import COMMON, PROFILE_DIR

MODES = ("sequential", "processes", "vectorized")


def sections_for(args: argparse.Namespace, mode: str, out_dir: str) -> dict[str, dict[str, Any]]:
    profile = yaml.safe_load((PROFILE_DIR / f"{args.profile}.yaml").read_text())
    sections = copy.deepcopy(COMMON)
    for name, values in profile["sections"].items():
        sections.setdefault(name, {}).update(copy.deepcopy(values))
    train = sections.setdefault("train_args", {})
    train.update(comm_round=args.rounds, parallel_clients=mode, diagnostics=False)
    train.pop("torch_threads", None)
    if args.threads:
        train["torch_threads"] = args.threads
    if args.clients_per_round:
        train["client_num_per_round"] = args.clients_per_round
    if args.epochs:
        train["epochs"] = args.epochs
    if args.samples_per_client:
        sections["data_args"]["samples_per_client"] = args.samples_per_client
    sections["data_args"].update(partition_method="dirichlet", partition_alpha=0.1)
    if path := sections["data_args"].get("data_path"):  # relative to the working directory, as for bench
        sections["data_args"]["data_path"] = os.path.abspath(path)
    sections.setdefault("validation_args", {})["frequency_of_the_test"] = args.eval_every
    sections["tracking_args"] = {**sections.get("tracking_args", {}), "output_dir": out_dir,
                                 "checkpoint_every": args.rounds}
    prism = sections.setdefault("prism_args", {})
    prism.update(strategy=args.strategy, keep_ratio=args.keep_ratio)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sections["device_args"] = {"using_gpu": device != "cpu", "device": device}
    return sections


def measure(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        sections = sections_for(args, mode, os.path.join(tmp, "out"))
        job = job_from_sections(sections, os.path.join(tmp, f"{args.profile}.yaml"))
        data = load_data(job)
        total = job.settings.client_num_in_total
        per_client = sum(len(data.client_dataset(c)) for c in range(total)) / total
        start = time.perf_counter()
        server = run_sp(job, progress=False)
        wall = time.perf_counter() - start
    rows = server.metrics
    plain = [r["round_s"] for r in rows if r["test_acc"] != r["test_acc"]] or [r["round_s"] for r in rows]
    accs = [r["test_acc"] for r in rows if r["test_acc"] == r["test_acc"]]
    s = job.settings
    samples = s.client_num_per_round * per_client * s.epochs
    median = statistics.median(plain)
    return {"mode": mode, "rounds": len(rows), "wall_s": wall, "median_round_s": median, "rounds_per_s": 1 / median,
            "client_samples_per_s": samples / median, "final_acc": accs[-1] if accs else float("nan"),
            "clients_per_round": s.client_num_per_round, "samples_per_client": per_client,
            "epochs": s.epochs, "device": job.device, "torch_threads": job.threads}


def table(rows: list[dict[str, Any]]) -> str:
    base = {r["tag"]: r for r in rows if r["mode"] == "sequential"}
    lines = ["| run | mode | rounds | wall s | median round s | rounds/s | client-samples/s | speed-up (round) | "
             "speed-up (wall) | final acc (%) | Δ acc vs sequential (pts) |", "|---" * 11 + "|"]
    for r in rows:
        b = base.get(r["tag"])
        up = f"{b['median_round_s'] / r['median_round_s']:.2f}×" if b else ""
        up_wall = f"{b['wall_s'] / r['wall_s']:.2f}×" if b else ""
        delta = f"{100 * (r['final_acc'] - b['final_acc']):+.2f}" if b else ""
        lines.append(f"| {r['tag']} | {r['mode']} | {r['rounds']} | {r['wall_s']:.1f} | {r['median_round_s']:.2f} | "
                     f"{r['rounds_per_s']:.3f} | {r['client_samples_per_s']:.0f} | {up} | {up_wall} | "
                     f"{100 * r['final_acc']:.2f} | {delta} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="fidelity", help="a bench profile whose sections are used (config/bench/)")
    p.add_argument("--strategy", default="prism")
    p.add_argument("--keep-ratio", type=float, default=0.2)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--clients-per-round", type=int)
    p.add_argument("--samples-per-client", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--threads", type=int, help="torch_threads of the sequential and vectorized runs (default: torch's)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    p.add_argument("--tag", help="the run's name in the table (default: PROFILE-STRATEGY-DEVICE)")
    p.add_argument("--out", default="benchmarks/results/sim_throughput")
    p.add_argument("--force", action="store_true", help="measure again even where a result is saved")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if bad := [m for m in modes if m not in MODES]:
        p.error(f"--modes entry {bad[0]!r} is invalid: allowed {', '.join(MODES)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tag = args.tag or f"{args.profile}-{args.strategy}-{device}"
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for mode in modes:
        path = out / "runs" / f"{tag}_{mode}.json"
        if path.exists() and not args.force:
            print(f"{tag} {mode}: saved result reused ({path})", file=sys.stderr)
            continue
        row = {"tag": tag, "profile": args.profile, "strategy": args.strategy, "keep_ratio": args.keep_ratio,
               **measure(args, mode), "cores": available_cores(), "machine": platform.processor() or platform.machine(),
               "command": " ".join(sys.argv)}
        path.write_text(json.dumps(row, indent=1))
        print(json.dumps(row), flush=True)
    rows = [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*.json"))]
    rows.sort(key=lambda r: (r["tag"], MODES.index(r["mode"])))
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    text = table(rows)
    (out / "results.md").write_text("# Simulation throughput per parallel_clients mode\n\n"
                                    "`benchmarks/sim_throughput.py`; each row's command and machine are in "
                                    "`results.json`.\n\n" + text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
