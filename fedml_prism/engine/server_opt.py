"""The server's optimizer on the round's aggregated change (``prism_args.server_optimizer``).

Reddi et al. 2021 ("Adaptive Federated Optimization") treat ``Δ = w_aggregated − w`` as a pseudo-gradient
and step on it at the server: FedAvgM (``avgm``, Hsu et al. 2019) keeps a momentum of the rounds'
changes, FedAdam (``adam``) an Adam without bias correction whose ε (their τ) floors the adaptivity.
With ``avgm``, ``server_lr = 1`` and ``server_momentum = 0`` the step is plain FedAvg.

For a factorized layer the step is taken on its dense product ``U diag(σ) Vᵀ`` before the orthogonal
refresh, which then decomposes the stepped weight (the server holds the dense model anyway); the dense
entries step in place. State: ``m`` (and ``v`` for adam) per trainable weight, in float32, checkpointed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .config import PrismConfig


class ServerOptimizer:
    """FedAvgM / FedAdam state for one job (see the module docstring)."""

    def __init__(self, config: PrismConfig) -> None:
        if config.server_optimizer == "none":
            raise ValueError("server_optimizer='none' has no server step")
        self.kind = config.server_optimizer
        self.lr, self.beta1 = float(config.server_lr), float(config.server_momentum)
        self.beta2, self.eps = float(config.server_beta2), float(config.server_eps)
        self.m: dict[str, Tensor] = {}
        self.v: dict[str, Tensor] = {}

    def step(self, key: str, old: Tensor, aggregated: Tensor) -> Tensor:
        """The new value of weight ``key`` from its value before the round and the round's aggregate."""
        delta = (aggregated.to(torch.float32) - old.to(torch.float32))
        m = self.m.get(key)
        m = torch.zeros_like(delta) if m is None else m
        if self.kind == "avgm":
            m = self.beta1 * m + delta
            update = self.lr * m
        else:
            v = self.v.get(key)
            v = torch.zeros_like(delta) if v is None else v
            m = self.beta1 * m + (1 - self.beta1) * delta
            v = self.beta2 * v + (1 - self.beta2) * delta * delta
            self.v[key] = v
            update = self.lr * m / (v.sqrt() + self.eps)
        self.m[key] = m
        return (old.to(torch.float32) + update).to(old.dtype)

    def state_dict(self) -> dict[str, Tensor]:
        """``m::<key>`` and ``v::<key>`` tensors (loads with ``torch.load(weights_only=True)``)."""
        return {**{f"m::{k}": t for k, t in self.m.items()}, **{f"v::{k}": t for k, t in self.v.items()}}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        for key in state:
            head, sep, _ = key.partition("::")
            if not sep or head not in ("m", "v"):
                raise ValueError(f"server optimizer state key {key!r} is not m::<weight> or v::<weight>")
        self.m = {k[3:]: v.clone() for k, v in state.items() if k.startswith("m::")}
        self.v = {k[3:]: v.clone() for k, v in state.items() if k.startswith("v::")}
