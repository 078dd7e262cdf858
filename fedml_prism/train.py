"""Local training of a sub-model: σ frozen, Eq. 4 regularizer on the kept factors, weight decay only
on dense parameters, gradient clipping (reference code: norm 5). Plain PyTorch."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import PrincipalLayer


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
) -> TrainStats:
    """Train ``module`` in place for ``epochs`` passes over ``batches`` (cross-entropy)."""
    module.to(device).train()
    opt = make_optimizer(module, lr, momentum, weight_decay)
    total, samples, elements, steps = 0.0, 0, 0, 0
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
    return TrainStats(total / elements if elements else math.nan, samples, steps)


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
