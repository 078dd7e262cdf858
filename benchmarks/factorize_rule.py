"""How much of each architecture a keep-ρ sub-model keeps, under each factorization rule.

For every model: parameters and MACs (one input, forward hooks of :func:`fedml_prism.engine.costs.layer_costs`)
of the keep-ρ sub-model over the dense model's, under

- ``before``: the paper's rule on the model as given (``nn.MultiheadAttention`` left to PyTorch, so its
  projections stay dense: what the engine did before ``rule`` existed);
- ``paper``: the paper's rule after :func:`~fedml_prism.engine.attention.convert_attention` (``rule: paper``);
- ``default``: the default rule (``rule: default``).

The sub-model is built with the modules ``PrincipalModel`` builds (principal layers of rank
``ceil(ρ·min(N, M·k·k))``) but without decomposing the weights, whose values change neither count;
``--verify-max-params`` checks that claim against a real ``PrincipalModel`` sub-model and
``submodel_costs`` for the smaller models. Prints JSON (``--out`` writes it) and a markdown table.

    python benchmarks/factorize_rule.py --keep-ratio 0.2 --out benchmarks/results/factorize_rule.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable

import torch
import torchvision.models as tvm
from torch import nn

from fedml_prism import PrincipalModel, PrismConfig, convert_static_bn
from fedml_prism.engine.attention import convert_attention
from fedml_prism.engine.costs import layer_costs, submodel_costs
from fedml_prism.engine.decompose import factorizable_layers, matrix_shape
from fedml_prism.engine.layers import principal_like, set_submodule
from fedml_prism.engine.sampling import keep_count
from fedml_prism.workloads.models import cnn, resnet18_cifar, vit_small

# name -> (factory, input shape of one sample). torchvision models with a 10-class head (CIFAR-10, the
# paper's setting) at their ImageNet input size, two with their 1000-class head (which then holds a
# large share of a small net and stays dense), the built-in models, and the architectures of
# tests/engine/test_factorize_rule.py as the tests build them.
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "cnn (default job)": (lambda: cnn(in_channels=1, image_size=8, width=0.5, hidden=64), (1, 8, 8)),
    "resnet18_cifar": (resnet18_cifar, (3, 32, 32)),
    "vit_small": (vit_small, (3, 32, 32)),
    **{
        name: (lambda f=f: f(num_classes=10), (3, 224, 224))
        for name, f in {
            "resnet18": tvm.resnet18, "resnet50": tvm.resnet50, "vgg11": tvm.vgg11, "mobilenet_v2": tvm.mobilenet_v2,
            "mobilenet_v3_large": tvm.mobilenet_v3_large, "shufflenet_v2_x1_0": tvm.shufflenet_v2_x1_0,
            "efficientnet_b0": tvm.efficientnet_b0, "regnet_y_400mf": tvm.regnet_y_400mf,
            "convnext_tiny": tvm.convnext_tiny, "vit_b_16": tvm.vit_b_16,
        }.items()
    },
    "mobilenet_v2 (1000 classes)": (tvm.mobilenet_v2, (3, 224, 224)),
    "shufflenet_v2_x1_0 (1000 classes)": (tvm.shufflenet_v2_x1_0, (3, 224, 224)),
    "test: resnet10": (lambda: tvm.resnet.ResNet(tvm.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10), (3, 48, 48)),
    "test: mobilenet_v2 x0.25": (lambda: tvm.mobilenet_v2(num_classes=10, width_mult=0.25), (3, 48, 48)),
    "test: shufflenet_v2_x0_5": (lambda: tvm.shufflenet_v2_x0_5(num_classes=10), (3, 48, 48)),
    "test: vit tiny (torchvision class)": (
        lambda: tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                      mlp_dim=64, num_classes=10),
        (3, 32, 32),
    ),
}
RULES = {"before": ("paper", False), "paper": ("paper", True), "default": ("default", True)}


def _structural_submodel(model: nn.Module, layers: list[str], keep: float) -> nn.Module:
    """``model`` with ``layers`` replaced by principal layers of the keep-``keep`` rank (zero weights)."""
    sub = copy.deepcopy(model)
    for name in layers:
        module = sub.get_submodule(name)
        set_submodule(sub, name, principal_like(module, keep_count(keep, min(matrix_shape(module))), "cpu"))
    with torch.no_grad():
        for p in sub.parameters():
            p.zero_()
    return sub


def _sums(costs: dict[str, tuple[str, int, int]]) -> tuple[int, int]:
    return sum(c[1] for c in costs.values()), sum(c[2] for c in costs.values())


def measure(name: str, keep: float, verify_max_params: float) -> dict:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    example = torch.randn(1, *shape)
    row: dict = {"model": name, "input": list(shape)}
    for label, (rule, convert) in RULES.items():
        prepared = convert_static_bn(copy.deepcopy(model))
        if convert:
            prepared = convert_attention(prepared)
        config = PrismConfig(keep_ratio=keep, rule=rule)
        layers = factorizable_layers(prepared, config)
        dense_params, dense_macs = _sums(layer_costs(prepared, example))
        params, macs = _sums(layer_costs(_structural_submodel(prepared, layers, keep), example))
        row["dense_params"], row["dense_macs"] = dense_params, dense_macs
        row[label] = {"layers": len(layers), "params": params, "macs": macs,
                      "params_ratio": params / dense_params, "macs_ratio": macs / dense_macs}
    if row["dense_params"] <= verify_max_params:
        t = time.perf_counter()
        pm = PrincipalModel(model, PrismConfig(keep_ratio=keep))
        report = submodel_costs(pm, pm.sample_submodel(0, 0, record=False), example)
        if (report.params, report.macs) != (row["default"]["params"], row["default"]["macs"]):
            raise AssertionError(f"{name}: PrincipalModel sub-model {report.params, report.macs} != "
                                 f"structural {row['default']['params'], row['default']['macs']}")
        row["verified_s"] = round(time.perf_counter() - t, 1)
    return row


def table(rows: list[dict], keep: float) -> str:
    head = (f"| model | dense params | params at keep {keep:g}: before | paper | default | MACs: before | paper "
            "| default |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = " | ".join(f"{r[k]['params_ratio']:.1%}" for k in RULES)
        m = " | ".join(f"{r[k]['macs_ratio']:.1%}" for k in RULES)
        lines.append(f"| {r['model']} | {r['dense_params']:,} | {p} | {m} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep-ratio", type=float, default=0.2)
    parser.add_argument("--models", default=None, help="comma-separated subset of: " + ", ".join(MODELS))
    parser.add_argument("--verify-max-params", type=float, default=12e6,
                        help="check against a real PrincipalModel for models up to this many parameters")
    parser.add_argument("--out", default=None, help="write the JSON here")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"--models {unknown} is invalid: allowed {', '.join(MODELS)}")
    rows = [measure(n, args.keep_ratio, args.verify_max_params) for n in names]
    result = {"keep_ratio": args.keep_ratio, "torch": torch.__version__, "rows": rows}
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    print(table(rows, args.keep_ratio))


if __name__ == "__main__":
    main()
