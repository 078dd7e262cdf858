"""A layer with singular values of one's choosing, for tests of what the model does with them."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def linear_with_spectrum(sigma: Tensor, seed: int = 0) -> nn.Sequential:
    """``Sequential(Linear(r, r))``, no bias, weight ``U diag(sigma) Vᵀ`` with random orthogonal ``U`` and
    ``V`` (square: both orthogonal). Its module name is ``"0"``."""
    r = len(sigma)
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(r, r, generator=g))
    v, _ = torch.linalg.qr(torch.randn(r, r, generator=g))
    layer = nn.Linear(r, r, bias=False)
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(sigma) @ v.t())
    return nn.Sequential(layer)
