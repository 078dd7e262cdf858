"""What a sub-model costs a client, measured on the real modules and payloads.

Parameters are counted from each module's tensors, multiply-accumulates (MACs) from a forward pass
with hooks on every Conv2d / Linear / principal layer (the output shapes the pass really produced),
and bytes from the wire payloads (``down`` = server → client, ``up`` = client → server).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .layers import PrincipalConv2d, PrincipalLinear
from .principal import PrincipalModel
from .submodel import SubModel


@dataclass
class LayerCost:
    name: str
    kind: str
    params: int
    macs: int
    dense_params: int
    dense_macs: int


@dataclass
class CostReport:
    strategy: str
    keep_ratio: float
    input_shape: tuple[int, ...]
    params: int
    macs: int
    bytes_down: int
    bytes_up: int
    dense_params: int
    dense_macs: int
    dense_bytes: int
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def ratios(self) -> dict[str, float]:
        return {
            "params": self.params / self.dense_params,
            "macs": self.macs / self.dense_macs if self.dense_macs else math.nan,
            "bytes_down": self.bytes_down / self.dense_bytes,
            "bytes_up": self.bytes_up / self.dense_bytes,
        }

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ratios"] = self.ratios
        return out


def _module_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, PrincipalConv2d):
        m_kk = math.prod(module.v.shape[1:])
        return out.shape[2] * out.shape[3] * module.rank * (m_kk + module.out_channels)
    if isinstance(module, PrincipalLinear):
        rows = out.numel() // module.out_features
        return rows * module.rank * (module.in_features + module.out_features)
    if isinstance(module, nn.Conv2d):
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        return out[0].numel() * per_output
    if isinstance(module, nn.Linear):
        return out[0].numel() * module.in_features
    return 0


def layer_costs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[str, int, int]]:
    """``{module name: (type, params, MACs per sample)}`` for every module that owns parameters or
    computes a Conv2d / Linear / principal product."""
    found: dict[str, tuple[str, int, int]] = {}
    hooks = []
    param = next(model.parameters())
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own == 0 and not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        found[name] = (type(module).__name__, own, 0)

        def hook(mod: nn.Module, _inp: object, out: torch.Tensor, name: str = name) -> None:
            kind, own, macs = found[name]
            found[name] = (kind, own, macs + _module_macs(mod, out))

        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found


def _payload_bytes(payload: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in payload.values())


def submodel_costs(pm: PrincipalModel, sub: SubModel, input_shape: tuple[int, ...]) -> CostReport:
    """Costs of ``sub`` next to the dense model of ``pm`` for one input of ``input_shape``."""
    dense_model = pm.dense_model()
    dense = layer_costs(dense_model, input_shape)
    small = layer_costs(sub.module, input_shape)
    layers = []
    for name, (kind, params, macs) in dense.items():
        sub_kind, sub_params, sub_macs = small.get(name, (kind, 0, 0))
        layers.append(LayerCost(name, sub_kind, sub_params, sub_macs, params, macs))
    dense_bytes = sum(t.numel() * t.element_size() for t in dense_model.state_dict().values())
    if pm.momentum:  # optimizer_state: aggregate — full FedAvg would send its momentum buffers too
        dense_bytes += sum(p.numel() * p.element_size() for p in dense_model.parameters())
    return CostReport(
        strategy=sub.strategy,
        keep_ratio=sub.keep_ratio,
        input_shape=tuple(input_shape),
        params=sum(p.numel() for p in sub.module.parameters()),
        macs=sum(c[2] for c in small.values()),
        bytes_down=_payload_bytes(sub.to_payload("down")),
        bytes_up=_payload_bytes(sub.to_payload("up")),
        dense_params=sum(p.numel() for p in dense_model.parameters()),
        dense_macs=sum(c[2] for c in dense.values()),
        dense_bytes=dense_bytes,
        layers=layers,
    )


def format_costs(report: CostReport) -> str:
    """A short human-readable table."""
    r = report.ratios
    lines = [
        f"strategy={report.strategy} keep_ratio={report.keep_ratio} input={report.input_shape}",
        f"{'':12}{'sub-model':>14}{'dense':>14}{'ratio':>8}",
        f"{'params':12}{report.params:>14,}{report.dense_params:>14,}{r['params']:>8.1%}",
        f"{'MACs':12}{report.macs:>14,}{report.dense_macs:>14,}{r['macs']:>8.1%}",
        f"{'bytes down':12}{report.bytes_down:>14,}{report.dense_bytes:>14,}{r['bytes_down']:>8.1%}",
        f"{'bytes up':12}{report.bytes_up:>14,}{report.dense_bytes:>14,}{r['bytes_up']:>8.1%}",
    ]
    return "\n".join(lines)
