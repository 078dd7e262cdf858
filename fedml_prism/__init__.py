"""fedml_prism: PriSM (principal sub-model training) for federated learning, as a FedML plugin.

The engine (this package's top level) is plain PyTorch and never imports FedML; the FedML glue lives
in :mod:`fedml_prism.fedml_glue` and is imported only when a FedML runtime is used.
"""

from .config import STRATEGIES, PrismConfig
from .layers import PrincipalConv2d, PrincipalLayer, PrincipalLinear, convert_static_bn
from .principal import AggregateReport, ClientUpdate, PrincipalModel
from .submodel import SubModel

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
