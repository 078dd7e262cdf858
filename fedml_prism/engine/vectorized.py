"""Several clients' sub-models trained as one batched computation (``parallel_clients: vectorized``).

At one keep ratio every client's sub-model has the same shapes; only the sampled components (and so the
values) differ. The clients' parameters are stacked along a leading client dimension and one step of
every client is ``vmap(grad(loss))`` over that dimension (``torch.func``): the forward, the backward, the
Eq. 4 regularizer, the gradient-norm clipping and SGD with momentum and weight decay are batched tensor
operations. Each client sees the batches of the sequential path (:func:`~fedml_prism.engine.rounds.client_batches`,
same seed, same order, same augmentation) and follows :func:`~fedml_prism.engine.train.local_train`'s
arithmetic step for step: the results equal the sequential ones up to float rounding.

What cannot be batched is said by :func:`problem` and trains sequentially: BatchNorm with running
statistics (state outside the parameters), dropout (random draws differ from the sequential path),
recurrent layers, data that is not a ``TensorDataset``. ``activation_memory: principal`` (selective
recomputation, a custom autograd function) changes what a client holds for backward, not its loss or
gradients: a batched group trains with plain autograd and holds the whole group's activations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .layers import PrincipalLayer
from .train import TrainStats, principal_regularizer


def problem(module: nn.Module) -> str | None:
    """Why ``module`` cannot be trained vectorized (None: it can)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            return f"{name} is a BatchNorm with running statistics (static_bn: false)"
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"{name} is a dropout layer (its random draws would differ from the sequential path)"
        if isinstance(m, nn.RNNBase):
            return f"{name} is a recurrent layer ({type(m).__name__})"
    return None


def shape_key(module: nn.Module) -> tuple[Any, ...]:
    """Sub-models with equal keys train together: the same layer types and tensor shapes."""
    layers = tuple(type(m).__name__ for m in module.modules())
    tensors = tuple((n, tuple(t.shape), t.dtype) for n, t in module.state_dict().items())
    return layers, tensors


class _Objective(nn.Module):
    """``(cross-entropy + Eq. 4 regularizer, cross-entropy)`` of a module on one batch, as local_train computes them."""

    def __init__(self, module: nn.Module, reg_lambda: float) -> None:
        super().__init__()
        self.module, self.reg_lambda = module, reg_lambda

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        ce = F.cross_entropy(self.module(x), y)
        return ce + principal_regularizer(self.module, self.reg_lambda), ce


def _expand(coef: Tensor, like: Tensor) -> Tensor:
    return coef.view(-1, *([1] * (like.dim() - 1)))


def train_together(
    modules: Sequence[nn.Module],
    batches: Sequence[Iterable[tuple[Tensor, Tensor]]],
    *,
    epochs: int = 1,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    reg_lambda: float = 5e-4,
    clip_norm: float | None = 5.0,
    device: torch.device | str = "cpu",
    momentum_buffers: Sequence[Mapping[str, Tensor]] | None = None,
) -> list[TrainStats]:
    """Train ``modules`` (equal :func:`shape_key`) in place, module ``i`` on ``batches[i]``, as
    :func:`~fedml_prism.engine.train.local_train` would one after the other. Every client's ``j``-th
    batch must have the same size (clients with equal sample counts); ``ValueError`` otherwise."""
    if len(modules) != len(batches) or not modules:
        raise ValueError(f"{len(modules)} modules and {len(batches)} batch streams: allowed equal, non-zero counts")
    keys = {shape_key(m) for m in modules}
    if len(keys) != 1:
        raise ValueError("the modules differ in layers or tensor shapes: train them in separate groups")
    for m in modules:
        if reason := problem(m):
            raise ValueError(f"cannot train vectorized: {reason}")
        m.to(device).train()
    template = modules[0]
    objective = _Objective(template, reg_lambda)
    names = [n for n, p in template.named_parameters() if p.requires_grad]
    factors = {f"{n}.{w}" for n, m in template.named_modules() if isinstance(m, PrincipalLayer) for w in ("u", "v")}
    decay = {n: (0.0 if n in factors else weight_decay) for n in names}
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in modules]).to(device) for n in names}
    frozen = [n for n, _ in template.named_parameters() if n not in params] + [n for n, _ in template.named_buffers()]
    rest = {n: torch.stack([_tensor_of(m, n).detach() for m in modules]).to(device) for n in frozen}
    bufs = {n: torch.zeros_like(p) for n, p in params.items()}
    if momentum_buffers is not None:
        for n in names:
            bufs[n] = torch.stack([b[n].detach().to(device=device, dtype=params[n].dtype) for b in momentum_buffers])

    def loss(p: dict[str, Tensor], r: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return functional_call(objective, {**{f"module.{k}": v for k, v in p.items()},
                                           **{f"module.{k}": v for k, v in r.items()}}, (x, y))

    step = vmap(grad(loss, has_aux=True))
    count = len(modules)
    totals = torch.zeros(count, dtype=torch.float64)
    elements, steps = 0, 0
    for _ in range(epochs):
        for per_client in zip(*batches, strict=True):
            sizes = {len(y) for _, y in per_client}
            if len(sizes) != 1:
                raise ValueError(f"the clients' batches differ in size ({sorted(sizes)}): clients with equal sample "
                                 "counts train together")
            x = torch.stack([b[0] for b in per_client]).to(device)
            y = torch.stack([b[1] for b in per_client]).to(device)
            grads, ce = step(params, rest, x, y)
            if clip_norm:
                norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads.values()])
                coef = (clip_norm / (torch.linalg.vector_norm(norms, dim=0) + 1e-6)).clamp(max=1.0)
                grads = {n: g * _expand(coef, g) for n, g in grads.items()}
            with torch.no_grad():
                for n, p in params.items():
                    d = grads[n].add(p, alpha=decay[n]) if decay[n] else grads[n]
                    bufs[n].mul_(momentum).add_(d)
                    p.add_(bufs[n], alpha=-lr)
            totals += ce.detach().double().cpu() * y[0].numel()
            elements += y[0].numel()
            steps += 1
    stats = []
    for i, m in enumerate(modules):
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n in params:
                    p.copy_(params[n][i])
        held = {n: bufs[n][i].detach().cpu().clone() for n in names} if momentum_buffers is not None else {}
        mean = float(totals[i]) / elements if elements else math.nan
        stats.append(TrainStats(mean, elements, steps, held))
    return stats


def _tensor_of(module: nn.Module, name: str) -> Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)
