"""A failed send or a bad frame never kills a worker (issue 18, items 2 and 4): ``PrismClientManager`` over a
real gRPC transport, in one process, driven by a stand-in server (a ``PrismGrpcCommManager`` of rank 0)."""

from __future__ import annotations

import argparse
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from runtime_utils import free_ports, wait_for

from fedml_prism.runtimes._fedml_import import silence_fedml_import_warnings
from fedml_prism.runtimes.cross_silo import client_manager
from fedml_prism.runtimes.cross_silo.client_manager import PrismClientManager
from fedml_prism.runtimes.cross_silo.grpc_transport import PrismGrpcCommManager
from fedml_prism.runtimes.security import SecuritySettings
from fedml_prism.runtimes.wire import FrameCodec
from fedml_prism.settings.grpc import read_ipconfig

silence_fedml_import_warnings()
from fedml.core import mlops  # noqa: E402
from fedml.core.distributed.communication.message import Message  # noqa: E402

pytestmark = pytest.mark.timeout(120)


class Adapter:
    """FedML's trainer adapter as the client manager uses it; ``fail`` makes training raise."""

    def __init__(self) -> None:
        self.trained: list[int] = []
        self.fail: str | None = None

    def update_dataset(self, index: int) -> None:
        self.index = index

    def update_model(self, params: Any) -> None:  # as PrismClientTrainer.set_model_params checks it
        if not isinstance(params, dict):
            raise TypeError(f"PriSM expects a bundle of tensors from the server, got {type(params).__name__}")
        self.params = params

    def train(self, round_idx: int) -> tuple[Any, int]:
        if self.fail:
            raise RuntimeError(self.fail)
        self.trained.append(round_idx)
        return OrderedDict(w=torch.ones(2) * round_idx), 3


class Server:
    """A stand-in server: rank 0's transport; what reaches it is recorded."""

    def __init__(self, args: argparse.Namespace) -> None:
        security = SecuritySettings()
        self.manager = PrismGrpcCommManager(args, 0, 1, FrameCodec("t", 0, {1}, security.keyring(0), security.max_bytes),
                                            security)
        self.got: list[tuple[Any, Any]] = []
        self.manager.add_observer(self)
        threading.Thread(target=self.manager.handle_receive_message, daemon=True).start()

    def receive_message(self, msg_type: Any, msg: Any) -> None:
        if msg_type != 0:
            self.got.append((msg_type, msg.get("client_status") or msg.get("num_samples")))

    def send(self, msg_type: int, **params: Any) -> None:
        msg = Message(msg_type, 0, 1)
        for key, value in params.items():
            msg.add_params(key, value)
        self.manager.send_message(msg)


@pytest.fixture
def job(tmp_path: Path, monkeypatch, caplog) -> Any:
    monkeypatch.setattr(client_manager, "SEND_BACKOFF_S", 0.05, raising=False)
    ports = free_ports(2)
    (tmp_path / "ip.csv").write_text("eid,rank,grpc_server_ip,grpc_server_port\n"
                                     + "".join(f"{r},{r},127.0.0.1,{p}\n" for r, p in enumerate(ports)))
    args = argparse.Namespace(prism_grpc_addresses=read_ipconfig(str(tmp_path / "ip.csv")), run_id="t", client_id_list="[1]",
                              comm_round=2, scenario="horizontal", using_mlops=False)
    monkeypatch.setattr(mlops.MLOpsStore, "mlops_args", args)  # FedML's MLOps off (using_mlops false)
    server = Server(args)
    adapter = Adapter()
    worker = PrismClientManager(args, adapter, None, 1, 1, "GRPC")
    failures: list[BaseException] = []

    def loop() -> None:
        try:
            worker.run()
        except BaseException as err:  # noqa: BLE001 - what killed the worker's loop, for the assertions
            failures.append(err)

    caplog.set_level(logging.INFO, logger="fedml_prism")
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    wait_for(lambda: server.got == [(5, "ONLINE")], timeout=10, what="the worker's ONLINE status")
    yield server, worker, adapter, thread, failures
    for manager in (worker.com_manager, server.manager):
        manager.stop_receive_message()


def alive(thread: threading.Thread, failures: list[BaseException]) -> bool:
    return thread.is_alive() and not failures


def logged(caplog, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


def settled(caplog, failures: list[BaseException], text: str) -> None:
    """Wait until ``text`` is logged or the worker's loop has died."""
    wait_for(lambda: failures or logged(caplog, text), timeout=30, what=f"the log line {text!r}")


def test_a_bad_frame_or_a_failing_handler_is_logged_and_dropped(job, caplog) -> None:
    server, worker, adapter, thread, failures = job
    params = OrderedDict(w=torch.zeros(2))
    sends = {  # what the server sends, and what the worker logs when it drops it
        "message type 2 from 0 without model_params": dict(msg_type=2, client_idx="0"),  # FedML's sync-model message
        "message type 1 from 0 without model_params": dict(msg_type=1, client_idx="0"),  # ... and its init message
        "message type 1 from 0 without a client index": dict(msg_type=1, model_params=params),
        "message type 99 from 0: no handler": dict(msg_type=99),
    }
    for text, message in sends.items():
        server.send(**message)
        settled(caplog, failures, text)
        assert alive(thread, failures), failures
    adapter.fail = "boom\n[fedml_prism] a forged log line"
    server.send(1, model_params=params, client_idx="0")  # training raises
    text = "message type 1 from 0: its handler failed: RuntimeError('boom\\n[fedml_prism] a forged log line')"
    settled(caplog, failures, text)
    assert alive(thread, failures), failures
    assert not any(r.getMessage().startswith("[fedml_prism] a forged") for r in caplog.records)
    assert not worker.is_inited  # a failed init leaves the worker waiting for a good one
    adapter.fail = None
    server.send(1, model_params=params, client_idx="0")  # the real init still trains
    wait_for(lambda: failures or (3, 3) in server.got, timeout=10, what="the worker's upload")
    assert adapter.trained == [0] and alive(thread, failures), failures


def test_a_failed_send_is_retried_then_dropped_and_the_worker_lives_on(job, caplog) -> None:
    server, worker, adapter, thread, failures = job
    server.manager.stop_receive_message()  # the server's listener is gone: every send to it fails
    server.send(1, model_params=OrderedDict(w=torch.zeros(2)), client_idx="0")
    settled(caplog, failures, "failed sends")
    assert alive(thread, failures), failures
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == client_manager.SEND_ATTEMPTS - 1, retries
    assert all("sending message type 3 to 0 failed (UNAVAILABLE" in r for r in retries), retries
    assert logged(caplog, f"dropped message type 3 to 0 after {client_manager.SEND_ATTEMPTS} failed sends")
    assert adapter.trained == [0]
