"""The cross-device runtime (Beehive: ``training_type: cross_device``, ``backend: MQTT_S3_MNN``).

``launch`` runs the server or a reference device (``device``); ``mnn_export`` turns sub-models into MNN
graphs and back; ``mnn_sandbox`` reads a device's graph in a sandboxed child process.
"""
