"""fedml_prism: PriSM (principal sub-model training) for federated learning, as a FedML plugin.

Layout: ``engine`` (PriSM: plain PyTorch, never imports FedML), ``strategies`` (PriSM's family, the
channel baselines), ``workloads`` (data and models), ``job`` (a validated fedml_config.yaml), ``runtimes``
(FedML: sp driver, cross-silo, cross-device, transports, glue; the only place FedML is imported) and
``tools`` (the ``fedml-prism`` commands). The FedML glue names (``PrismClientTrainer``,
``PrismServerAggregator``, ``offline``) are importable from here too; FedML is imported only when one
of them is first used.
"""

from typing import Any

from .engine.config import STRATEGIES, PrismConfig
from .engine.layers import PrincipalConv2d, PrincipalLayer, PrincipalLinear, convert_static_bn
from .engine.principal import AggregateReport, ClientUpdate, PrincipalModel
from .engine.submodel import SubModel

__all__ = [
    "STRATEGIES",
    "AggregateReport",
    "ClientUpdate",
    "PrincipalConv2d",
    "PrincipalLayer",
    "PrincipalLinear",
    "PrincipalModel",
    "PrismConfig",
    "SubModel",
    "convert_static_bn",
]
__version__ = "0.1.0"

_GLUE = ("PrismClientTrainer", "PrismServerAggregator", "offline")


def __getattr__(name: str) -> Any:
    """The FedML glue names, imported (with FedML) on first use."""
    if name in _GLUE:
        from .runtimes import fedml_glue

        return getattr(fedml_glue, name)
    raise AttributeError(f"module 'fedml_prism' has no attribute {name!r}")
