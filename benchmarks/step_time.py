"""Client training cost of a PriSM sub-model next to the dense model (CPU by default).

Trains ResNet-18 (paper Table 2, static BN) dense and as a keep-ρ PriSM sub-model for a few SGD steps
on random CIFAR-shaped batches and prints JSON plus a short table:

- step time: the two models' steps are interleaved in one process (dense, sub, dense, sub, …) so
  machine noise hits both alike; medians and their ratio are reported;
- peak memory: each model trains in a fresh child process that builds it the way a client does
  (the sub-model from its wire payload, never materializing the dense weights); the figure is the
  peak resident set size minus the RSS right before the model was built.

    python benchmarks/step_time.py --steps 8 --batch-size 32 --keep-ratio 0.2 [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from fedml_prism import PrincipalModel, PrismConfig, SubModel, convert_static_bn
from fedml_prism.engine.train import make_optimizer, principal_regularizer
from fedml_prism.strategies.base import proc_status_kb, reset_peak_rss
from fedml_prism.workloads.models import create_model


def _step(module: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, sync) -> float:
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(module(x), y) + principal_regularizer(module, 5e-4)
    loss.backward()
    opt.step()
    sync()
    return time.perf_counter() - t


def _child(args: argparse.Namespace) -> None:
    """Build one model as a client would and report its training peak memory."""
    torch.set_num_threads(args.threads)
    torch.zeros(1).relu()  # load kernels before the baseline
    reset_peak_rss()
    base = proc_status_kb("VmRSS")
    template = convert_static_bn(create_model(args.model, width=args.width)).to("meta")
    if args.payload:
        module = SubModel.from_payload(torch.load(args.payload, weights_only=True), template).module
    else:
        module = convert_static_bn(create_model(args.model, width=args.width))
    opt = make_optimizer(module, 0.1)
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    for _ in range(2):
        _step(module, opt, x, y, lambda: None)
    peak = proc_status_kb("VmHWM")
    print(json.dumps({"peak_rss_mb": (peak - base) / 1024}))


def _memory(args: argparse.Namespace, payload: str | None) -> float:
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--width", str(args.width),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    if payload:
        cmd += ["--payload", payload]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18_cifar")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--keep-ratio", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--payload", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = create_model(args.model, width=args.width)
    pm = PrincipalModel(model, PrismConfig(keep_ratio=args.keep_ratio))
    sub = pm.sample_submodel(client_id=0, round_idx=0)
    formats = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    runs = {}
    for fmt_name, fmt in formats.items():
        for name, module in (("dense", pm.dense_model(device)), ("sub", copy.deepcopy(sub.module).to(device))):
            module = module.to(memory_format=fmt)
            runs[(name, fmt_name)] = (module, make_optimizer(module, 0.1), fmt)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for i in range(args.steps + 2):  # two warm-up steps each, then interleaved measurements
        for key, (module, opt, fmt) in runs.items():
            t = _step(module, opt, x.contiguous(memory_format=fmt), y, sync)
            if i >= 2:
                times[key].append(t)
    medians = {f"{n}_{f}": statistics.median(ts) for (n, f), ts in times.items()}
    result = {
        "model": args.model, "width": args.width, "keep_ratio": args.keep_ratio, "batch_size": args.batch_size,
        "device": str(device), "threads": args.threads, "steps": args.steps, "step_s_median": medians,
        "dense_step_s_median": min(v for k, v in medians.items() if k.startswith("dense")),
        "sub_step_s_median": min(v for k, v in medians.items() if k.startswith("sub")),
    }
    # each model at its faster memory format, as a client would run it
    result["step_time_ratio"] = result["sub_step_s_median"] / result["dense_step_s_median"]
    result["step_time_ratio_same_format"] = {f: medians[f"sub_{f}"] / medians[f"dense_{f}"] for f in formats}
    if device.type == "cpu":
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "payload.pt")
            torch.save(sub.to_payload("down"), path)
            result["dense_peak_train_mb"] = _memory(args, None)
            result["sub_peak_train_mb"] = _memory(args, path)
        result["peak_memory_ratio"] = result["sub_peak_train_mb"] / result["dense_peak_train_mb"]
    else:
        result["peak_memory_ratio"] = None
    print(json.dumps(result, indent=2))
    print(f"\n{'':22}{'dense':>10}{'keep ' + str(args.keep_ratio):>12}{'ratio':>8}")
    print(f"{'step time (s, median)':22}{result['dense_step_s_median']:>10.3f}{result['sub_step_s_median']:>12.3f}"
          f"{result['step_time_ratio']:>8.2f}")
    if result["peak_memory_ratio"] is not None:
        print(f"{'peak train memory MB':22}{result['dense_peak_train_mb']:>10.0f}{result['sub_peak_train_mb']:>12.0f}"
              f"{result['peak_memory_ratio']:>8.2f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
