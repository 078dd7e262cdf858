"""How many principal kernels each layer needs (paper appendix B).

The measure is the effective rank ``exp(-Σ p_i ln p_i)`` of the importance distribution
``p_i ∝ σ_i^κ`` (Eq. 2 with κ = 2), i.e. ``2^{H}`` with the entropy ``H`` in bits: a layer whose
energy sits in a few components needs few kernels. Comparing it with the full rank shows why a fixed
top-k sub-model (OrthDrop) loses capacity while random sampling of all components does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .sampling import importance


def effective_kernels(sigma: Tensor, kappa: float = 2.0) -> float:
    """``exp(entropy)`` of ``p ∝ σ^κ``: between 1 (one dominant kernel) and ``len(sigma)``."""
    p = importance(sigma, kappa)
    p = p[p > 0]
    return float(math.exp(-(p * p.log()).sum()))


def layer_spectra(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Singular values per layer from a PriSM checkpoint (its principal factors; other conv/linear
    weights are decomposed) or from a plain ``state_dict``."""
    server = state.get("server", state) if isinstance(state, Mapping) else state
    spectra: dict[str, Tensor] = {}
    if isinstance(server, Mapping) and "factors" in server:
        spectra.update({name: f["sigma"] for name, f in server["factors"].items()})
        dense = server["dense"]
    else:
        dense = server
    for key, value in dense.items():
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        if name is None or name in spectra or not isinstance(value, Tensor) or value.dim() not in (2, 4):
            continue
        if value.dim() == 4 and value.shape[2:] == (1, 1):
            continue
        spectra[name] = torch.linalg.svdvals(value.detach().float().reshape(value.shape[0], -1))
    return spectra


def rank_report(state: Mapping[str, Any], kappa: float = 2.0) -> list[dict[str, Any]]:
    return [
        {"layer": name, "rank": len(sigma), "effective_kernels": effective_kernels(sigma, kappa),
         "fraction": effective_kernels(sigma, kappa) / len(sigma)}
        for name, sigma in layer_spectra(state).items()
    ]


def plot_rank(report: list[dict[str, Any]], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(report)), 4))
    x = range(len(report))
    ax.bar(x, [r["rank"] for r in report], color="#ddd", label="all kernels (rank)")
    ax.bar(x, [r["effective_kernels"] for r in report], color="#3b7dd8", label="kernels needed (effective rank)")
    ax.set_xticks(list(x), [r["layer"] for r in report], rotation=75, fontsize=6)
    ax.set(ylabel="principal kernels", title=title or "principal kernels needed per layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
