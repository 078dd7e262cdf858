"""Samplers: which principal components (or original channels) a client keeps.

All randomness comes from a ``torch.Generator`` seeded from ``(seed, round, client)``; no global RNG
is touched, so a server and a client process compute the same choice independently.

- ``prism``: ``ceil(ρ·r)`` components without replacement, ``p_i ∝ σ_i^κ`` (paper Eq. 2; sequential
  draws renormalised after each pick, as ``torch.multinomial`` does). ``κ = 0`` is uniform.
- hybrid (``top_share``): the top ``round(top_share·k)`` components always, the rest of the ``k`` sampled
  ``∝ σ^κ`` without replacement from the tail.
- ``orthdrop``: the top ``ceil(ρ·r)`` components, the same for everyone (FedHM).
- ``origdrop``: the first ``ceil(ρ·C)`` channels (HeteroFL / FjORD).
- ``rolex``: a window of ``ceil(ρ·C)`` consecutive channels starting at ``round mod C`` (FedRolex).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
from torch import Tensor


def make_generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded by a stable hash of ``(seed, *parts)`` (same in every process)."""
    key = ":".join(str(p) for p in (seed, *parts)).encode()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1))
    return g


def importance(sigma: Tensor, kappa: float) -> Tensor:
    """Sampling probabilities ``σ^κ / Σ σ^κ`` in float64, with a tiny floor so every component stays
    drawable (rank-deficient layers have σ_i = 0)."""
    s = sigma.detach().to(torch.float64).clamp_min(0)
    top = s.max()
    if kappa == 0 or top <= 0:
        return torch.full_like(s, 1.0 / len(s))
    w = (s / top) ** kappa
    w = w.clamp_min(1e-12)
    return w / w.sum()


def sample_components(sigma: Tensor, keep: int, kappa: float, generator: torch.Generator) -> Tensor:
    """``keep`` distinct indices drawn without replacement with ``p ∝ σ^κ``, sorted ascending."""
    p = importance(sigma, kappa)
    idx = torch.multinomial(p, keep, replacement=False, generator=generator)
    return idx.sort().values


def hybrid_components(sigma: Tensor, keep: int, top: int, kappa: float, generator: torch.Generator) -> Tensor:
    """The ``top`` largest components (SVD orders σ descending) and ``keep - top`` more drawn from the
    others with :func:`sample_components`, sorted ascending. ``top = 0`` draws exactly as
    :func:`sample_components` does (the same generator gives the same indices)."""
    top = min(max(int(top), 0), keep)
    if top == 0:
        return sample_components(sigma, keep, kappa, generator)
    if top == keep:
        return torch.arange(keep)
    tail = top + sample_components(sigma[top:], keep - top, kappa, generator)
    return torch.cat([torch.arange(top), tail])


def top_components(rank: int, keep: int) -> Tensor:
    """The ``keep`` largest components (SVD orders σ descending)."""
    return torch.arange(keep)


def first_channels(channels: int, keep: int) -> Tensor:
    """HeteroFL / FjORD: channels ``0 .. keep-1``."""
    return torch.arange(keep)


def rolling_channels(channels: int, keep: int, round_idx: int) -> Tensor:
    """FedRolex: ``keep`` consecutive channels starting at ``round_idx mod channels`` (wrapping)."""
    start = round_idx % channels
    return ((start + torch.arange(keep)) % channels).sort().values


def inclusion_probabilities(p: Tensor, keep: int) -> Tensor:
    """Exact inclusion probabilities of sequential without-replacement sampling (small ``len(p)``).

    Enumerates every ordered draw; used by tests and docs to state what the sampler does.
    """
    p = p.to(torch.float64)
    n = len(p)
    incl = torch.zeros(n, dtype=torch.float64)

    def walk(chosen: list[int], prob: float, remaining: float) -> None:
        if len(chosen) == keep:
            for i in chosen:
                incl[i] += prob
            return
        for i in range(n):
            if i not in chosen:
                walk(chosen + [i], prob * float(p[i]) / remaining, remaining - float(p[i]))

    walk([], 1.0, float(p.sum()))
    return incl


def draw_capacity(capacities: Mapping[float, float], seed: int, client_id: int) -> float:
    """A client's fixed keep ratio, drawn once from ``{ratio: probability}`` (stable per client)."""
    ratios = list(capacities)
    probs = torch.tensor([capacities[r] for r in ratios], dtype=torch.float64)
    g = make_generator(seed, "capacity", client_id)
    return ratios[int(torch.multinomial(probs, 1, generator=g))]


def keep_count(keep_ratio: float, total: int) -> int:
    """``ceil(ρ·total)``, at least 1 (the product is rounded first so 0.2·10 gives 2, not 3)."""
    return max(1, math.ceil(round(keep_ratio * total, 9)))
