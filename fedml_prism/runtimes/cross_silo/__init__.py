"""The cross-silo runtime (``training_type: cross_silo``; ``backend: MPI | GRPC | MQTT_S3``).

``launch`` starts a party (imports without FedML); ``server_manager`` and ``client_manager`` extend
FedML's cross-silo managers; ``transport`` picks PriSM's own communication manager for gRPC
(``grpc_transport``) or MQTT_S3 (``mqtt_transport``).
"""
