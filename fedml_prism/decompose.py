"""Which layers become principal kernels, and their SVD (``W̄ = U diag(σ) Vᵀ``).

The paper keeps dense: the first conv on raw image channels, 1×1 convs (ResNet shortcuts), the
final classifier, and (here) any layer where the principal form at the largest keep ratio in use
would not be smaller than the dense layer. ``factorize_include`` / ``factorize_exclude`` patterns
(fnmatch on the module name, or a type name such as ``Linear``) override that rule.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from .config import PrismConfig
from .sampling import keep_count

log = logging.getLogger(__name__)


def _matches(name: str, module: nn.Module, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, p) or type(module).__name__ == p for p in patterns)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if (isinstance(m, nn.Conv2d) and m.groups == 1) or type(m) is nn.Linear
    ]


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(N, M·k·k)`` of the im2col view of a Conv2d / Linear weight."""
    w = module.weight
    return w.shape[0], math.prod(w.shape[1:])


def factorizable_layers(model: nn.Module, config: PrismConfig) -> list[str]:
    """Names of the layers to put in principal form, in module order."""
    candidates = _candidates(model)
    first_conv = next((n for n, m in candidates if isinstance(m, nn.Conv2d)), None)
    last_linear = next((n for n, m in reversed(candidates) if isinstance(m, nn.Linear)), None)
    chosen = []
    for name, m in candidates:
        if _matches(name, m, config.factorize_exclude):
            continue
        if _matches(name, m, config.factorize_include):
            chosen.append(name)
            continue
        n, mkk = matrix_shape(m)
        if config.skip_first_conv and name == first_conv:
            continue
        if config.skip_1x1 and isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1):
            continue
        if config.skip_classifier and name == last_linear:
            continue
        if min(n, mkk) < 2:
            continue
        if config.skip_no_saving:
            kept = keep_count(config.max_keep_ratio, min(n, mkk))
            if kept * (n + mkk) >= n * mkk:
                continue
        chosen.append(name)
    return chosen


@dataclass
class Factors:
    """Principal form of one layer: ``u`` (N×r), ``sigma`` (r), ``v`` (r × M × k × k)."""

    u: Tensor
    sigma: Tensor
    v: Tensor

    def dense(self) -> Tensor:
        """``U diag(σ) Vᵀ`` in the original weight shape."""
        w = (self.u * self.sigma) @ self.v.flatten(1)
        return w.view(self.u.shape[0], *self.v.shape[1:])

    def clone(self) -> Factors:
        return Factors(self.u.clone(), self.sigma.clone(), self.v.clone())


def svd_factors(weight: Tensor, dtype: str = "float32", name: str = "") -> Factors:
    """Decompose a dense weight; float32 first (or float64), float64 on failure.

    Raises ``ValueError`` if the weight is not finite or no precision converges, so the caller can
    decide to keep the previous factors.
    """
    if not torch.isfinite(weight).all():
        raise ValueError(f"layer {name!r}: weight has non-finite entries, cannot decompose")
    mat = weight.detach().reshape(weight.shape[0], -1)
    tries = ["float32", "float64"] if dtype == "float32" else ["float64"]
    last_error: Exception | None = None
    for attempt in tries:
        try:
            u, s, vh = torch.linalg.svd(mat.to(getattr(torch, attempt)), full_matrices=False)
        except (RuntimeError, torch.linalg.LinAlgError) as err:  # pragma: no branch - logged below
            last_error = err
            log.warning("layer %r: SVD in %s failed (%s); retrying", name, attempt, err)
            continue
        if not (torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(vh).all()):
            last_error = RuntimeError("non-finite SVD result")
            log.warning("layer %r: SVD in %s gave non-finite factors; retrying", name, attempt)
            continue
        out = weight.dtype
        return Factors(u.to(out).contiguous(), s.to(out), vh.to(out).view(-1, *weight.shape[1:]).contiguous())
    raise ValueError(f"layer {name!r}: SVD failed in every precision: {last_error}")
