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
  ``public-read`` ACL. Uploads here are private and fail loudly (:func:`_fix_s3_upload`).
- ``core/distributed/communication/mqtt_s3_mnn/mqtt_s3_comm_manager.py:182``: a message's S3 key is
  downloaded to ``model_file_cache_folder + "/" + key`` (a key ``../../x`` writes outside the cache,
  and the file is later deleted by that name), any size, from any topic's claimed sender; FedML's
  receive path is replaced by :class:`PrismMnnCommManager`'s (see above).
- ``cross_device/server_mnn/utils.py:18``: ``load_module(..., False)`` exposes no parameters under
  MNN 3.x; graphs are read with ``for_training=True`` (:func:`fedml_prism.runtimes.cross_device.mnn_export.load_module`).
- ``cross_device/server_mnn/fedml_aggregator.py:255``: ``loss.read()`` fails in MNN evaluation; the
  server evaluates the dense PyTorch model instead, and :func:`fedml_prism.runtimes.cross_device.mnn_export.evaluate_graph`
  computes the loss from the probabilities.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import threading
import uuid
from typing import Any

import torch

from ...engine.principal import ClientUpdate
from ...engine.server import MAX_SAMPLES, Deadline, PrismServer
from ...job import Job, edge_ids, input_shape, load_data
from ...workloads.models import create_model
from .._fedml_import import silence_fedml_import_warnings
from .mnn_sandbox import ParseLimits

log = logging.getLogger("fedml_prism")

DEVICE_LAST_WILL_TOPIC = "flclient_agent/last_will_msg"  # the Android SDK's (EdgeCommunicator.java)


URL_EXPIRY_S = 3600  # the presigned GET URL sent with each graph (devices use the key and their credentials)
MAX_JSON_BYTES = 1 << 16  # a device's messages are small JSON objects
MAX_KEY_CHARS = 256
PRISM_ROUND = "prism::round"  # set by the server on an admitted upload (never taken from a device)
MSG_MODEL, MSG_STATUS = 3, 5  # what a device sends (FedML's MyMessage C2S_SEND_MODEL_TO_SERVER, C2S_CLIENT_STATUS)
_UPLOAD_KEY = re.compile(r"fedml_(?P<run>[^_/]+)_(?P<server>\d+)_(?P<edge>\d+)-[0-9a-f]{32}")


class Rejected(ValueError):
    """A device message the server refuses; the text is the logged reason."""


def upload_key_pattern(run_id: Any, server_id: Any, edge: int) -> re.Pattern:
    """The S3 keys device ``edge`` uploads under: the topic it downloads on, ``-``, 32 hex digits
    (the Android SDK's ``topic + "-" + UUID`` without dashes;
    :class:`~fedml_prism.runtimes.cross_device.device.ReferenceDevice`)."""
    return re.compile(re.escape(f"fedml_{run_id}_{server_id}_{edge}-") + "[0-9a-f]{32}")


def sample_count_problem(value: Any) -> str | None:
    """Why a claimed ``num_samples`` is unusable (``None``: an integer in ``[1, MAX_SAMPLES]``), as
    :func:`fedml_prism.engine.server._scalar` checks the tensors of cross-silo clients."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"num_samples={_short(value)} is invalid: allowed an integer in [1, {MAX_SAMPLES}]"
    if not (math.isfinite(value) and value == int(value) and 1 <= value <= MAX_SAMPLES):
        return f"num_samples={_short(value)} is not a sample count in [1, {MAX_SAMPLES}]"
    return None


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` of a value a peer chose, cut short for the log."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"…({len(text)} chars)"


def _int_field(body: dict, key: str) -> int | None:
    """An integer field of a device message (a JSON number or decimal string; SDK versions differ);
    ``None`` when absent; :class:`Rejected` otherwise."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdecimal() and len(value) < 20:
        return int(value)
    raise Rejected(f"{key}={_short(value)} is invalid: allowed an integer")


def _private_upload(inner: Any, key: str, path: str) -> str:
    """Upload ``path`` under ``key`` without any ACL (private, unlike FedML's ``public-read``); a
    failure raises ``OSError``. Returns a presigned GET URL valid for ``URL_EXPIRY_S``."""
    client, bucket = inner.aws_s3_client, inner.bucket_name
    try:
        client.upload_file(path, bucket, key)
        return client.generate_presigned_url("get_object", ExpiresIn=URL_EXPIRY_S, Params={"Bucket": bucket, "Key": key})
    except Exception as err:  # noqa: BLE001 - boto3 raises several unrelated types; the caller handles OSError
        raise OSError(f"upload of {path} to S3 key {key} failed: {type(err).__name__}: {err}") from err


def _fix_s3_upload(storage: Any) -> None:
    """FedML ``s3/remote_storage.py:404`` passes ``Metadata=None`` (boto3 rejects it, silently) and
    ``ACL: public-read``: upload privately and raise if the upload fails, instead of sending a key
    for a file that is not there."""
    inner = storage.s3_storage
    storage.upload_model_file = lambda message_key, model_file_path: _private_upload(inner, message_key, model_file_path)


def _comm_manager_class():
    silence_fedml_import_warnings()
    from fedml.core.distributed.communication.message import Message
    from fedml.core.distributed.communication.mqtt_s3_mnn.mqtt_s3_comm_manager import MqttS3MNNCommManager

    class PrismMnnCommManager(MqttS3MNNCommManager):
        """FedML's ``MQTT_S3_MNN`` server transport with a receive path that trusts no message body
        (see the module doc) and private uploads. ``admit(edge, num_samples, uploaded_at)`` is the
        server manager's check of an upload against the round (``None``: declined, it logs why; else
        the round index), run under ``lock`` with the download and the handler."""

        def __init__(self, mqtt_config: Any, s3_config: Any, args: Any, client_num: int, max_bytes: int,
                     admit: Any, lock: Any) -> None:
            self.max_bytes, self.admit, self.lock = max_bytes, admit, lock
            self.sent_at: dict[int, Any] = {}  # edge → S3 LastModified of the last graph sent to it
            self.used_keys: set[str] = set()
            super().__init__(mqtt_config, s3_config, topic=str(args.run_id), client_id=0, client_num=client_num,
                             args=args)
            _fix_s3_upload(self.s3_storage)
            self.edges = {int(e) for e in self.client_real_ids}
            self.mqtt_mgr.retain_msg = False  # what the server publishes from now on (see the module doc)
            client = self.mqtt_mgr._client
            on_message = client.on_message

            def guarded(mqtt_client: Any, userdata: Any, msg: Any) -> None:
                if msg.retain:  # kept by the broker from before this server subscribed: stale, whatever it says
                    log.info("ignored a retained message on %s (kept by the broker from an earlier connection)",
                             _short(msg.topic))
                    return
                try:
                    on_message(mqtt_client, userdata, msg)
                except Exception as err:  # noqa: BLE001 - nothing a peer sends may end the message loop
                    log.warning("dropped a message on %s: %s: %s", _short(msg.topic), type(err).__name__, err)

            client.on_message = guarded

        @property
        def s3(self) -> Any:
            return self.s3_storage.s3_storage

        # ------------------------------------------------------------ sending
        def send_message(self, msg: Any) -> None:
            """FedML's send, with the graph uploaded here first: privately, under FedML's key
            (``fedml_<run>_<server>_<edge>_<uuid>``), its S3 time remembered for the staleness check."""
            params = msg.get_params()
            path = params.get(Message.MSG_ARG_KEY_MODEL_PARAMS, "")
            if path != "" and params.get(Message.MSG_ARG_KEY_MODEL_PARAMS_URL, "") == "":
                receiver = int(msg.get_receiver_id())
                key = f"{self._topic}{self.server_id}_{receiver}_{uuid.uuid4()}"
                params[Message.MSG_ARG_KEY_MODEL_PARAMS_URL] = _private_upload(self.s3, key, path)
                params[Message.MSG_ARG_KEY_MODEL_PARAMS_KEY] = key
                try:
                    self.sent_at[receiver] = self.s3.aws_s3_client.head_object(
                        Bucket=self.s3.bucket_name, Key=key)["LastModified"]
                except Exception as err:  # noqa: BLE001 - boto3's errors
                    raise OSError(f"S3 key {key} just uploaded cannot be read back: {err}") from err
            super().send_message(msg)

        # ------------------------------------------------------------ receiving
        def _on_message_impl(self, msg: Any) -> None:
            if msg.topic == DEVICE_LAST_WILL_TOPIC:
                return  # the server manager's last-will listener
            edge = self._edge_of(msg.topic)
            if edge is None:
                log.warning("dropped a message on topic %s: not a device topic of this run", _short(msg.topic))
                return
            try:
                body = self._checked_body(edge, msg.payload)
                if body[Message.MSG_ARG_KEY_TYPE] != MSG_MODEL:
                    self._deliver(edge, body)
                    return
                with self.lock:
                    if self._fetch_upload(edge, body):
                        self._deliver(edge, body)
            except Rejected as err:
                log.warning("rejected a message from device %d: %s", edge, err)

        def _edge_of(self, topic: str) -> int | None:
            rest = topic[len(self._topic):] if topic.startswith(self._topic) else ""
            return int(rest) if rest.isdecimal() and len(rest) < 20 and int(rest) in self.edges else None

        def _checked_body(self, edge: int, payload: bytes) -> dict[str, Any]:
            """The fields the server uses, checked; the sender is the topic's device."""
            if len(payload) > MAX_JSON_BYTES:
                raise Rejected(f"a message of {len(payload)} bytes: allowed at most {MAX_JSON_BYTES} (small JSON)")
            try:
                body = json.loads(payload.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as err:
                raise Rejected(f"not a JSON object ({type(err).__name__})") from None
            if not isinstance(body, dict):
                raise Rejected(f"not a JSON object (a {type(body).__name__})")
            kind = _int_field(body, Message.MSG_ARG_KEY_TYPE)
            if kind not in (MSG_MODEL, MSG_STATUS):
                raise Rejected(f"msg_type={_short(body.get(Message.MSG_ARG_KEY_TYPE))} is invalid: a device sends "
                               f"{MSG_MODEL} (model) or {MSG_STATUS} (status)")
            sender = _int_field(body, Message.MSG_ARG_KEY_SENDER)
            if sender is not None and sender != edge:
                raise Rejected(f"sender={sender} differs from the device of topic {self._topic}{edge} (a spoofed sender)")
            receiver = _int_field(body, Message.MSG_ARG_KEY_RECEIVER)
            if receiver is not None and receiver != int(self.server_id):
                raise Rejected(f"receiver={receiver} is not this server ({self.server_id})")
            clean: dict[str, Any] = {Message.MSG_ARG_KEY_TYPE: kind, Message.MSG_ARG_KEY_SENDER: edge,
                                     Message.MSG_ARG_KEY_RECEIVER: int(self.server_id)}
            if kind == MSG_STATUS:
                status = body.get("client_status")
                if not isinstance(status, str) or len(status) > 64:
                    raise Rejected(f"client_status={_short(status)} is invalid: allowed a short string")
                clean["client_status"] = status
                return clean
            clean[Message.MSG_ARG_KEY_MODEL_PARAMS] = body.get(Message.MSG_ARG_KEY_MODEL_PARAMS)
            clean["num_samples"] = body.get("num_samples")
            return clean

        def _fetch_upload(self, edge: int, body: dict[str, Any]) -> bool:
            """Check the upload's key and object, ask the server manager, download the object to a
            file the server names. ``False``: declined by the manager (it logged why)."""
            key = body[Message.MSG_ARG_KEY_MODEL_PARAMS]
            if not isinstance(key, str) or not key.strip():
                raise Rejected(f"model_params={_short(key)} is invalid: allowed the S3 key of the device's upload")
            key = key.strip()
            if len(key) > MAX_KEY_CHARS or not upload_key_pattern(self.args.run_id, self.server_id, edge).fullmatch(key):
                m = _UPLOAD_KEY.fullmatch(key) if len(key) <= MAX_KEY_CHARS else None
                if m and int(m["edge"]) != edge and m["run"] == str(self.args.run_id):
                    raise Rejected(f"S3 key {_short(key)} is device {m['edge']}'s upload, not device {edge}'s")
                raise Rejected(f"S3 key {_short(key)} is invalid: allowed fedml_{self.args.run_id}_{self.server_id}_"
                               f"{edge}-<32 hex digits> (this device's uploads)")
            if key in self.used_keys:
                raise Rejected(f"S3 key {key} was used before (a replayed upload)")
            try:
                head = self.s3.aws_s3_client.head_object(Bucket=self.s3.bucket_name, Key=key)
            except Exception as err:  # noqa: BLE001 - boto3's errors: no such object, no access, no endpoint
                raise Rejected(f"S3 key {key} cannot be read: {type(err).__name__}: {err}") from None
            size = int(head.get("ContentLength", -1))
            if not 0 < size <= self.max_bytes:
                raise Rejected(f"S3 object {key} has {size} bytes: allowed 1 to {self.max_bytes} (max_message_mb)")
            r = self.admit(edge, body["num_samples"], head.get("LastModified"))
            if r is None:
                return False
            self.used_keys.add(key)
            folder = self.args.model_file_cache_folder
            path = os.path.join(folder, f"upload_{edge}_r{r + 1}_{uuid.uuid4().hex}.mnn")
            try:
                self._download(key, path)
            except (OSError, Rejected) as err:
                _discard(path, folder)
                raise Rejected(f"download of S3 key {key} failed: {err}") from None
            body[Message.MSG_ARG_KEY_MODEL_PARAMS] = path
            body[Message.MSG_ARG_KEY_MODEL_PARAMS_KEY] = key
            body[PRISM_ROUND] = r
            return True

        def _download(self, key: str, path: str) -> None:
            """Stream the object into a new file, stopping past ``max_bytes`` (it may have grown since
            ``head_object``)."""
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                try:
                    stream = self.s3.aws_s3_client.get_object(Bucket=self.s3.bucket_name, Key=key)["Body"]
                    total = 0
                    while chunk := stream.read(1 << 20):
                        total += len(chunk)
                        if total > self.max_bytes:
                            raise Rejected(f"the object grew past {self.max_bytes} bytes (max_message_mb)")
                        f.write(chunk)
                except Rejected:
                    raise
                except Exception as err:  # noqa: BLE001 - boto3 / network errors
                    raise OSError(f"{type(err).__name__}: {err}") from None

        def _deliver(self, edge: int, body: dict[str, Any]) -> None:
            try:
                self._notify(body)
            except Exception as err:  # noqa: BLE001 - a handler's failure drops this message only
                log.error("dropped a message from device %d: handling it failed: %s: %s", edge, type(err).__name__, err,
                          exc_info=True)
            finally:
                if body.get(PRISM_ROUND) is not None:
                    _discard(body.get(Message.MSG_ARG_KEY_MODEL_PARAMS), self.args.model_file_cache_folder)

    return PrismMnnCommManager


def _server_manager_class():
    silence_fedml_import_warnings()
    from fedml.cross_device.server_mnn.fedml_server_manager import FedMLServerManager
    from fedml.cross_device.server_mnn.message_define import MyMessage

    from .mnn_export import MnnExporter, read_trained

    comm_manager_class = _comm_manager_class()

    class PrismMNNServerManager(FedMLServerManager):
        """FedML's cross-device server manager, one sub-model graph per device (see the module doc)."""

        def __init__(self, args: Any, server: PrismServer, exporter: MnnExporter, edges: list[int],
                     job: Job, round_timeout_s: float, start_timeout_s: float, max_bytes: int = 256 << 20,
                     parse_limits: ParseLimits | None = None) -> None:
            self.lock = threading.RLock()
            self.max_bytes, self.parse_limits = max_bytes, parse_limits or ParseLimits()
            super().__init__(args, None, None, 0, len(edges), "MQTT_S3_MNN")
            self.server, self.exporter, self.edges, self.job = server, exporter, edges, job
            self.round_timeout_s, self.start_timeout_s = round_timeout_s, start_timeout_s
            self.gone: set[int] = set()
            self.sent: dict[int, tuple[Any, dict]] = {}  # edge → (graph, sub-model's up payload)
            self.received: dict[int, ClientUpdate | None] = {}
            self.finished_edges: set[int] = set()
            self.late: dict[int, int] = {}  # edge → uploads still owed for rounds closed without them
            self.deadline = Deadline()  # the round's, then the finish's: armed by the server's own progress only
            self.start_deadline = Deadline()  # armed once, at the first connection to the broker
            self._announcer: threading.Thread | None = None
            self._listening = False
            self._done = False

        def _init_manager(self) -> None:
            """FedML's ``MQTT_S3_MNN`` transport with PriSM's receive path (see the module doc)."""
            mqtt_config, s3_config = self.get_training_mqtt_s3_config()
            self.com_manager = comm_manager_class(mqtt_config, s3_config, self.args, self.size, self.max_bytes,
                                                  self._admit_upload, self.lock)
            self.com_manager.add_observer(self)

        def receive_message(self, msg_type: Any, msg_params: Any) -> None:
            """FedML's dispatch; a message whose handling fails is logged and dropped."""
            try:
                super().receive_message(msg_type, msg_params)
            except Exception as err:  # noqa: BLE001 - nothing a peer sends may end the message loop
                log.error("dropped a message of type %s: handling it failed: %s: %s", _short(msg_type),
                          type(err).__name__, err, exc_info=True)

        # ---------------------------------------------------------------- start
        def start_train(self) -> None:
            """The run announcement an SDK device needs (runId, server_id, hyper-parameters)."""
            f = self.job.flat
            s = self.job.settings
            parameters = {
                "train_args": {"comm_round": s.comm_round, "batch_size": s.batch_size, "learning_rate": s.learning_rate,
                               "epochs": s.epochs, "client_num_in_total": s.client_num_in_total,
                               "client_num_per_round": s.client_num_per_round},
                "data_args": {"dataset": self.job.dataset, "train_size": int(f.get("train_size", 0) or 0),
                              "test_size": int(f.get("test_size", 0) or 0)},
                "model_args": {"model": self.job.model, "input_shape": list(self.exporter.input_shape)},
                "prism_args": self.job.prism.to_dict(),
            }
            for edge in self.edges:
                if edge in self.gone or self.client_online_mapping.get(str(edge)):
                    continue
                body = {"runId": _run_id_value(self.args.run_id), "server_id": str(self.args.server_id),
                        "edgeids": self.edges, "run_config": {"parameters": parameters}}
                self.send_message_json(f"flserver_agent/{edge}/start_train", json.dumps(body))

        def handle_message_connection_ready(self, msg_params: Any) -> None:
            with self.lock:
                if not self._listening:
                    self._listening = True
                    mgr = self.com_manager.mqtt_mgr
                    mgr.add_message_passthrough_listener(self._on_raw_message)
                    mgr._client.subscribe(DEVICE_LAST_WILL_TOPIC, qos=2)
                if self.is_initialized or self._announcer is not None:
                    return  # a reconnect to the broker: the first round, its announcer and start deadline stand
                self._open_round()
                self._announcer = threading.Thread(target=self._announce, daemon=True, name="prism-announce")
                self._announcer.start()
                self.start_deadline.arm(self._start_deadline, self.start_timeout_s)

        def _announce(self) -> None:
            """Repeat start_train and the status check until every device is online (the server's messages
            are not retained: a device that connects later would miss them)."""
            while True:
                with self.lock:
                    if self.is_initialized or self._done:
                        return
                    self.start_train()
                    for edge, silo in zip(self.client_id_list_in_this_round, self.data_silo_index_list, strict=True):
                        if not self.client_online_mapping.get(str(edge)) and edge not in self.gone:
                            self.send_message_check_client_status(edge, silo)
                threading.Event().wait(1.0)

        def process_online_status(self, client_status: Any, msg_params: Any) -> None:
            with self.lock:
                if self.is_initialized:
                    return
                super().process_online_status(client_status, msg_params)

        def _start_deadline(self) -> None:
            with self.lock:
                if self.is_initialized or self._done:
                    return
                offline = [e for e in self.client_id_list_in_this_round if not self.client_online_mapping.get(str(e))]
                log.warning("devices %s did not come online within %.0f s: starting without them", offline,
                            self.start_timeout_s)
                self.gone.update(offline)
                self.is_initialized = True
                self.send_init_msg()

        # ---------------------------------------------------------------- rounds
        def _open_round(self) -> None:
            silos = self.server.open_round()
            self.data_silo_index_list = silos
            self.client_id_list_in_this_round = [self.edges[s] for s in silos]
            self.sent.clear()
            self.received.clear()

        def send_init_msg(self) -> None:
            self.start_deadline.cancel()
            self._send_round(MyMessage.MSG_TYPE_S2C_INIT_CONFIG)

        def _send_round(self, msg_type: int) -> None:
            """Export and send each selected device its own sub-model graph; arm the round deadline."""
            r = self.server.round_idx
            folder = self.args.model_file_cache_folder
            for edge, silo in zip(self.client_id_list_in_this_round, self.data_silo_index_list, strict=True):
                if edge in self.gone:
                    continue
                sub = self.server.pm.sample_submodel(silo, r)
                path = os.path.join(folder, f"round{r + 1}_client{silo}.mnn")
                graph = self.exporter.export(sub.module, path)
                self.sent[edge] = (graph, sub.to_payload("up"))
                self.server.count_bytes_down(os.path.getsize(path))
                try:
                    if msg_type == MyMessage.MSG_TYPE_S2C_INIT_CONFIG:
                        self.send_message_init_config(edge, path, silo, None, None)
                    else:
                        self.send_message_sync_model_to_client(edge, path, silo, None, None)
                except OSError as err:
                    log.warning("round %d: sending device %d its sub-model failed (%s): left out", r + 1, edge, err)
                    self.received[edge] = None
            log.info("round %d: %d devices got their own sub-model graphs (%d distinct selections)", r + 1,
                     len(self.sent), self.server.pm.distinct_selections())
            self.deadline.arm(lambda: self._round_deadline(r), self.round_timeout_s)
            self._maybe_close()

        def _admit_upload(self, edge: int, num_samples: Any, uploaded_at: Any) -> int | None:
            """Whether device ``edge``'s upload (S3 time ``uploaded_at``) is the one this round waits for,
            before it is downloaded: the round index, or ``None`` (logged why). A device answers its
            messages in order, so after a round closed without its model, its next upload is that
            round's and is dropped."""
            with self.lock:
                r = self.server.round_idx
                if self.late.get(edge):
                    self.late[edge] -= 1
                    log.warning("round %d: dropped a late model from device %d (an earlier round's)", r + 1, edge)
                    return None
                if self._done or edge not in self.sent or edge in self.received:
                    log.warning("round %d: ignored a model from device %d (not expected now)", r + 1, edge)
                    return None
                sent_at = self.com_manager.sent_at.get(edge)
                reason = sample_count_problem(num_samples)
                if sent_at is not None and (uploaded_at is None or uploaded_at < sent_at):
                    reason = (f"its S3 object was written at {uploaded_at}, before this round's model was sent at"
                              f" {sent_at} (an earlier round's upload)")
                if reason is not None:
                    log.warning("round %d: rejected a model from device %d: %s", r + 1, edge, reason)
                    return None
                return r

        def handle_message_receive_model_from_client(self, msg_params: Any) -> None:
            """An admitted upload (:meth:`_admit_upload`), downloaded by the transport: read the graph in
            a child process and check it against what was sent."""
            with self.lock:
                edge = int(msg_params.get(MyMessage.MSG_ARG_KEY_SENDER))
                path = msg_params.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS)
                r = self.server.round_idx
                try:
                    if msg_params.get(PRISM_ROUND) != r or edge not in self.sent or edge in self.received:
                        log.warning("round %d: ignored a model from device %d (not expected now)", r + 1, edge)
                        return
                    graph, up = self.sent[edge]
                    silo = self.data_silo_index_list[self.client_id_list_in_this_round.index(edge)]
                    try:
                        payload = read_trained(path, graph, up, self.parse_limits)
                        num = int(msg_params.get(MyMessage.MSG_ARG_KEY_NUM_SAMPLES))
                        self.received[edge] = ClientUpdate(silo, payload, num, float("nan"))
                    except (OSError, ValueError, RuntimeError, TypeError) as err:
                        log.warning("round %d: rejected the model from device %d: %s", r + 1, edge, err)
                        self.received[edge] = None
                finally:
                    _discard(path, self.args.model_file_cache_folder)
                self._maybe_close()

        def _maybe_close(self) -> None:
            waiting = [e for e in self.sent if e not in self.received and e not in self.gone]
            if not waiting and not self._done:
                self._close_round()

        def _round_deadline(self, r: int) -> None:
            with self.lock:
                if self.server.round_idx != r or self._done:
                    return
                missing = [e for e in self.sent if e not in self.received and e not in self.gone]
                log.warning("round %d: no model from device(s) %s within %.0f s: closing the round without them",
                            r + 1, missing, self.round_timeout_s)
                self._close_round()

        def _close_round(self) -> None:
            for edge in self.sent:
                if edge not in self.received and edge not in self.gone:
                    self.late[edge] = self.late.get(edge, 0) + 1
            updates = [u for u in self.received.values() if u is not None]
            self.server.close_round(updates)
            self._write_global_graph()
            if self.server.finished:
                self._finish_run()
                return
            self._open_round()
            self._send_round(MyMessage.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT)

        def _write_global_graph(self) -> None:
            try:
                self.exporter.export(self.server.pm.dense_model(), self.args.global_model_file_path)
            except (RuntimeError, ValueError, OSError) as err:
                log.warning("global model not written as MNN: %s", err)

        # ---------------------------------------------------------------- devices gone, finishing
        def _on_raw_message(self, msg: Any) -> None:
            if msg.topic != DEVICE_LAST_WILL_TOPIC or msg.retain:
                return  # a retained last will is from an earlier connection
            try:
                edge = int(json.loads(msg.payload.decode()).get("ID"))
            except Exception:  # noqa: BLE001 - any malformed last will is ignored
                return
            with self.lock:
                if edge not in self.edges or edge in self.gone or edge in self.finished_edges:
                    return
                log.warning("device %d disconnected (last will): left out from now on", edge)
                self.gone.add(edge)
                if self._done:
                    self._maybe_finish()
                elif self.is_initialized:
                    self._maybe_close()
                elif all(self.client_online_mapping.get(str(e)) or e in self.gone
                         for e in self.client_id_list_in_this_round):
                    self.is_initialized = True
                    self.send_init_msg()

        def _finish_run(self) -> None:
            self._done = True
            for edge in self.edges:
                if edge not in self.gone:
                    self.send_message_finish(edge, self.edges.index(edge))
            self.deadline.arm(lambda: self._maybe_finish(force=True), self.round_timeout_s)
            self._maybe_finish()

        def process_finished_status(self, client_status: Any, msg_params: Any) -> None:
            with self.lock:
                self.finished_edges.add(int(msg_params.get_sender_id()))
                if self._done:
                    self._maybe_finish()

        def _maybe_finish(self, force: bool = False) -> None:
            with self.lock:
                pending = [e for e in self.edges if e not in self.gone and e not in self.finished_edges]
                if pending and not force:
                    return
                if pending:
                    log.warning("devices %s did not report FINISHED within %.0f s", pending, self.round_timeout_s)
                self.deadline.cancel()
                log.info("cross-device run finished after %d rounds", self.server.round_idx)
                self.finish()

    return PrismMNNServerManager


def _discard(path: Any, folder: str) -> None:
    """Delete a downloaded upload; only a file inside the model cache ``folder`` (after resolving links)."""
    if not isinstance(path, str) or not path:
        return
    real, root = os.path.realpath(path), os.path.realpath(folder)
    if real == root or os.path.commonpath([real, root]) != root:
        log.warning("refused to delete %s: it is outside the model cache %s", _short(path), folder)
        return
    if os.path.isfile(real):
        os.remove(real)


def _run_id_value(run_id: Any) -> Any:
    """The SDK reads ``runId`` with ``optLong``: send a number when the id is one."""
    text = str(run_id)
    return int(text) if text.isdigit() else text


def fedml_args(job: Job, run_id: str) -> Any:
    silence_fedml_import_warnings()
    from fedml.arguments import Arguments

    cmd = argparse.Namespace(yaml_config_file=job.path, rank=0, role="server", run_id=str(run_id), local_rank=0,
                             node_rank=0, run_device_id="0", using_mlops=False)
    args = Arguments(cmd, training_type="cross_device", comm_backend="MQTT_S3_MNN", override_cmd_args=False)
    edges = edge_ids(job)
    out = job.settings.output_dir
    args.client_id_list = json.dumps(edges)
    args.client_num_in_total = args.client_num_per_round = len(edges)
    args.worker_num = len(edges)
    args.rank, args.server_id, args.run_id = 0, 0, str(run_id)
    args.using_mlops = args.enable_tracking = args.enable_wandb = False
    args.federated_optimizer = "FedAvg"
    args.model_file_cache_folder = os.path.join(out, "model_file_cache")
    args.global_model_file_path = os.path.join(out, "global_model.mnn")
    os.makedirs(args.model_file_cache_folder, exist_ok=True)
    return args


def run_server(job: Job, run_id: str) -> int:
    """The PriSM cross-device server, until every device has FINISHED (or the deadlines passed)."""
    from ..fedml_env import init_fedml, security_settings
    from .mnn_export import MnnExporter

    security = security_settings(job, 0)  # max_message_mb; broker and S3 credentials scrubbed from the logs
    limits = ParseLimits.from_flat(job.flat)
    args = init_fedml(job, fedml_args(job, run_id))
    data = load_data(job)
    model = create_model(job.model, init=job.model_init, **job.model_kwargs)
    test = data.fedml_dataset(job.settings.batch_size)[3]
    server = PrismServer(model, job.prism, job.settings, test, "cpu")
    exporter = MnnExporter(input_shape(job), seed=job.prism.seed)
    manager = _server_manager_class()(args, server, exporter, edge_ids(job), job, job.settings.round_timeout_s,
                                      job.settings.start_timeout_s, security.max_bytes, limits)
    log.info("cross-device server: run %s, devices %s, %d rounds, strategy %s keep %.2f", run_id, edge_ids(job),
             job.settings.comm_round, job.prism.strategy, job.prism.keep_ratio)
    manager.run()
    return 0 if server.finished else 1


def run_device(job: Job, edge_id: int) -> int:
    """A reference device (:mod:`fedml_prism.runtimes.cross_device.device`) serving edge ``edge_id`` of this job."""
    from .device import ReferenceDevice

    if edge_id not in edge_ids(job):
        raise ValueError(f"edge id {edge_id} is invalid: allowed {edge_ids(job)} (client_id_list)")
    torch.set_num_threads(int(job.flat.get("torch_threads", 1)))
    data = load_data(job)

    def partition(idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        ds = data.client_dataset(idx)
        return ds.tensors[0], ds.tensors[1]

    cache = os.path.join(job.settings.output_dir, f"device{edge_id}")
    idle = float(job.flat.get("client_idle_timeout_s", 2 * job.settings.round_timeout_s + 60))
    device = ReferenceDevice(edge_id, job.flat["customized_training_mqtt_config"], job.flat["customized_training_s3_config"],
                             partition, data.num_classes, cache, idle_timeout_s=idle, seed=job.prism.seed)
    return device.run()
