"""A client's training memory by model, strategy and ``activation_memory`` (plain autograd vs principal width).

For each model and client sub-model (dense, PriSM keep 0.2 and 0.5, OrthDrop keep 0.2, OrigDrop and
FedRolex at PriSM keep 0.2's parameter budget), each trained with ``activation_memory: full`` (plain
autograd) and ``principal`` (selective recomputation, :mod:`fedml_prism.engine.recompute`), at each batch
size it measures:

- ``activation_mb``: what the training forward leaves allocated for the backward pass
  (:func:`fedml_prism.engine.costs.activation_bytes`: the allocator's count, checkpoints included);
- ``state_mb``: parameters + gradients + SGD momentum (3 × the parameters' bytes);
- ``peak_rss_mb``: peak resident memory above the baseline of a fresh process that builds the sub-model
  from its wire payload on a meta template (as a client does) and trains two steps through
  ``engine.train.local_train`` (the client's path), with glibc's default allocator settings;
  ``peak_rss_trim_mb``: the same with ``MALLOC_MMAP_THRESHOLD_=131072``, which stops glibc from raising
  its mmap threshold, so freed tensors go back to the OS and the peak follows the live tensors;
- ``step_s``: median time of one ``local_train`` step (one batch), every row of a model and batch size
  interleaved in one process so machine noise hits them alike.

Results go to ``<out>/results.json`` (resumable: finished (model, batch) groups are skipped) and
``<out>/results.md``. ::

    python benchmarks/client_memory.py --out benchmarks/results/client_memory
    python benchmarks/client_memory.py --models cnn --batch-sizes 32 --steps 3 --out /tmp/cm
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
from typing import Any

import torch

from fedml_prism import PrincipalModel, PrismConfig, SubModel
from fedml_prism.engine.attention import convert_attention
from fedml_prism.engine.costs import activation_bytes
from fedml_prism.engine.layers import convert_static_bn
from fedml_prism.engine.train import local_train
from fedml_prism.strategies.base import proc_status_kb, reset_peak_rss
from fedml_prism.tools.bench import ParamCounter, match_keep_ratio
from fedml_prism.workloads.models import create_model

#: the models measured: name, constructor arguments, one sample's shape and dtype, the target's extra shape
MODELS: dict[str, dict[str, Any]] = {
    "resnet18_cifar": {"kwargs": {}, "input": (3, 32, 32)},
    # the fidelity profile's CNN
    "cnn": {"kwargs": {"in_channels": 3, "image_size": 32, "width": 0.5, "hidden": 160, "num_classes": 10},
            "input": (3, 32, 32)},
    "vit_small": {"kwargs": {}, "input": (3, 32, 32)},
    "char_lstm": {"kwargs": {}, "input": (80,), "tokens": 90},
}
MODES = ("full", "principal")


def batch_for(name: str, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch the model takes, and its labels (per position for the character model)."""
    spec = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    if "tokens" in spec:
        x = torch.randint(0, spec["tokens"], (batch_size, *spec["input"]), generator=g)
        return x, torch.randint(0, spec["tokens"], (batch_size, *spec["input"]), generator=g)
    return torch.randn(batch_size, *spec["input"], generator=g), torch.randint(0, 10, (batch_size,), generator=g)


def template_of(name: str) -> torch.nn.Module:
    """The dense model a client holds on the meta device (static BN, factorizable attention)."""
    return convert_attention(convert_static_bn(create_model(name, **MODELS[name]["kwargs"]))).to("meta")


def sub_models(name: str) -> list[dict[str, Any]]:
    """The client sub-models of one model (round 0, client 0), with their down payloads."""
    model = create_model(name, **MODELS[name]["kwargs"])
    counter = ParamCounter(model)
    target = counter.count("prism", 0.2)
    specs: list[tuple[str, str, float | None]] = [
        ("dense", "full", 1.0), ("PriSM keep 0.2", "prism", 0.2), ("PriSM keep 0.5", "prism", 0.5),
        ("OrthDrop keep 0.2", "orthdrop", 0.2), ("OrigDrop at PriSM 0.2's params", "origdrop", None),
        ("FedRolex at PriSM 0.2's params", "rolex", None),
    ]
    out = []
    for label, strategy, keep in specs:
        try:
            keep = keep if keep is not None else match_keep_ratio(model, strategy, target, counter=counter)
            sub = PrincipalModel(model, PrismConfig(strategy=strategy, keep_ratio=keep)).sample_submodel(0, 0, record=False)
        except ValueError as err:  # origdrop / rolex need an fx-traceable model
            out.append({"label": label, "strategy": strategy, "skipped": str(err).splitlines()[0]})
            continue
        params = sum(p.numel() for p in sub.module.parameters())
        out.append({"label": label, "strategy": strategy, "keep_ratio": keep, "params": params,
                    "payload": sub.to_payload("down")})
    return out


def _child(args: argparse.Namespace) -> None:
    """Fresh process: build the sub-model from its payload and train two steps as a client does."""
    torch.set_num_threads(args.threads)
    # first use of the runtime before the baseline, the same in both modes: kernels, the autograd engine,
    # the optimizer, and checkpoint's import of torch._dynamo (which `import fedml` loads in every FedML
    # client process anyway)
    warm = PrincipalModel(create_model("resnet_tiny", width=0.125), PrismConfig()).sample_submodel(0, 0, record=False)
    local_train(warm.module, [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))], activation_memory="principal")
    del warm
    reset_peak_rss()
    base = proc_status_kb("VmRSS")
    module = SubModel.from_payload(torch.load(args.payload, weights_only=True), template_of(args.model)).module
    x, y = batch_for(args.model, args.batch_size)
    local_train(module, [(x, y)] * 2, lr=0.01, activation_memory=args.mode)
    print(json.dumps({"peak_rss_mb": (proc_status_kb("VmHWM") - base) / 1024}))


def peak_rss_mb(args: argparse.Namespace, model: str, payload: dict[str, torch.Tensor], batch: int,
                mode: str) -> dict[str, float]:
    """Peak RSS of a fresh client process, with glibc's defaults and with a fixed mmap threshold."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "payload.pt")
        torch.save(payload, path)
        cmd = [sys.executable, __file__, "--child", "--model", model, "--payload", path, "--batch-size", str(batch),
               "--mode", mode, "--threads", str(args.threads)]
        for key, extra in (("peak_rss_mb", {}), ("peak_rss_trim_mb", {"MALLOC_MMAP_THRESHOLD_": "131072"})):
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | extra
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
            if run.returncode:
                raise RuntimeError(f"peak memory child failed ({' '.join(cmd[2:])}):\n{run.stderr[-2000:]}")
            out[key] = json.loads(run.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return out


def measure(args: argparse.Namespace, name: str, batch: int, subs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row of one model at one batch size."""
    x, y = batch_for(name, batch)
    template = template_of(name)
    rows, runs = [], []
    for sub in subs:
        if "skipped" in sub:
            rows.append({k: v for k, v in sub.items() if k != "payload"} | {"model": name, "batch_size": batch})
            continue
        for mode in MODES:
            module = SubModel.from_payload(sub["payload"], template).module
            param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
            row = {"model": name, "batch_size": batch, "label": sub["label"], "strategy": sub["strategy"],
                   "keep_ratio": sub["keep_ratio"], "params": sub["params"], "activation_memory": mode,
                   "activation_mb": activation_bytes(copy.deepcopy(module), x, mode) / 2**20,
                   "state_mb": 3 * param_bytes / 2**20,
                   **peak_rss_mb(args, name, sub["payload"], batch, mode)}
            rows.append(row)
            runs.append((row, module, []))
            print(f"  {name} b{batch} {sub['label']:32} {mode:9} activations {row['activation_mb']:7.1f} MB "
                  f"peak {row['peak_rss_mb']:7.1f} MB, fixed threshold {row['peak_rss_trim_mb']:7.1f} MB", flush=True)
    for i in range(args.steps + 1):  # one warm-up step each, then interleaved measured steps
        for row, module, times in runs:
            t = time.perf_counter()
            local_train(module, [(x, y)], lr=0.01, activation_memory=row["activation_memory"])
            if i:
                times.append(time.perf_counter() - t)
    for row, _, times in runs:
        row["step_s"] = statistics.median(times)
    dense = next(r for r in rows if r.get("strategy") == "full" and r.get("activation_memory") == "full")
    for row in rows:
        if "skipped" not in row:
            for key in ("activation_mb", "peak_rss_mb", "peak_rss_trim_mb", "step_s", "params"):
                row[f"{key}_ratio"] = row[key] / dense[key]
    return rows


def markdown(results: list[dict[str, Any]]) -> str:
    lines = []
    for name in dict.fromkeys(r["model"] for r in results):
        for batch in dict.fromkeys(r["batch_size"] for r in results if r["model"] == name):
            lines += [f"\n### {name}, batch {batch}\n",
                      "| client model | activation_memory | params | activations held for backward (MB) | "
                      "params + grads + momentum (MB) | peak train RSS (MB) | peak RSS, fixed mmap threshold (MB) | "
                      "step time (s) |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in results:
                if r["model"] != name or r["batch_size"] != batch:
                    continue
                if "skipped" in r:
                    lines.append(f"| {r['label']} | – | not measured: {r['skipped']} | | | | | |")
                    continue
                lines.append(
                    f"| {r['label']} (keep {r['keep_ratio']:.3g}) | {r['activation_memory']} | {r['params_ratio']:.2f} | "
                    f"{r['activation_mb']:.1f} ({r['activation_mb_ratio']:.2f}) | {r['state_mb']:.1f} | "
                    f"{r['peak_rss_mb']:.0f} ({r['peak_rss_mb_ratio']:.2f}) | "
                    f"{r['peak_rss_trim_mb']:.0f} ({r['peak_rss_trim_mb_ratio']:.2f}) | "
                    f"{r['step_s']:.3f} ({r['step_s_ratio']:.2f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch-sizes", default="32,128")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/client_memory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--payload", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; allowed {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path))["rows"] if os.path.exists(path) else []
    config = {"models": {m: MODELS[m] for m in models}, "batch_sizes": args.batch_sizes, "steps": args.steps,
              "threads": args.threads, "torch": torch.__version__, "device": "cpu"}
    for name in models:
        subs = None
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            if any(r["model"] == name and r["batch_size"] == batch for r in results):
                continue
            subs = subs or sub_models(name)
            results += measure(args, name, batch, subs)
            with open(path + ".tmp", "w") as f:
                json.dump({"config": config, "rows": results}, f, indent=1)
            os.replace(path + ".tmp", path)
    table = markdown(results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("Ratios in parentheses: to the dense model with plain autograd at the same batch size.\n" + table)
    print(table)


if __name__ == "__main__":
    main()
