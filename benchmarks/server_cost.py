"""Server cost of a PriSM round against model size, next to the clients' round it serves (CPU).

For each model at the input size it is built for (the paper's CIFAR ResNet-18 on 32×32, torchvision's
VGG-11 on 224×224, a ViT-B-sized transformer on 4×4 patches of 32×32; and VGG-11 on 32×32 as the
hardest case for the server), in a fresh child process per model:

- ``init_s``: building the ``PrincipalModel`` (the first decomposition of every factorized layer);
- ``sample_s``: handing out the round's 20 sub-models (keep 0.2);
- ``aggregate_s``: ``PrincipalModel.aggregate`` of 20 updates: Eq. 3, the momentum aggregation, the
  orthogonal refresh and the per-layer diagnostics (the updates are the sent sub-models with seeded
  noise on every trained tensor: the same shapes and selections as trained ones, without paying for
  20 trainings here);
- ``client_step_s``: the median time of one SGD step of a keep-0.2 sub-model (batch 32, CIFAR-shaped
  random data, Eq. 4 regularizer), measured after a warm-up step;
- ``round_s``: the clients' share of a sequential 20-client round (one process trains every client,
  as ``fedml-prism run`` does with ``backend: sp``): ``20 × steps_per_client × client_step_s``, with
  ``steps_per_client`` = one local epoch of ``--samples`` samples at batch 32 (16 steps for 500);
- ``server_share``: ``(sample_s + aggregate_s) / round_s``; the target is ≤ 10 %. ``one_client_share``
  is the same server time against one client's epoch (the round's critical path when the 20 clients
  train in parallel on their own machines).
- ``peak_rss_mb``: the child's peak resident memory.

    python benchmarks/server_cost.py --out benchmarks/results/server_cost.json [--models vgg11 ...]

Run it with ``PYTHONPATH=<another checkout>`` to measure another version of the engine side by side
(the before/after figures in the README were taken that way, against commit 52d7672).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

#: each model at the input size it is built for; ``vgg11_32`` is torchvision's VGG-11 fed CIFAR-size
#: images (its 25088 × 4096 layer then sees a 1×1 map copied 49 times): the hardest case for the server
MODELS = {"resnet18": 32, "vgg11": 224, "vit_base": 32, "vgg11_32": 32}


def _build(name: str):
    import torchvision

    from fedml_prism.workloads.models import resnet18_cifar, vit_small

    if name == "resnet18":  # the paper's CIFAR ResNet-18
        return resnet18_cifar(num_classes=10)
    if name in ("vgg11", "vgg11_32"):  # torchvision's, with its 25088 × 4096 and 4096 × 4096 Linear layers
        return torchvision.models.vgg11(num_classes=10)
    if name == "vit_base":  # ViT-B sizes (dim 768, depth 12, 12 heads, MLP 3072) on 4×4 patches of 32×32
        return vit_small(image_size=32, patch=4, dim=768, depth=12, heads=12)
    raise ValueError(f"model={name!r} is invalid: allowed {', '.join(MODELS)}")


def _child(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from fedml_prism import ClientUpdate, PrincipalModel, PrismConfig
    from fedml_prism.engine.train import make_optimizer, principal_regularizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = _build(args.model)
    cfg = PrismConfig(strategy="prism", keep_ratio=args.keep_ratio, seed=0)
    t = time.perf_counter()
    pm = PrincipalModel(model, cfg)
    init_s = time.perf_counter() - t

    # the clients' side: step time of one keep-ρ sub-model
    sub = pm.sample_submodel(0, 0, record=False)
    module = sub.module.train()
    opt = make_optimizer(module, lr=0.01)
    size = MODELS[args.model]
    x, y = torch.randn(32, 3, size, size), torch.randint(0, 10, (32,))
    steps = []
    for i in range(args.steps + 1):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module(x), y) + principal_regularizer(module, 5e-4)
        loss.backward()
        opt.step()
        if i:  # the first step warms up allocators and kernels
            steps.append(time.perf_counter() - t)
    del module, opt, sub
    step_s = statistics.median(steps)
    steps_per_client = math.ceil(args.samples / 32)
    round_s = args.clients * steps_per_client * step_s

    # the server's side: one round of 20 clients, twice (the first one from the initial SVD)
    rounds = []
    for r in range(args.rounds):
        t = time.perf_counter()
        subs = [pm.sample_submodel(c, r) for c in range(args.clients)]
        sample_s = time.perf_counter() - t
        g = torch.Generator().manual_seed(r)
        updates = []
        for s in subs:
            up = s.to_payload("up")
            noisy = {k: v + 1e-2 * torch.randn(v.shape, generator=g) if v.is_floating_point() and not k.startswith("prism::meta")
                     and not k.startswith("prism::index") else v for k, v in up.items()}
            updates.append(ClientUpdate(s.client_id, noisy, 500))
        del subs
        t = time.perf_counter()
        report = pm.aggregate(updates)
        aggregate_s = time.perf_counter() - t
        assert len(report.accepted) == args.clients, report.rejected
        rounds.append({"sample_s": sample_s, "aggregate_s": aggregate_s, "coverage": report.coverage})
        del updates
    last = rounds[-1]
    server_s = last["sample_s"] + last["aggregate_s"]
    params = sum(p.numel() for p in model.parameters())
    biggest = max((f.u.shape[0], f.v[0].numel()) for f in pm.factors.values()) if pm.factors else (0, 0)
    return {
        "model": args.model, "input_size": size, "params": params, "factorized_layers": len(pm.layers),
        "largest_layer": list(biggest),
        "keep_ratio": args.keep_ratio, "clients": args.clients, "threads": args.threads,
        "init_s": init_s, "rounds": rounds, "sample_s": last["sample_s"], "aggregate_s": last["aggregate_s"],
        "server_s": server_s, "client_step_s": step_s, "steps_per_client": steps_per_client, "round_s": round_s,
        "server_share": server_s / round_s, "one_client_share": server_s / (steps_per_client * step_s),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def compare(before: list[dict], after: list[dict]) -> str:
    """Markdown table of two runs side by side (same models); the server's share is taken against the
    mean of the two runs' measured client rounds, so both versions face the same round."""
    old = {r["model"]: r for r in before}
    lines = [
        "| model | input | params | largest layer | init s (before → after) | server s per round (before → after) "
        "| 20-client round s | server share (before → after) | peak MB (after) |",
        "|---|---|---:|---|---|---|---:|---|---:|",
    ]
    for a in after:
        b = old.get(a["model"])
        if b is None:
            continue
        round_s = (a["round_s"] + b["round_s"]) / 2
        n, m = a["largest_layer"]
        lines.append(
            f"| {a['model']} | {a['input_size']}² | {a['params'] / 1e6:.1f} M | {n} × {m} "
            f"| {b['init_s']:.1f} → {a['init_s']:.1f} | {b['server_s']:.1f} → {a['server_s']:.1f} | {round_s:.0f} "
            f"| {b['server_s'] / round_s:.1%} → {a['server_s'] / round_s:.1%} | {a['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--keep-ratio", type=float, default=0.2)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--samples", type=int, default=500, help="local samples per client (one epoch, batch 32)")
    p.add_argument("--steps", type=int, default=5, help="timed client steps (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=2, help="server rounds; the last one is reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--label", default="", help="a name for this engine version in the JSON")
    p.add_argument("--out", default="")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE_JSON", "AFTER_JSON"),
                   help="print the side-by-side table of two result files and exit")
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.compare:
        with open(args.compare[0]) as f, open(args.compare[1]) as g:
            print(compare(json.load(f), json.load(g)))
        return 0
    if args.model:  # child
        print(json.dumps(_child(args)))
        return 0
    rows = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--model", name] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}"
            for k in ("keep_ratio", "clients", "samples", "steps", "rounds", "threads")
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["label"] = args.label
        rows.append(row)
        print(f"{row['model']:9} {row['input_size']:>3}px params {row['params'] / 1e6:6.1f}M  init {row['init_s']:7.1f}s"
              f"  sample {row['sample_s']:6.2f}s"
              f"  aggregate {row['aggregate_s']:7.2f}s  20-client round {row['round_s']:7.1f}s  server share "
              f"{row['server_share']:6.1%}  peak {row['peak_rss_mb']:6.0f} MB", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
