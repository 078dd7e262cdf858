"""FedML runtimes: the sp driver (``simulation``), cross-silo (``cross_silo``: MPI, gRPC, MQTT_S3, with
``server_manager`` / ``client_manager`` and PriSM's transports ``transport``, ``wire``, ``security``,
``grpc_transport``, ``mqtt_transport``), cross-device (``cross_device``, ``device``, ``mnn_export``,
``mnn_sandbox``), FedML's process environment (``fedml_env``) and the glue classes FedML drives
(``fedml_glue``). The only place FedML is imported.
"""
