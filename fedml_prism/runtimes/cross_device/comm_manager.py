"""The cross-device server's transport: FedML's ``MQTT_S3_MNN`` communication manager with a receive
path that trusts no message body and private, checked uploads (see :mod:`fedml_prism.runtimes.cross_device`).

Imports FedML when imported (it subclasses FedML's ``MqttS3MNNCommManager``).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Any

from .._fedml_import import silence_fedml_import_warnings
from .protocol import (
    _UPLOAD_KEY,
    DEVICE_LAST_WILL_TOPIC,
    MAX_JSON_BYTES,
    MAX_KEY_CHARS,
    MSG_MODEL,
    MSG_STATUS,
    PRISM_ROUND,
    Rejected,
    _discard,
    _int_field,
    _short,
    upload_key_pattern,
)

silence_fedml_import_warnings()
from fedml.core.distributed.communication.message import Message  # noqa: E402  (after the warnings filter)
from fedml.core.distributed.communication.mqtt_s3_mnn.mqtt_s3_comm_manager import MqttS3MNNCommManager  # noqa: E402

log = logging.getLogger("fedml_prism")

URL_EXPIRY_S = 3600  # the presigned GET URL sent with each graph (devices use the key and their credentials)


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


class PrismMnnCommManager(MqttS3MNNCommManager):
    """FedML's ``MQTT_S3_MNN`` server transport with a receive path that trusts no message body
    (see :mod:`fedml_prism.runtimes.cross_device`) and private uploads. ``admit(edge, num_samples, uploaded_at)`` is the
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
        self.mqtt_mgr.retain_msg = False  # what the server publishes from now on (see :mod:`fedml_prism.runtimes.cross_device`)
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
