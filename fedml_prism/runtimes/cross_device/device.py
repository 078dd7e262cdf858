"""A reference Beehive device in Python: FedML's Android SDK protocol, MNN training.

It speaks what ``ai.fedml.edge`` (FedML's Android SDK, unchanged from v0.8.7 to the last release)
speaks, so the cross-device path can be tested without phones and device code can be written
against a runnable example:

- MQTT (QoS 2): last will ``flclient_agent/last_will_msg`` = ``{"ID": "<edge>", "status": "OFFLINE"}``;
  it listens on ``flserver_agent/<edge>/start_train`` (``runId``, ``server_id``,
  ``run_config.parameters``), then on ``fedml_<runId>_<serverId>_<edge>``; it publishes on
  ``fedml_<runId>_<edge>`` with ``retain`` set, as the SDK does, and ignores retained messages it
  receives, as the SDK does.
- Server messages (``msg_type``): 6 → status ``ONLINE``; 1 (once per run) and 2 → download
  ``model_params`` (an S3 key) from the bucket, train, upload, send 3; 2 after ``comm_round``
  trainings, or 7 → status ``FINISHED`` and exit.
- Client messages: ``{"client_status", "client_os": "Android", "msg_type": 5, "sender": edge,
  "receiver": 0}``; ``{"model_params": <S3 key>, "client_idx": "<str>", "num_samples": n,
  "msg_type": 3, "sender": edge, "receiver": 0}``. Uploaded keys: ``<download topic>-<32 hex>``
  (the SDK's ``topic + "-" + UUID``), the only keys the server accepts from this edge
  (:func:`fedml_prism.runtimes.cross_device.protocol.upload_key_pattern`); uploads carry no ACL (private objects).
- Training: :func:`fedml_prism.runtimes.cross_device.mnn_export.train_graph` (MNN's Python training API, as the SDK's
  ``FedMLMNNTrainer.cpp``: SGD momentum 0.1, no weight decay, ``learning_rate``/``epochs``/
  ``batch_size`` from ``train_args``), on the data partition ``client_idx`` of the job's dataset.

It imports neither FedML nor torch's training code; only paho-mqtt, boto3 and MNN.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import time
import uuid
from typing import Any

import torch

from ...engine.sampling import make_generator
from ...settings.mqtt import BrokerSettings, S3Settings
from .mnn_export import train_graph

log = logging.getLogger("fedml_prism")

LAST_WILL_TOPIC = "flclient_agent/last_will_msg"
MSG_INIT, MSG_SYNC, MSG_MODEL, MSG_STATUS, MSG_CHECK, MSG_FINISH = 1, 2, 3, 5, 6, 7


class ReferenceDevice:
    """One edge device. ``data(client_idx)`` returns ``(x, y)`` tensors of that data partition."""

    def __init__(
        self,
        edge_id: int,
        broker: BrokerSettings,
        s3: S3Settings,
        data: Any,
        num_classes: int,
        cache_dir: str,
        idle_timeout_s: float = 300.0,
        seed: int = 0,
    ) -> None:
        import boto3
        import paho.mqtt.client as mqtt

        self.edge_id = int(edge_id)
        self.data, self.num_classes, self.seed = data, num_classes, seed
        self.cache_dir = cache_dir
        os.makedirs(cache_dir, exist_ok=True)
        self.idle_timeout_s = idle_timeout_s
        self.bucket = s3.bucket
        self.s3 = boto3.client("s3", endpoint_url=s3.endpoint, region_name=s3.region, aws_access_key_id=s3.access_key,
                               aws_secret_access_key=s3.secret_key)
        self.run_id: str | None = None
        self.server_id = ""
        self.params: dict[str, Any] = {}
        self.rounds_trained = 0
        self.initialized = False
        self.jobs: queue.Queue = queue.Queue()
        self.last_message_at = time.time()
        self.client = mqtt.Client(client_id=f"{self.edge_id}_{int(time.time() * 1000)}", clean_session=False)
        broker.configure(self.client)  # credentials and TLS
        self.client.will_set(LAST_WILL_TOPIC, json.dumps({"ID": str(self.edge_id), "status": "OFFLINE"}), qos=2,
                             retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.host, self.port, self.keepalive = broker.host, broker.port, broker.keepalive

    # ------------------------------------------------------------------ MQTT
    @property
    def run_topic(self) -> str:
        return f"fedml_{self.run_id}_{self.server_id}_{self.edge_id}"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: int) -> None:
        client.subscribe(f"flserver_agent/{self.edge_id}/start_train", qos=2)
        client.subscribe(f"flserver_agent/{self.edge_id}/stop_train", qos=2)
        if self.run_id is not None:
            client.subscribe(self.run_topic, qos=2)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.retain:  # the SDK drops retained messages (EdgeCommunicator.java)
            return
        self.last_message_at = time.time()
        try:
            payload = json.loads(msg.payload.decode())
        except (UnicodeDecodeError, ValueError, RecursionError):
            payload = None
        if not isinstance(payload, dict):
            log.warning("device %d: ignored a message that is not a JSON object on %s", self.edge_id, msg.topic)
            return
        if msg.topic.endswith("/start_train"):
            try:
                self._start_train(payload)
            except (TypeError, ValueError, AttributeError) as err:  # a malformed announcement: keep listening
                log.warning("device %d: ignored a start_train message: %s: %s", self.edge_id, type(err).__name__, err)
        elif msg.topic.endswith("/stop_train"):
            self.jobs.put(("finish", None))
        elif msg.topic == self.run_topic:
            self.jobs.put(("server", payload))

    def _start_train(self, payload: dict[str, Any]) -> None:
        run_id = str(payload.get("runId", 0))
        if run_id == self.run_id:
            return  # the same run announced again
        self.run_id, self.server_id = run_id, str(payload.get("server_id", ""))
        self.params = (payload.get("run_config") or {}).get("parameters") or {}
        self.rounds_trained, self.initialized = 0, False
        self.client.subscribe(self.run_topic, qos=2)
        log.info("device %d: run %s (server %s), %s", self.edge_id, run_id, self.server_id, self.params.get("train_args"))

    def _publish(self, message: dict[str, Any]) -> None:
        info = self.client.publish(f"fedml_{self.run_id}_{self.edge_id}", json.dumps(message), qos=2, retain=True)
        info.wait_for_publish(timeout=30)

    def _status(self, status: str) -> None:
        self._publish({"client_status": status, "client_os": "Android", "msg_type": MSG_STATUS,
                       "sender": self.edge_id, "receiver": 0})

    # ------------------------------------------------------------------ the device loop
    def run(self) -> int:
        """Connect, serve the run, exit 0 after FINISHED (3 if the server is silent too long)."""
        self.client.connect(self.host, self.port, self.keepalive)
        self.client.loop_start()
        try:
            while True:
                try:
                    kind, payload = self.jobs.get(timeout=1.0)
                except queue.Empty:
                    if time.time() - self.last_message_at > self.idle_timeout_s:
                        log.error("device %d: no message from the server for %.0f s: exiting", self.edge_id,
                                  self.idle_timeout_s)
                        return 3
                    continue
                if kind == "finish" or not self._handle_safely(payload):
                    self._status("FINISHED")
                    log.info("device %d: FINISHED after %d rounds", self.edge_id, self.rounds_trained)
                    return 0
        finally:
            self.client.loop_stop()
            self.client.disconnect()

    def _handle_safely(self, message: Any) -> bool:
        """:meth:`_handle`; a message that cannot be served (malformed, or its model unreachable) is
        logged and skipped: the server's round deadline covers the missing model."""
        try:
            return self._handle(message)
        except Exception as err:  # noqa: BLE001 - anyone on the broker may publish on the run topic
            log.warning("device %d: skipped a server message: %s: %s", self.edge_id, type(err).__name__, err)
            return True

    def _handle(self, message: dict[str, Any]) -> bool:
        """Serve one server message; ``False`` when the run is over for this device."""
        kind = int(message.get("msg_type", 0))
        comm_round = int((self.params.get("train_args") or {}).get("comm_round", 0))
        if kind == MSG_CHECK:
            self._status("ONLINE")
        elif kind == MSG_INIT and not self.initialized:
            self.initialized = True
            self._train_round(message)
        elif kind == MSG_SYNC:
            if self.rounds_trained >= comm_round:
                return False
            self._train_round(message)
        elif kind == MSG_FINISH:
            return False
        return True

    def _train_round(self, message: dict[str, Any]) -> None:
        key = str(message["model_params"]).strip()
        client_idx = int(message["client_idx"])
        path = os.path.join(self.cache_dir, f"{self.run_topic}-{uuid.uuid4().hex}")
        self.s3.download_file(self.bucket, key, path)
        train = self.params.get("train_args") or {}
        x, y = self.data(client_idx)
        g = make_generator(self.seed, "device-data", self.rounds_trained, client_idx)
        order = torch.randperm(len(y), generator=g)
        bs = int(train.get("batch_size", 128))
        batches = [(x[order[i:i + bs]], y[order[i:i + bs]]) for i in range(0, len(y), bs)]
        samples, loss = train_graph(path, batches, self.num_classes, float(train.get("learning_rate", 0.01)),
                                    epochs=int(train.get("epochs", 1)))
        upload_key = os.path.basename(path)  # <download topic>-<32 hex digits>, as the SDK names it
        self.s3.upload_file(path, self.bucket, upload_key)  # no ExtraArgs: no ACL, a private object
        self._publish({"model_params": upload_key, "client_idx": str(client_idx), "num_samples": samples,
                       "msg_type": MSG_MODEL, "sender": self.edge_id, "receiver": 0})
        self.rounds_trained += 1
        log.info("device %d: round %d trained on partition %d (%d samples, loss %.4f)", self.edge_id,
                 self.rounds_trained, client_idx, samples, loss)
        os.remove(path)
