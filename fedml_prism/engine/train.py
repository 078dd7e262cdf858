"""Local training of a sub-model: σ frozen, Eq. 4 regularizer on the kept factors, weight decay only
on dense parameters, gradient clipping (reference code: norm 5). Plain PyTorch."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ACTIVATION_MEMORY
from .layers import PrincipalLayer
from .recompute import principal_width


def split_parameters(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(factor parameters u and v, every other trainable parameter)``."""
    factors: list[nn.Parameter] = []
    for m in module.modules():
        if isinstance(m, PrincipalLayer):
            factors += [m.u, m.v]
    seen = {id(p) for p in factors}
    dense = [p for p in module.parameters() if p.requires_grad and id(p) not in seen]
    return factors, dense


def principal_regularizer(module: nn.Module, reg_lambda: float) -> Tensor:
    """Eq. 4: ``λ/2 Σ_layers ‖U_I diag(σ_I) V_Iᵀ‖_F²`` over the kept factors."""
    terms = [m.gram_norm_sq() for m in module.modules() if isinstance(m, PrincipalLayer)]
    if not terms or reg_lambda == 0:
        return torch.zeros((), device=next(module.parameters()).device)
    return 0.5 * reg_lambda * torch.stack(terms).sum()


def make_optimizer(
    module: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4
) -> torch.optim.SGD:
    """SGD with weight decay on dense parameters only (Eq. 4 regularizes the factors instead)."""
    factors, dense = split_parameters(module)
    groups = [{"params": dense, "weight_decay": weight_decay}]
    if factors:
        groups.append({"params": factors, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


@dataclass
class TrainStats:
    loss: float
    samples: int
    steps: int
    #: final SGD momentum buffer of every trainable parameter (by ``named_parameters`` name)
    momentum: dict[str, Tensor] = field(default_factory=dict)


def load_momentum(opt: torch.optim.SGD, module: nn.Module, buffers: Mapping[str, Tensor]) -> None:
    """Start ``opt`` from the given momentum buffers (by parameter name); SGD then continues them
    (``buf ← μ·buf + grad``) instead of starting from the first gradient."""
    params = dict(module.named_parameters())
    unknown = sorted(set(buffers) - set(params))
    if unknown:
        raise ValueError(f"momentum buffers for unknown parameters {unknown[:5]}")
    for name, buf in buffers.items():
        p = params[name]
        if buf.shape != p.shape:
            raise ValueError(f"momentum buffer {name!r} has shape {tuple(buf.shape)}, parameter {tuple(p.shape)}")
        opt.state[p]["momentum_buffer"] = buf.detach().to(device=p.device, dtype=p.dtype).clone()


def read_momentum(opt: torch.optim.SGD, module: nn.Module) -> dict[str, Tensor]:
    """Every trainable parameter's momentum buffer (zeros where SGD made no step)."""
    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            out[name] = (buf if buf is not None else torch.zeros_like(p)).detach().cpu().clone()
    return out


def local_train(
    module: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    epochs: int = 1,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    reg_lambda: float = 5e-4,
    clip_norm: float | None = 5.0,
    device: torch.device | str = "cpu",
    momentum_buffers: Mapping[str, Tensor] | None = None,
    activation_memory: str = "full",
) -> TrainStats:
    """Train ``module`` in place for ``epochs`` passes over ``batches`` (cross-entropy).

    ``momentum_buffers`` (by parameter name) start SGD's momentum where an earlier round left it;
    the final buffers are returned in ``TrainStats.momentum`` when given. ``activation_memory``:
    ``principal`` trains with selective recomputation (:func:`fedml_prism.engine.recompute.principal_width`:
    same loss and gradients, less memory held for backward), ``full`` with plain autograd."""
    if activation_memory not in ACTIVATION_MEMORY:
        raise ValueError(f"activation_memory={activation_memory!r} is invalid: allowed {', '.join(ACTIVATION_MEMORY)}")
    module.to(device).train()
    opt = make_optimizer(module, lr, momentum, weight_decay)
    if momentum_buffers is not None:
        load_momentum(opt, module, momentum_buffers)
    total, samples, elements, steps = 0.0, 0, 0, 0
    with principal_width(module, activation_memory == "principal"):
        for _ in range(epochs):
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(module(x), y)
                (loss + principal_regularizer(module, reg_lambda)).backward()
                if clip_norm:
                    nn.utils.clip_grad_norm_(module.parameters(), clip_norm)
                opt.step()
                total += loss.item() * y.numel()
                elements += y.numel()
                samples += len(y)
                steps += 1
    buffers = read_momentum(opt, module) if momentum_buffers is not None else {}
    return TrainStats(total / elements if elements else math.nan, samples, steps, buffers)


@torch.no_grad()
def evaluate(
    module: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device | str = "cpu"
) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)``. Static BN normalizes with batch statistics, so evaluate
    with reasonably large batches."""
    module.to(device).eval()
    correct, total, loss = 0, 0, 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        out = module(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        total += y.numel()  # sequence models predict one class per position
    return (correct / total, loss / total) if total else (math.nan, math.nan)
