"""The PriSM engine: plain PyTorch, never imports FedML.

Principal kernels (``decompose``, ``layers``, ``attention``), sampling (``sampling``), sub-models
(``submodel``, ``channels`` for the channel baselines), aggregation and the orthogonal refresh
(``aggregate``, ``refresh``), the global model (``principal.PrincipalModel``), local training
(``train``), the round driver every runtime uses (``server.PrismServer`` / ``PrismClient``), and the
analyses behind ``costs`` and ``rank``.
"""
