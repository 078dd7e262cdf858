"""PriSM over FedML cross-device (Beehive): ``training_type: cross_device``, ``backend: MQTT_S3_MNN``.

The server is FedML 0.9.6's cross-device ``FedMLServerManager`` (``cross_device/server_mnn``) on its
``MQTT_S3_MNN`` transport and message protocol, extended where PriSM needs more:

- **one graph per device.** FedML uploads one global ``.mnn`` file and sends every device the same
  S3 key (``send_init_msg`` reuses the first URL/key). Here each selected device's sub-model is
  exported as its own MNN graph (:class:`~fedml_prism.runtimes.cross_device.mnn_export.MnnExporter`) and uploaded under
  its own key; the server remembers which principal components each device got and the graph's
  parameter map, and maps the trained graph back onto the sub-model's payload for Eq. 3;
- **a start message devices can use.** FedML's local ``start_train`` sends a fixed ``runId`` of 189
  and no ``server_id``, so an SDK device would listen on another topic
  (``fedml_server_manager.py:58-155``); here it carries the run's id, the server id and the job's
  ``train_args`` / ``data_args``, and is repeated (with the status check) until the devices are online;
- **no hang on a lost device.** The SDK's last will (``flclient_agent/last_will_msg``, which FedML's
  server does not subscribe to) marks a device gone at once; a round deadline, a start deadline and a
  finish deadline cover devices that go silent without one;
- **a server that device messages cannot take over.** Devices speak FedML's unsigned JSON protocol
  (the Android SDK cannot sign frames), so the server trusts nothing in a message body: the MQTT topic
  names the device (a ``sender`` field that differs is refused); an upload's S3 key must be one that
  device makes (``fedml_<run>_<server>_<edge>-<32 hex digits>``, the SDK's ``topic + "-" + uuid``),
  unused so far, and of an object written after the round's model was sent; its size is checked
  (``head_object``) against ``security_args.max_message_mb`` before it is downloaded, to a file name
  the server makes in its cache folder; ``num_samples`` must be an integer in ``[1, MAX_SAMPLES]``;
  the graph is parsed in a child process with a time and a memory limit
  (:mod:`fedml_prism.runtimes.cross_device.mnn_sandbox`) and its parameters are checked (count, shapes, float32, finite)
  before the engine's own checks. Each refusal is logged with its reason and the round goes on; no
  handler lets an exception out of the message loop. The server's uploads are private (no
  ``public-read`` ACL); devices download them with the bucket's credentials, as the SDK does.
  What only the broker can close (ACLs: each device publishes on its own topics only): anyone who
  may publish on a device's topic speaks as that device, and on the shared last-will topic;
- **no stale messages.** Devices publish with ``retain`` set (the SDK does), so the broker keeps each
  device's last message (a FINISHED, an ONLINE, an upload, a last will) and hands it to the server when
  it subscribes, e.g. after a restart. Every message the server takes is an event, none a state it
  needs at start, so it ignores every retained message, on every topic (one log line each:
  ``ignored a retained message on <topic>``); FedML's ``MqttManager.on_message`` drops them too, this
  check does not depend on it. The server publishes without ``retain`` (FedML's ``MqttManager``
  retains by default): SDK devices drop retained messages, and a retained INIT, SYNC or FINISH would be
  stale for any device that subscribes later (after a device or server restart). A retained message
  an older server left stays on the broker until overwritten (clear it with an empty retained
  publish). Only the server's last will (``flserver/last_will_msg``, set by FedML when it connects;
  nothing in this protocol reads it) is still retained;
- **evaluation on the rebuilt dense model** in PyTorch (:class:`~fedml_prism.engine.server.PrismServer`),
  plus the global model written as an MNN graph to ``global_model_file_path`` every round.

FedML defects worked around here (FedML's files are not edited):

- ``core/distributed/communication/s3/remote_storage.py:404``: ``upload_file`` passes
  ``ExtraArgs={"Metadata": None}``, boto3 rejects it, the error is logged and ``None`` is returned as
  the URL, so the device is told of a file that was never uploaded; it also asks for a
  ``public-read`` ACL. Uploads here are private and fail loudly (:func:`~.comm_manager._fix_s3_upload`).
- ``core/distributed/communication/mqtt_s3_mnn/mqtt_s3_comm_manager.py:182``: a message's S3 key is
  downloaded to ``model_file_cache_folder + "/" + key`` (a key ``../../x`` writes outside the cache,
  and the file is later deleted by that name), any size, from any topic's claimed sender; FedML's
  receive path is replaced by :class:`~.comm_manager.PrismMnnCommManager`'s (see above).
- ``cross_device/server_mnn/utils.py:18``: ``load_module(..., False)`` exposes no parameters under
  MNN 3.x; graphs are read with ``for_training=True`` (:func:`fedml_prism.runtimes.cross_device.mnn_export.load_module`).
- ``cross_device/server_mnn/fedml_aggregator.py:255``: ``loss.read()`` fails in MNN evaluation; the
  server evaluates the dense PyTorch model instead, and :func:`fedml_prism.runtimes.cross_device.mnn_export.evaluate_graph`
  computes the loss from the probabilities.

The package: ``launch`` starts the server or a reference device (``device``) and imports without FedML;
``server_manager`` (:class:`~.server_manager.PrismMNNServerManager`) and ``comm_manager``
(:class:`~.comm_manager.PrismMnnCommManager`) subclass FedML's classes and import FedML at module level;
``protocol`` holds the checks of what devices send that need no FedML; ``mnn_export`` turns sub-models
into MNN graphs and back; ``mnn_sandbox`` reads a device's graph in a sandboxed child process
(``mnn_sandbox_child``: the script that child runs, with its confinement layers).
"""
