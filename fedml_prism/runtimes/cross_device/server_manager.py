"""The cross-device server: FedML's cross-device ``FedMLServerManager`` with one sub-model graph per
device, a start message devices can use, deadlines, and checks on every upload (see
:mod:`fedml_prism.runtimes.cross_device`).

Imports FedML when imported (it subclasses FedML's ``FedMLServerManager``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

from ...engine.principal import ClientUpdate
from ...engine.server import Deadline, PrismServer
from ...job import Job
from .._fedml_import import silence_fedml_import_warnings
from .comm_manager import PrismMnnCommManager
from .mnn_export import MnnExporter, read_trained
from .mnn_sandbox import ParseLimits
from .protocol import DEVICE_LAST_WILL_TOPIC, PRISM_ROUND, _discard, _short, sample_count_problem

silence_fedml_import_warnings()
from fedml.cross_device.server_mnn.fedml_server_manager import FedMLServerManager  # noqa: E402  (after the filter)
from fedml.cross_device.server_mnn.message_define import MyMessage  # noqa: E402

log = logging.getLogger("fedml_prism")


def _run_id_value(run_id: Any) -> Any:
    """The SDK reads ``runId`` with ``optLong``: send a number when the id is one."""
    text = str(run_id)
    return int(text) if text.isdigit() else text


class PrismMNNServerManager(FedMLServerManager):
    """FedML's cross-device server manager, one sub-model graph per device (see :mod:`fedml_prism.runtimes.cross_device`)."""

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
        """FedML's ``MQTT_S3_MNN`` transport with PriSM's receive path (see :mod:`fedml_prism.runtimes.cross_device`)."""
        mqtt_config, s3_config = self.get_training_mqtt_s3_config()
        self.com_manager = PrismMnnCommManager(mqtt_config, s3_config, self.args, self.size, self.max_bytes,
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
        s = self.job.settings
        parameters = {
            "train_args": {"comm_round": s.comm_round, "batch_size": s.batch_size, "learning_rate": s.learning_rate,
                           "epochs": s.epochs, "client_num_in_total": s.client_num_in_total,
                           "client_num_per_round": s.client_num_per_round},
            "data_args": {"dataset": self.job.dataset, "train_size": self.job.train_size,
                          "test_size": self.job.test_size},
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
