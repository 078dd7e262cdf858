"""PriSM over FedML cross-device (Beehive): ``training_type: cross_device``, ``backend: MQTT_S3_MNN``.

The server is FedML 0.9.6's cross-device ``FedMLServerManager`` (``cross_device/server_mnn``) on its
``MQTT_S3_MNN`` transport and message protocol, extended where PriSM needs more:

- **one graph per device.** FedML uploads one global ``.mnn`` file and sends every device the same
  S3 key (``send_init_msg`` reuses the first URL/key). Here each selected device's sub-model is
  exported as its own MNN graph (:class:`~fedml_prism.mnn_export.MnnExporter`) and uploaded under
  its own key; the server remembers which principal components each device got and the graph's
  parameter map, and maps the trained graph back onto the sub-model's payload for Eq. 3;
- **a start message devices can use.** FedML's local ``start_train`` sends a fixed ``runId`` of 189
  and no ``server_id``, so an SDK device would listen on another topic
  (``fedml_server_manager.py:58-155``); here it carries the run's id, the server id and the job's
  ``train_args`` / ``data_args``, and is repeated (with the status check) until the devices are online;
- **no hang on a lost device.** The SDK's last will (``flclient_agent/last_will_msg``, which FedML's
  server does not subscribe to) marks a device gone at once; a round deadline, a start deadline and a
  finish deadline cover devices that go silent without one;
- **evaluation on the rebuilt dense model** in PyTorch (:class:`~fedml_prism.server.PrismServer`),
  plus the global model written as an MNN graph to ``global_model_file_path`` every round.

FedML defects worked around here (FedML's files are not edited):

- ``core/distributed/communication/s3/remote_storage.py:404``: ``upload_file`` passes
  ``ExtraArgs={"Metadata": None}``, boto3 rejects it, the error is logged and ``None`` is returned as
  the URL, so the device is told of a file that was never uploaded. Uploads here pass ``{}`` and
  fail loudly (:func:`_fix_s3_upload`).
- ``cross_device/server_mnn/utils.py:18``: ``load_module(..., False)`` exposes no parameters under
  MNN 3.x; graphs are read with ``for_training=True`` (:func:`fedml_prism.mnn_export.load_module`).
- ``cross_device/server_mnn/fedml_aggregator.py:255``: ``loss.read()`` fails in MNN evaluation; the
  server evaluates the dense PyTorch model instead, and :func:`fedml_prism.mnn_export.evaluate_graph`
  computes the loss from the probabilities.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
from typing import Any

import torch

from ._fedml_import import silence_fedml_import_warnings
from .models import create_model
from .principal import ClientUpdate
from .runner import Job, load_data
from .server import Deadline, PrismServer

log = logging.getLogger("fedml_prism")

DEVICE_LAST_WILL_TOPIC = "flclient_agent/last_will_msg"  # the Android SDK's (EdgeCommunicator.java)


def edge_ids(job: Job) -> list[int]:
    """The devices' edge ids: ``client_id_list`` (a list or FedML's JSON string) or 1..client_num_in_total."""
    raw = job.flat.get("client_id_list")
    if raw in (None, "", "[]"):
        return list(range(1, job.settings.client_num_in_total + 1))
    ids = json.loads(raw) if isinstance(raw, str) else list(raw)
    return [int(i) for i in ids]


def validate(job: Job) -> None:
    """Cross-device specific checks, before any work starts."""
    ids = edge_ids(job)
    n = job.settings.client_num_in_total
    if len(ids) != n or len(set(ids)) != n:
        raise ValueError(f"client_id_list={ids} is invalid: allowed {n} distinct edge ids (client_num_in_total={n}),"
                         " one per device; device i trains data partition i")
    for key in ("customized_training_mqtt_config", "customized_training_s3_config"):
        if not isinstance(job.flat.get(key), dict):
            raise ValueError(f"{key} is missing: cross_device needs the broker and S3 settings in comm_args")
    if job.prism.optimizer_state != "reset":
        raise ValueError(f"optimizer_state={job.prism.optimizer_state!r} is invalid for cross_device: allowed reset"
                         " (MNN devices train with their own optimizer and return no momentum buffers)")
    if len(input_shape(job)) != 3:
        raise ValueError(f"input_shape={input_shape(job)} is invalid: cross_device exports image models [C, H, W]")


def input_shape(job: Job) -> tuple[int, ...]:
    shape = job.flat.get("input_shape")
    if shape is None:
        kw = job.model_kwargs
        size = kw.get("image_size", 32)
        shape = (kw.get("in_channels", 1 if job.model == "cnn" else 3), size, size)
    return tuple(int(d) for d in shape)


def _fix_s3_upload(storage: Any) -> None:
    """FedML ``s3/remote_storage.py:404`` passes ``Metadata=None`` (boto3 rejects it, silently): upload
    with ``{}`` and raise if the upload fails, instead of sending a key for a file that is not there."""
    inner = storage.s3_storage

    def upload_model_file(message_key: str, model_file_path: str) -> str:
        url = inner.upload_file(model_file_path, message_key, metadata={})
        if url is None:
            raise OSError(f"upload of {model_file_path} to S3 key {message_key} failed (see the log)")
        return url

    storage.upload_model_file = upload_model_file


def _server_manager_class():
    silence_fedml_import_warnings()
    from fedml.cross_device.server_mnn.fedml_server_manager import FedMLServerManager
    from fedml.cross_device.server_mnn.message_define import MyMessage

    from .mnn_export import MnnExporter, read_trained

    class PrismMNNServerManager(FedMLServerManager):
        """FedML's cross-device server manager, one sub-model graph per device (see the module doc)."""

        def __init__(self, args: Any, server: PrismServer, exporter: MnnExporter, edges: list[int],
                     job: Job, round_timeout_s: float, start_timeout_s: float) -> None:
            super().__init__(args, None, None, 0, len(edges), "MQTT_S3_MNN")
            _fix_s3_upload(self.com_manager.s3_storage)
            self.server, self.exporter, self.edges, self.job = server, exporter, edges, job
            self.round_timeout_s, self.start_timeout_s = round_timeout_s, start_timeout_s
            self.lock = threading.RLock()
            self.gone: set[int] = set()
            self.sent: dict[int, tuple[Any, dict]] = {}  # edge → (graph, sub-model's up payload)
            self.received: dict[int, ClientUpdate | None] = {}
            self.finished_edges: set[int] = set()
            self.late: dict[int, int] = {}  # edge → uploads still owed for rounds closed without them
            self.deadline = Deadline()
            self._announcer: threading.Thread | None = None
            self._listening = False
            self._done = False

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
                    # FedML's comm manager parses every message as a FedML message: keep last wills from it
                    mgr._passthrough_listeners[:] = [_skip_last_wills(f) for f in mgr._passthrough_listeners]
                    mgr.add_message_passthrough_listener(self._on_raw_message)
                    mgr._client.subscribe(DEVICE_LAST_WILL_TOPIC, qos=2)
                if self.is_initialized:
                    return
                self._open_round()
                self._announcer = threading.Thread(target=self._announce, daemon=True, name="prism-announce")
                self._announcer.start()
                self.deadline.arm(self._start_deadline, self.start_timeout_s)

        def _announce(self) -> None:
            """Repeat start_train and the status check until every device is online (messages are not
            retained: a device that connects later would miss them)."""
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

        def handle_message_receive_model_from_client(self, msg_params: Any) -> None:
            with self.lock:
                edge = int(msg_params.get(MyMessage.MSG_ARG_KEY_SENDER))
                path = msg_params.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS)
                num = msg_params.get(MyMessage.MSG_ARG_KEY_NUM_SAMPLES)
                r = self.server.round_idx
                if self.late.get(edge):
                    # a device answers its messages in order: this upload is for a round already closed
                    self.late[edge] -= 1
                    log.warning("round %d: dropped a late model from device %d (an earlier round's)", r + 1, edge)
                    _discard(path)
                    return
                if edge not in self.sent or edge in self.received:
                    log.warning("round %d: ignored a model from device %d (not expected now)", r + 1, edge)
                    return
                graph, up = self.sent[edge]
                silo = self.data_silo_index_list[self.client_id_list_in_this_round.index(edge)]
                try:
                    payload = read_trained(path, graph, up)
                    self.received[edge] = ClientUpdate(silo, payload, int(num), float("nan"))
                except (OSError, ValueError, RuntimeError, TypeError) as err:
                    log.warning("round %d: unreadable model from device %d: %s", r + 1, edge, err)
                    self.received[edge] = None
                finally:
                    _discard(path)
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
            except (ValueError, TypeError, AttributeError):
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


def _discard(path: Any) -> None:
    if isinstance(path, str) and os.path.exists(path):
        os.remove(path)


def _skip_last_wills(listener: Any) -> Any:
    def listen(msg: Any) -> None:
        if msg.topic != DEVICE_LAST_WILL_TOPIC:
            listener(msg)

    return listen


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
    from .cross_silo import init_fedml
    from .mnn_export import MnnExporter

    args = init_fedml(job, fedml_args(job, run_id))
    data = load_data(job)
    model = create_model(job.model, init=job.model_init, **job.model_kwargs)
    test = data.fedml_dataset(job.settings.batch_size)[3]
    server = PrismServer(model, job.prism, job.settings, test, "cpu")
    exporter = MnnExporter(input_shape(job), seed=job.prism.seed)
    manager = _server_manager_class()(args, server, exporter, edge_ids(job), job, job.settings.round_timeout_s,
                                      job.settings.start_timeout_s)
    log.info("cross-device server: run %s, devices %s, %d rounds, strategy %s keep %.2f", run_id, edge_ids(job),
             job.settings.comm_round, job.prism.strategy, job.prism.keep_ratio)
    manager.run()
    return 0 if server.finished else 1


def run_device(job: Job, edge_id: int) -> int:
    """A reference device (:mod:`fedml_prism.device`) serving edge ``edge_id`` of this job."""
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
