"""The FedML glue under its first name: ``from fedml_prism.fedml_glue import PrismClientTrainer,
PrismServerAggregator, offline`` keeps working (the code lives in :mod:`fedml_prism.runtimes.fedml_glue`)."""

from .runtimes.fedml_glue import PrismClientTrainer, PrismServerAggregator, offline

__all__ = ["PrismClientTrainer", "PrismServerAggregator", "offline"]
