"""``fedml-prism`` console script.

Subcommands:
  costs   parameters, MACs and bytes of a sub-model next to the dense model
  run     run a fedml_config.yaml on a FedML runtime (see docs/runtimes.md)
  keys    message authentication keys for a cross-silo job (docs/security.md)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from ..engine.config import ACTIVATION_MEMORY, STRATEGIES


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape {text!r}: expected integers like 3,32,32") from None
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"--input-shape {text!r}: every dimension must be > 0")
    return shape


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep-ratio {text!r}: expected a number in (0, 1]") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"--keep-ratio {value}: allowed range is (0, 1]")
    return value


def _model_kwargs(items: Sequence[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--model-arg {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_costs(args: argparse.Namespace) -> int:
    from ..engine.config import PrismConfig
    from ..engine.costs import INPUT_DTYPES, format_costs, probe_input, submodel_costs
    from ..engine.decompose import little_saving_warning
    from ..engine.principal import PrincipalModel
    from ..workloads.models import create_model

    if args.input_dtype != "auto" and args.input_dtype not in INPUT_DTYPES:
        raise ValueError(f"--input-dtype {args.input_dtype!r} is invalid: allowed auto, {', '.join(INPUT_DTYPES)}")
    model = create_model(args.model, **_model_kwargs(args.model_arg))
    # auto: token ids for a model that starts with an embedding, else the model's float dtype
    example = probe_input(model, args.input_shape, INPUT_DTYPES.get(args.input_dtype))
    config = PrismConfig(strategy=args.strategy, keep_ratio=args.keep_ratio, seed=args.seed,
                         activation_memory=args.activation_memory)
    pm = PrincipalModel(model, config)
    if warning := little_saving_warning(pm.skeleton, pm.config):
        print(f"warning: {warning}", file=sys.stderr)
    report = submodel_costs(pm, pm.sample_submodel(client_id=0, round_idx=0), example, args.batch_size)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_costs(report))
        if args.layers:
            print(f"\n{'layer':32}{'kind':>18}{'params':>12}{'dense':>12}{'MACs':>14}{'dense MACs':>14}")
            for lc in report.layers:
                print(f"{lc.name:32}{lc.kind:>18}{lc.params:>12,}{lc.dense_params:>12,}{lc.macs:>14,}{lc.dense_macs:>14,}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import aggregate_rows, markdown_table, parse_partition, resolve_profile, run_bench
    from .run import _setup_logging

    _setup_logging()
    label, _ = resolve_profile(args.profile)  # a bad name or profile file: exit 2 before any work
    overrides = {
        "strategies": args.strategies.split(",") if args.strategies else None,
        "keep_ratios": [_ratio(k) for k in args.keep_ratios.split(",")] if args.keep_ratios else None,
        "partitions": [parse_partition(p) for p in args.partitions.split(",")] if args.partitions else None,
        "seeds": [int(s) for s in args.seeds.split(",")] if args.seeds else None,
        "rounds": args.rounds,
        "data_path": args.data_path,
    }
    rows = run_bench(args.profile, args.out or f"outputs/bench_{label}", overrides, match=args.match)
    print(markdown_table(aggregate_rows(rows)))
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    import torch

    from ..engine.rank import plot_rank, rank_report

    if not os.path.isfile(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint!r} does not exist")
    report = rank_report(torch.load(args.checkpoint, weights_only=True), args.kappa)
    if not report:
        raise ValueError(f"{args.checkpoint!r} holds no conv/linear weights to analyse")
    if args.plot:
        plot_rank(report, args.plot, title=os.path.basename(args.checkpoint))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{'layer':32}{'rank':>6}{'needed':>9}{'fraction':>10}")
        for r in report:
            print(f"{r['layer']:32}{r['rank']:>6}{r['effective_kernels']:>9.1f}{r['fraction']:>10.2f}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from ..job import build_job, load_data

    job = build_job(args.cf)
    data = load_data(job)
    summary = data.summary()
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        counts = np.zeros((len(summary), data.num_classes))
        for c, idx in enumerate(data.client_indices):
            counts[c] = np.bincount(data.y_train[idx].numpy().reshape(len(idx), -1)[:, 0], minlength=data.num_classes)
        fig, ax = plt.subplots(figsize=(8, 4))
        bottom = np.zeros(len(summary))
        for k in range(data.num_classes):
            ax.bar(range(len(summary)), counts[:, k], bottom=bottom, width=1.0)
            bottom += counts[:, k]
        ax.set(xlabel="client", ylabel="samples (stacked by class)",
               title=f"{job.dataset}, {job.partition_method} partition, {len(summary)} clients")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        plt.close(fig)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{'client':>7}{'samples':>9}{'classes':>9}")
        for row in summary:
            print(f"{row['client']:>7}{row['samples']:>9}{row['classes']:>9}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run import main as run_main

    return run_main(args)


def cmd_keys(args: argparse.Namespace) -> int:
    from ..runtimes.security import ensure_keys, write_keys

    if (args.out is None) == (args.cf is None):
        raise ValueError("give --out DIR (a fresh set of keys) or --cf CONFIG (the keys its auth_key_file names)")
    if args.out is not None:
        if args.workers is None:
            raise ValueError("--out needs --workers K (ranks 1..K get keys)")
        for path in write_keys(args.out, args.workers):
            print(path)
        return 0
    from ..job import key_files_of

    template, workers = key_files_of(args.cf)
    workers = workers if args.workers is None else args.workers
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise ValueError(f"worker_num={workers!r} is invalid: allowed an integer >= 1")
    if not template:
        print(f"{args.cf}: no security_args.auth_key_file, no keys to make")
        return 0
    if not isinstance(template, str):
        raise ValueError(f"auth_key_file={template!r} is invalid: allowed a file path with {{rank}}")
    created, kept = ensure_keys(template, os.path.dirname(os.path.abspath(args.cf)), workers)
    for path in created:
        print(f"created {path}")
    for path in kept:
        print(f"kept {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedml-prism", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    costs = sub.add_parser("costs", help="sub-model parameters, MACs and bytes next to the dense model")
    costs.add_argument("--model", required=True, help="built-in name (resnet18_cifar, cnn, …) or package.module:callable")
    costs.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="keyword for the model factory (JSON value)")
    costs.add_argument("--input-shape", required=True, type=_shape,
                       help="shape of one input: C,H,W for images, the sequence length for token models (e.g. 80)")
    costs.add_argument("--input-dtype", default="auto",
                       help="auto (int64 token ids when the model starts with an embedding, else the model's "
                            "float dtype), float32, float64, float16, bfloat16, int64 or int32")
    costs.add_argument("--keep-ratio", type=_ratio, default=0.2)
    costs.add_argument("--strategy", choices=STRATEGIES, default="prism")
    costs.add_argument("--seed", type=int, default=0)
    costs.add_argument("--batch-size", type=int, default=32,
                       help="batch of the training-memory line (activation bytes held for backward)")
    costs.add_argument("--activation-memory", choices=ACTIVATION_MEMORY, default="principal",
                       help="how the sub-model trains: principal (recompute the full-width part) or full (plain autograd)")
    costs.add_argument("--json", action="store_true", help="print JSON (with per-layer costs)")
    costs.add_argument("--layers", action="store_true", help="also print the per-layer table")
    costs.set_defaults(func=cmd_costs)

    bench = sub.add_parser("bench", help="strategies side by side: results.json, results.md, plots")
    bench.add_argument("--profile", default="smoke",
                       help="a shipped profile (config/bench/NAME.yaml: smoke, cpu, fidelity, fidelity_long, "
                            "fidelity_methods, fidelity_methods_cnn, paper) or the path of a profile .yaml file, e.g. an edited "
                            "copy of one")
    bench.add_argument("--out", default=None,
                       help="output folder (default outputs/bench_NAME: the profile's name, or its file's without .yaml)")
    bench.add_argument("--strategies", default=None, help="comma list, e.g. full,prism,orthdrop")
    bench.add_argument("--keep-ratios", default=None, help="comma list, e.g. 0.2,0.4")
    bench.add_argument("--partitions", default=None, help="comma list of iid, dirichletALPHA")
    bench.add_argument("--seeds", default=None, help="comma list of seeds")
    bench.add_argument("--rounds", type=int, default=None, help="override comm_round")
    bench.add_argument("--data-path", default=None, help="dataset folder or archive (overrides the profile's)")
    bench.add_argument("--match", choices=("params", "none"), default=None,
                       help="params: run every non-full strategy at the keep ratio whose client sub-model has as "
                            "many parameters as prism's at each keep ratio (equal budgets); none: nominal keep "
                            "ratios (default: the profile's setting)")
    bench.set_defaults(func=cmd_bench)

    rank = sub.add_parser("rank", help="principal kernels needed per layer of a checkpoint (paper appendix B)")
    rank.add_argument("--checkpoint", required=True, help="checkpoint.pt of a run, or a state_dict file")
    rank.add_argument("--kappa", type=float, default=2.0)
    rank.add_argument("--plot", default=None, help="write a PNG bar chart here")
    rank.add_argument("--json", action="store_true")
    rank.set_defaults(func=cmd_rank)

    part = sub.add_parser("partition", help="samples and classes per client of a config's partition")
    part.add_argument("--cf", required=True, help="fedml_config.yaml")
    part.add_argument("--plot", default=None, help="write a stacked class-count bar chart (PNG) here")
    part.add_argument("--json", action="store_true")
    part.set_defaults(func=cmd_partition)

    run = sub.add_parser("run", help="run a fedml_config.yaml (sp simulation, MPI, gRPC, MQTT_S3, MQTT_S3_MNN)")
    run.add_argument("--cf", required=True, help="fedml_config.yaml")
    run.add_argument("--rank", type=int, default=0)
    run.add_argument("--role", choices=("server", "client", "device"), default="server",
                     help="device: a reference cross-device (Beehive) device, with --edge-id")
    run.add_argument("--edge-id", type=int, default=None, help="the device's edge id (cross_device, --role device)")
    run.add_argument("--run_id", default="0")
    run.add_argument("--output-dir", default=None, help="where metrics and checkpoints go")
    run.add_argument("--resume", action="store_true",
                     help="continue from the last checkpoint in the output dir (sp; cross-silo: the server, rank 0, "
                          "resumes and fresh workers join it; an MPI job restarts whole)")
    run.add_argument("--check", action="store_true", help="validate the config, print the job, and exit")
    run.set_defaults(func=cmd_run)
    keys = sub.add_parser("keys", help="message authentication keys: party0.key (server, master) and one per worker")
    keys.add_argument("--out", help="a fresh set of keys: folder for party<rank>.key (mode 600)")
    keys.add_argument("--cf", help="the key files a fedml_config.yaml's auth_key_file names, created when missing "
                                   "(a worker's from an existing master key); existing ones are kept")
    keys.add_argument("--workers", type=int, help="number of worker processes (ranks 1..K; --cf: default worker_num)")
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"fedml-prism {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
