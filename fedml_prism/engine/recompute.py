"""Principal-width training: selective activation recomputation around principal layers.

A principal layer runs ``x → first factor (M → r′ channels) → expansion (r′ → N channels)``. With plain
autograd a client keeps, for every such layer, the narrow r′-channel tensor *and* the full-width tensors
after it (the expansion's output = the BN input, the activation's output), so a keep-0.2 sub-model holds
nearly the dense model's activations although it has a quarter of its parameters.

:func:`principal_width` trains with selective activation recomputation (Chen et al. 2016; the selective
form of Korthikanti et al. 2022; InPlace-ABN's recomputed BN + activation) placed where PriSM makes it
cheap. Every *unit* of the model (:func:`recompute_units`: the smallest module whose own forward calls a
principal layer: a residual block, a transformer block, an LSTM layer, a ``Sequential`` of conv, BN and
activation) runs under non-reentrant :func:`torch.utils.checkpoint.checkpoint` with a selective policy:

- a unit with principal layers (:func:`keep_narrow`) keeps for backward its inputs and each principal
  layer's narrow first-factor output; everything else is recomputed in the backward pass: the expansion
  (about ``1/(k²+1)`` of a k×k principal layer's MACs), normalization with batch statistics,
  activations, pooling, elementwise ops and the dense layers inside the unit (a residual shortcut conv,
  an attention kernel);
- a dense unit (the dense model, the channel baselines: the same modules, found from the layers the
  default rule would factorize; :func:`keep_products`) keeps its inputs and every matrix product's
  output (convolutions, matrix multiplications, attention kernels) and recomputes normalization,
  activations and elementwise ops, as InPlace-ABN does for BN + activation; a dense unit without a
  normalization layer (an LSTM layer) would keep about as much as plain autograd and is left to it.

Units whose recomputation would not reproduce the forward (BatchNorm updating running statistics) are
left to plain autograd (:attr:`Units.skipped` says which and why). Loss, gradients and the SGD step are
those of plain autograd (``tests/engine/test_recompute.py``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .config import PrismConfig
from .decompose import _NORMS, factorizable_layers
from .layers import PrincipalLayer, principal_part

log = logging.getLogger(__name__)
_LOGGED: set[tuple[str, str, str]] = set()

_aten = torch.ops.aten
#: ops whose outputs are kept: expensive to recompute relative to their output's size
_MATMUL_OPS = {
    _aten.convolution.default,
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}


def keep_narrow(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    """Policy of a unit with principal layers: keep only the first factors' (narrow) outputs."""
    if op in _MATMUL_OPS and principal_part() == "first":
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def keep_products(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    """Policy of a dense unit: keep every matrix product's output (none is a principal expansion)."""
    if op in _MATMUL_OPS and principal_part() != "expand":
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@dataclass
class Units:
    """What :func:`recompute_units` found: the checkpointed units and the ones left to plain autograd."""

    units: list[tuple[str, nn.Module]]
    skipped: list[tuple[str, str]]


def _has_principal(module: nn.Module) -> bool:
    return any(isinstance(m, PrincipalLayer) for m in module.modules())


def _skip_reason(module: nn.Module) -> str | None:
    if "forward" in vars(module):
        return "its forward is replaced on the instance (wrapped by another tool or already recomputing)"
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training:
            where = f" ({name})" if name else ""
            return f"BatchNorm{where} updates running statistics, which a recomputation would update twice"
    if not _has_principal(module) and not any(isinstance(m, _NORMS) for m in module.modules()):
        # what a dense unit recomputes is normalization + activation from the kept products; without a
        # norm (an LSTM layer) the kept products are most of what plain autograd keeps anyway
        return "a dense block without normalization keeps about what plain autograd keeps"
    return None


def _narrowable(model: nn.Module) -> set[str]:
    principal = {name for name, m in model.named_modules() if isinstance(m, PrincipalLayer)}
    return principal or set(factorizable_layers(model, PrismConfig()))


def recompute_units(model: nn.Module) -> Units:
    """The units of ``model``: the smallest modules whose own forward calls a principal layer (in a
    model without principal layers: a layer the default rule would factorize).

    A module with such a layer among its direct children is a unit (its forward combines the layer
    with what surrounds it: BN, activation, residual addition); a module whose such layers all lie
    deeper is split into its children. Layers outside every unit (a dense stem, the classifier) train
    with plain autograd."""
    layers = _narrowable(model)
    units: list[tuple[str, nn.Module]] = []
    skipped: list[tuple[str, str]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        if not any(n.startswith(prefix) for n in layers):
            return
        if any(prefix + child in layers for child, _ in module.named_children()):
            name = prefix.rstrip(".")
            reason = _skip_reason(module)
            (skipped.append((name, reason)) if reason else units.append((name, module)))
            return
        for child, module_ in module.named_children():
            visit(f"{prefix}{child}.", module_)

    visit("", model)
    return Units(units, skipped)


def _checkpointed(forward: object, policy: object, *args: object, **kwargs: object) -> object:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(
        forward, *args, use_reentrant=False,
        context_fn=functools.partial(create_selective_checkpoint_contexts, policy), **kwargs,
    )


@contextmanager
def principal_width(model: nn.Module, enabled: bool = True) -> Iterator[Units]:
    """Within the block, forward passes of ``model`` keep for backward only what :func:`keep_narrow` /
    :func:`keep_products` keep in each unit, and the backward pass recomputes the rest (``enabled=False``: plain autograd).
    Run the backward pass inside the block too. Yields the :class:`Units` found."""
    found = recompute_units(model) if enabled else Units([], [])
    for name, reason in found.skipped:
        if (type(model).__name__, name, reason) not in _LOGGED:  # once per process, not every round
            _LOGGED.add((type(model).__name__, name, reason))
            log.info("activation_memory: %s trains with plain autograd: %s", name or "the model", reason)
    patched = []
    try:
        for _, unit in found.units:
            policy = keep_narrow if _has_principal(unit) else keep_products
            unit.forward = functools.partial(_checkpointed, unit.forward, policy)
            patched.append(unit)
        yield found
    finally:
        for unit in patched:
            del unit.forward
