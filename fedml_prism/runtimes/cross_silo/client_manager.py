"""FedML's cross-silo client manager with PriSM's transports and the fix for the lost FINISHED message on MQTT_S3.

FedML 0.9.6's client publishes its FINISHED status asynchronously (QoS 2) and disconnects at once
(``cross_silo/client/fedml_client_master_manager.py:151-155`` then
``core/distributed/communication/mqtt/mqtt_manager.py:98-113``), so the broker often never gets it and
the server waits forever. ``PrismClientManager`` sends that one message as a frame on a connection of
its own and waits until the broker has it (QoS 2 complete) before disconnecting
(``PrismMqttS3CommManager.send_message_blocking``: same credentials, TLS and authentication as every
other message).

It also keeps a worker alive whatever arrives and whatever fails: a message whose handler fails (or that
has no handler, or is FedML's init/sync-model message without model parameters or client index) is
logged and dropped, never raised out of the receive loop (a failed init leaves the worker waiting for a
good one); a send that fails is retried ``SEND_ATTEMPTS`` times in all, ``SEND_BACKOFF_S`` apart and
doubling, then dropped with a log line (the server's round deadline covers a lost upload). Peer-chosen
values reach the log only as ``repr``, so they cannot forge log lines.
"""

from __future__ import annotations

import logging
import platform
import time
from typing import Any

from .._fedml_import import silence_fedml_import_warnings

silence_fedml_import_warnings()
from fedml.core.distributed.communication.message import Message  # noqa: E402  (after the warnings filter)
from fedml.cross_silo.client.fedml_client_master_manager import ClientMasterManager  # noqa: E402
from fedml.cross_silo.client.message_define import MyMessage  # noqa: E402

log = logging.getLogger("fedml_prism")

#: a failed send is tried this many times in all, waiting SEND_BACKOFF_S, then twice that, ... in between
SEND_ATTEMPTS = 4
SEND_BACKOFF_S = 0.5
#: FedML's messages that carry a model bundle and the worker's data-silo index
_MODEL_MESSAGES = (MyMessage.MSG_TYPE_S2C_INIT_CONFIG, MyMessage.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT)


def _describe(err: BaseException) -> str:
    """One log-safe line for ``err`` (a gRPC error by its status code and details)."""
    code, details = getattr(err, "code", None), getattr(err, "details", None)
    if callable(code) and callable(details):
        return f"{getattr(code(), 'name', code())}: {details()!r}"
    return f"{type(err).__name__}({str(err)!r})"


def _missing_fields(msg_type: Any, msg: Any) -> str | None:
    """What FedML's handler of ``msg_type`` needs and ``msg`` lacks (``None``: nothing)."""
    if msg_type not in _MODEL_MESSAGES:
        return None
    if msg.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS) is None:
        return f"without {MyMessage.MSG_ARG_KEY_MODEL_PARAMS}"
    try:
        int(msg.get(MyMessage.MSG_ARG_KEY_CLIENT_INDEX))
    except (TypeError, ValueError):
        return "without a client index"
    return None


class PrismClientManager(ClientMasterManager):
    def _init_manager(self) -> None:
        from .transport import SAFE_BACKENDS, make_comm_manager

        if self.backend not in SAFE_BACKENDS:
            super()._init_manager()
            return
        self.com_manager = make_comm_manager(self.args, self.rank, self.size, self.backend)
        self.com_manager.add_observer(self)

    def receive_message(self, msg_type: Any, msg_params: Any) -> None:
        """FedML's dispatch, but a message that cannot be handled is logged and dropped, never raised."""
        what = f"message type {msg_type!r} from {msg_params.get_sender_id()!r}"
        handler = self.message_handler_dict.get(msg_type)
        if handler is None:
            log.warning("worker %s: dropped %s: no handler (allowed types %s)", self.rank, what,
                        sorted(self.message_handler_dict))
            return
        if (problem := _missing_fields(msg_type, msg_params)) is not None:
            log.warning("worker %s: dropped %s %s", self.rank, what, problem)
            return
        was_inited = self.is_inited
        try:
            handler(msg_params)
        except Exception as err:  # noqa: BLE001 - nothing that arrives may end the worker's loop
            if msg_type == MyMessage.MSG_TYPE_S2C_INIT_CONFIG:
                self.is_inited = was_inited  # a failed init does not count: the next good one trains
            log.warning("worker %s: dropped %s: its handler failed: %s", self.rank, what, _describe(err))
            log.debug("worker %s: the failure in full", self.rank, exc_info=True)

    def send_message(self, message: Any) -> None:
        """Send ``message``; a failure is retried with a growing pause, then the message is dropped (logged)."""
        from ..wire import WireError

        what = f"message type {message.get_type()!r} to {message.get_receiver_id()!r}"
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                self.com_manager.send_message(message)
                return
            except WireError as err:  # this worker's own message cannot be encoded: sending again cannot help
                log.error("worker %s: dropped %s: %s", self.rank, what, _describe(err))
                return
            except Exception as err:  # noqa: BLE001 - a failed send must not end the worker's loop
                if attempt == SEND_ATTEMPTS:
                    log.warning("worker %s: dropped %s after %d failed sends (last: %s); the server's round "
                                "deadline covers it", self.rank, what, attempt, _describe(err))
                    return
                pause = SEND_BACKOFF_S * 2 ** (attempt - 1)
                log.warning("worker %s: sending %s failed (%s), retrying in %.1f s", self.rank, what,
                            _describe(err), pause)
                time.sleep(pause)

    def send_client_status(self, receive_id: Any, status: str = ClientMasterManager.ONLINE_STATUS_FLAG) -> None:
        if status != ClientMasterManager.RUN_FINISHED_STATUS_FLAG or self.backend != "MQTT_S3":
            super().send_client_status(receive_id, status)
            return
        message = Message(MyMessage.MSG_TYPE_C2S_CLIENT_STATUS, self.client_real_id, receive_id)
        message.add_params(MyMessage.MSG_ARG_KEY_CLIENT_STATUS, status)
        message.add_params(MyMessage.MSG_ARG_KEY_CLIENT_OS, "Mac" if platform.system() == "Darwin" else platform.system())
        try:
            self.com_manager.send_message_blocking(message)
        except Exception as err:  # noqa: BLE001 - the server's finish deadline covers a lost FINISHED
            log.warning("worker %s: FINISHED not delivered (%s: %s); the server's deadline ends the run",
                        self.client_real_id, type(err).__name__, err)
            return
        log.info("worker %s: FINISHED delivered with a blocking publish", self.client_real_id)


def run_client(args: Any, device: Any, dataset: list, model: Any, trainer: Any) -> None:
    """FedML's ``cross_silo/client/client_initializer.py:init_client`` (horizontal scenario) with
    ``PrismClientManager`` in place of ``ClientMasterManager``."""
    from fedml.cross_silo.client.fedml_trainer_dist_adapter import TrainerDistAdapter

    adapter = TrainerDistAdapter(args, device, args.rank, model, dataset[0], dataset[4], dataset[5], dataset[6], trainer)
    PrismClientManager(args, adapter, args.comm, args.rank, args.worker_num, args.backend).run()
