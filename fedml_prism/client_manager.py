"""FedML's cross-silo client manager with the fix for the lost FINISHED message on MQTT_S3.

FedML 0.9.6's client publishes its FINISHED status asynchronously (QoS 2) and disconnects at once
(``cross_silo/client/fedml_client_master_manager.py:151-155`` then
``core/distributed/communication/mqtt/mqtt_manager.py:98-113``), so the broker often never gets it and
the server waits forever. ``PrismClientManager`` sends that one message with a blocking single
publish (paho's ``publish.single``, QoS 2) before disconnecting.
"""

from __future__ import annotations

import json
import logging
import platform
from typing import Any

from paho.mqtt import publish

from ._fedml_import import silence_fedml_import_warnings

silence_fedml_import_warnings()
from fedml.core.distributed.communication.message import Message  # noqa: E402  (after the warnings filter)
from fedml.cross_silo.client.fedml_client_master_manager import ClientMasterManager  # noqa: E402
from fedml.cross_silo.client.message_define import MyMessage  # noqa: E402

log = logging.getLogger("fedml_prism")


class PrismClientManager(ClientMasterManager):
    def send_client_status(self, receive_id: Any, status: str = ClientMasterManager.ONLINE_STATUS_FLAG) -> None:
        if status != ClientMasterManager.RUN_FINISHED_STATUS_FLAG or self.backend != "MQTT_S3":
            super().send_client_status(receive_id, status)
            return
        message = Message(MyMessage.MSG_TYPE_C2S_CLIENT_STATUS, self.client_real_id, receive_id)
        message.add_params(MyMessage.MSG_ARG_KEY_CLIENT_STATUS, status)
        message.add_params(MyMessage.MSG_ARG_KEY_CLIENT_OS, "Mac" if platform.system() == "Darwin" else platform.system())
        comm = self.com_manager
        topic = comm._topic + str(message.get_sender_id())  # the topic FedML's MQTT_S3 client publishes on
        # FedML's own publish_single_message passes auth={'username': None} without credentials, which
        # paho rejects (mqtt_manager.py:108): publish directly, with auth only when a user is set.
        auth = {"username": comm.mqtt_user, "password": comm.mqtt_pwd} if comm.mqtt_user else None
        publish.single(topic, payload=json.dumps(message.get_params()), qos=2, hostname=comm.broker_host,
                       port=int(comm.broker_port), auth=auth, client_id=f"fedml_prism_finished_{self.client_real_id}")
        log.info("worker %s: FINISHED delivered with a blocking publish", self.client_real_id)


def run_client(args: Any, device: Any, dataset: list, model: Any, trainer: Any) -> None:
    """FedML's ``cross_silo/client/client_initializer.py:init_client`` (horizontal scenario) with
    ``PrismClientManager`` in place of ``ClientMasterManager``."""
    from fedml.cross_silo.client.fedml_trainer_dist_adapter import TrainerDistAdapter

    adapter = TrainerDistAdapter(args, device, args.rank, model, dataset[0], dataset[4], dataset[5], dataset[6], trainer)
    PrismClientManager(args, adapter, args.comm, args.rank, args.worker_num, args.backend).run()
