"""FedML runtimes: the sp driver (``simulation``), the cross-silo package (``cross_silo``: MPI, gRPC,
MQTT_S3, with its managers and PriSM's transports), the cross-device package (``cross_device``: the
Beehive server, the reference device, MNN export and the graph sandbox), and what they share: the wire
format (``wire``), keys and security settings (``security``), FedML's process environment
(``fedml_env``), the FedML import boundary (``_fedml_import``) and the glue classes FedML drives
(``fedml_glue``). The only place FedML is imported.
"""
