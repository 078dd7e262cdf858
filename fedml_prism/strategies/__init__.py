"""Federated training strategies, grouped by what a client trains.

- PriSM's family, principal sub-models (:mod:`fedml_prism.engine.principal`): ``prism`` (σ^κ
  importance sampling), ``uniform`` (uniform sampling), ``orthdrop`` (top-k principal kernels, FedHM).
- Channel baselines (:mod:`fedml_prism.engine.channels`): ``origdrop`` (the first channels,
  HeteroFL / FjORD), ``rolex`` (a rolling channel window, FedRolex), ``full`` (FedAvg on the dense model).

Both families run through :class:`~fedml_prism.engine.principal.PrincipalModel` and every runtime.

- Other methods from the project's sources, one module each here, with their own training loop
  (``fedml-prism run`` with ``backend: sp``, and ``fedml-prism bench``; options in ``method_args``):
  ``layerwise`` (Federated Layer-wise Learning + Depth Dropout), ``fedgkt`` (group knowledge transfer:
  shares features, logits and labels), ``superfed`` (weight-shared supernet, tracking sandwich).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from ..engine.config import CHANNEL_STRATEGIES, PRINCIPAL_STRATEGIES, STRATEGIES, register_methods
from .base import WEIGHTS_ONLY, options_from

#: The other methods, one module each here (their rounds: :mod:`fedml_prism.strategies.driver`)
OTHER_METHODS = ("layerwise", "fedgkt", "superfed")
ALL_STRATEGIES = STRATEGIES + OTHER_METHODS
register_methods(OTHER_METHODS)

__all__ = ["ALL_STRATEGIES", "CHANNEL_STRATEGIES", "OTHER_METHODS", "PRINCIPAL_STRATEGIES", "STRATEGIES",
           "method_module", "method_options", "setting_of"]


def method_module(name: str) -> ModuleType:
    """The module of one of :data:`OTHER_METHODS` (``run``, ``Options``, ``SETTING``)."""
    if name not in OTHER_METHODS:
        raise ValueError(f"strategy={name!r} is not one of the other methods: allowed {', '.join(OTHER_METHODS)}")
    return importlib.import_module(f"{__name__}.{name}")


def method_options(name: str, values: Mapping[str, Any] | None, model: Any = None) -> Any:
    """The validated options of method ``name`` from the yaml's ``method_args`` (errors name the key);
    with ``model``, also what the options mean for that model (a method's ``preflight``, e.g. SuperFed's
    capped space), so a config is refused before any work."""
    module = method_module(name)
    options = options_from(module.Options, values)
    preflight = getattr(module, "preflight", None)
    if model is not None and callable(preflight):
        preflight(model, options)
    return options


def setting_of(name: str, values: Mapping[str, Any] | None = None) -> str:
    """The bench's "setting" column: what a strategy shares and what its clients train."""
    if name not in OTHER_METHODS:
        return WEIGHTS_ONLY if name != "full" else "weights only; clients train the full model"
    module = method_module(name)
    setting = getattr(module, "setting", None)
    return setting(method_options(name, values)) if callable(setting) else module.SETTING
