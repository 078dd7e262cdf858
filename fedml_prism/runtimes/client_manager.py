"""FedML's cross-silo client manager with PriSM's transports and the fix for the lost FINISHED message on MQTT_S3.

FedML 0.9.6's client publishes its FINISHED status asynchronously (QoS 2) and disconnects at once
(``cross_silo/client/fedml_client_master_manager.py:151-155`` then
``core/distributed/communication/mqtt/mqtt_manager.py:98-113``), so the broker often never gets it and
the server waits forever. ``PrismClientManager`` sends that one message as a frame on a connection of
its own and waits until the broker has it (QoS 2 complete) before disconnecting
(``PrismMqttS3CommManager.send_message_blocking``: same credentials, TLS and authentication as every
other message).
"""

from __future__ import annotations

import logging
import platform
from typing import Any

from ._fedml_import import silence_fedml_import_warnings

silence_fedml_import_warnings()
from fedml.core.distributed.communication.message import Message  # noqa: E402  (after the warnings filter)
from fedml.cross_silo.client.fedml_client_master_manager import ClientMasterManager  # noqa: E402
from fedml.cross_silo.client.message_define import MyMessage  # noqa: E402

log = logging.getLogger("fedml_prism")


class PrismClientManager(ClientMasterManager):
    def _init_manager(self) -> None:
        from .transport import SAFE_BACKENDS, make_comm_manager

        if self.backend not in SAFE_BACKENDS:
            super()._init_manager()
            return
        self.com_manager = make_comm_manager(self.args, self.rank, self.size, self.backend)
        self.com_manager.add_observer(self)

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
