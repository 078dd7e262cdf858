"""The cross-silo runtime (``training_type: cross_silo``; ``backend: MPI | GRPC | MQTT_S3``).

``launch`` starts a party (imports without FedML); ``server_manager`` and ``client_manager`` extend
FedML's cross-silo managers; ``transport`` picks PriSM's own communication manager for gRPC
(``grpc_transport``) or MQTT_S3 (``mqtt_transport``, with its broker and bucket settings in
``mqtt_broker``). ``server_manager``, ``client_manager``, ``grpc_transport`` and ``mqtt_transport``
subclass FedML's classes and import FedML at module level (after
:func:`~fedml_prism.runtimes._fedml_import.silence_fedml_import_warnings`); the others import without it.
"""
