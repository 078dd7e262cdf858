"""Control frames from a compromised worker never stall a real gRPC cross-silo job (issue 18, item 1).

The job: a server, two honest workers and rank 3, a rogue process (this file run as a script) that holds rank
3's own key and speaks through the project's own gRPC transport, so every frame it sends is well formed and
signed. It comes online like a worker, and each time the server sends it something (its bundle of round 1,
of round 2, and the message after the last round) it answers with every control message but an upload:
FedML's local-only CONNECTION_IS_READY (type 0, which re-armed the server's one deadline with the start
deadline and so cancelled the round's and, after the last round, the finish deadline), ONLINE and FINISHED
statuses (no FINISHED after the last round: that would let the run end), a status holding a newline (a
forged log line), the server's own message types, FedML's unused stats and finished types and an unknown
one. Then it goes silent. The honest workers' rounds must close by
``round_timeout_s`` and the run end by its finish deadline, with the honest workers' training in every round.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
from runtime_utils import BIN, grpc_config, helpers_env, metrics, run, start, start_grpc, stop

pytestmark = pytest.mark.timeout(240)

RANK = 3
ROUND_TIMEOUT_S = 8
FORGED = "FINISHED\n2026-01-01 00:00:00 INFO forged line"
#: (name, FedML message type, client status or None)
ATTACKS = [("connection_ready", 0, None), ("online", 5, "ONLINE"), ("finished", 5, "FINISHED"),
           ("forged_status", 5, FORGED), ("init_config", 1, None), ("sync_model", 2, None),
           ("check_status", 6, None), ("finish", 7, None), ("stats", 4, None), ("c2s_finished", 8, None),
           ("unknown", 99, None)]


def test_control_frames_from_a_rogue_never_stall_the_rounds_or_the_finish(tmp_path) -> None:
    run([str(BIN / "fedml-prism"), "keys", "--out", str(tmp_path / "keys"), "--workers", "3"], tmp_path, "keys.log",
        timeout=60)
    cfg = grpc_config(
        tmp_path, workers=3,
        train_args={"client_num_in_total": 6, "client_num_per_round": 6, "comm_round": 2},
        tracking_args={"round_timeout_s": ROUND_TIMEOUT_S},
        security_args={"auth_key_file": "keys/party{rank}.key", "require_auth": True},
    )
    out = tmp_path / "out"
    server, honest = start_grpc(cfg, out, tmp_path, workers=2)
    rogue = start([sys.executable, __file__, "rogue", str(cfg)], tmp_path, "rogue.log", extra_env=helpers_env())
    try:
        # 2 rounds closed by their deadline plus the finish deadline, with room for a slow machine; the old
        # server never finished (its round deadline was cancelled by the rogue's type-0 frame)
        assert server.wait(timeout=150) == 0, (tmp_path / "server.log").read_text()[-4000:]
        ended = time.time()
        for w in honest:
            assert w.wait(timeout=30) == 0
    finally:
        for p in [server, *honest, rogue]:
            stop(p)
    rogue_log = (tmp_path / "rogue.log").read_text()
    bursts = [line for line in rogue_log.splitlines() if "rogue: burst" in line]
    assert len(bursts) == 3, rogue_log[-3000:]  # after round 1's, round 2's and the last message
    first_burst = float(bursts[0].rsplit(" ", 1)[1])
    # round 1, round 2 and the finish each wait one round_timeout_s for the silent rogue, and no more
    assert ended - first_burst < 3 * ROUND_TIMEOUT_S + 25, (ended - first_burst, rogue_log[-2000:])
    log = (tmp_path / "server.log").read_text()
    reasons = [
        "message type '0' is local to a party",
        f"dropped FINISHED from worker {RANK} before the last round",
        "dropped status 'FINISHED\\n2026-01-01 00:00:00 INFO forged line'",
        "the server has no handler for it",
        "closing the round without them",
        f"workers [{RANK}] did not report FINISHED",
    ]
    missing = [r for r in reasons if r not in log]
    assert not missing, f"not in the server log: {missing}\n{log[-4000:]}"
    assert not any(line.startswith("2026-01-01 00:00:00 INFO forged") for line in log.splitlines())
    assert "Traceback" not in log, log[-4000:]
    rows = metrics(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == 4 for r in rows), rows  # the honest workers' 2 x 2 PriSM clients, every round


def test_a_hello_replayed_into_a_restarted_server_only_gets_the_status_question() -> None:
    """Issue 18, item 3: a worker's first ONLINE (sent before it heard from any server, so without a session),
    recorded and replayed into a resumed server before the real workers reconnect, made that server send INIT
    to a worker not listening yet, which marked it dead for the rest of the run. Now a hello is answered only
    with the status question; the worker's answer, which carries the new server's session, counts."""
    from types import SimpleNamespace

    from fedml.core.distributed.communication.message import Message

    from fedml_prism.runtimes.cross_silo.server_manager import PrismServerManager
    from fedml_prism.runtimes.security import KeyRing, worker_key
    from fedml_prism.runtimes.wire import FrameCodec

    master = bytes(range(32))
    worker = FrameCodec("t", 1, {0}, KeyRing(1, worker_key(master, 1)), 1 << 20)
    online = Message(5, 1, 0)
    online.add_params("client_status", "ONLINE")
    recorded_hello = worker.encode(online)
    resumed = FrameCodec("t", 0, {1, 2}, KeyRing(0, master), 1 << 20, round_of=lambda: 3)

    calls: list[tuple[str, int]] = []
    manager = PrismServerManager.__new__(PrismServerManager)  # no FedML constructor: no transport, no threads
    manager.client_real_ids = manager.client_id_list_in_this_round = [1, 2]
    manager.client_online_mapping, manager.is_initialized = {}, False
    manager.args = SimpleNamespace(round_idx=3)
    manager._lock = threading.RLock()
    manager.send_message_check_client_status = lambda receiver, silo: calls.append(("check", receiver))
    manager.send_init_msg = lambda: calls.append(("init", 0))

    manager.handle_message_client_status_update(resumed.decode(recorded_hello, transport_sender=1))
    assert calls == [("check", 1)] and manager.client_online_mapping == {}  # asked again, not counted online
    check = Message(6, 0, 1)
    worker.decode(resumed.encode(check), transport_sender=0)  # the live worker hears the question
    manager.handle_message_client_status_update(resumed.decode(worker.encode(online), transport_sender=1))
    assert manager.client_online_mapping == {"1": True} and calls == [("check", 1)]  # its answer counts


# ------------------------------------------------------------------------------ the rogue (run as a script)
def rogue_main(cfg_path: str, lifetime_s: float = 200.0) -> int:
    """Rank 3 with its own key, on the project's own transport: online when asked, a burst of control
    frames whenever the server writes to it, never an upload."""
    from fedml.core.distributed.communication.message import Message

    from fedml_prism.job import build_job
    from fedml_prism.runtimes.cross_silo.launch import fedml_args
    from fedml_prism.runtimes.cross_silo.transport import make_comm_manager

    job = build_job(cfg_path)
    args = fedml_args(job, RANK, "client", "t")
    comm = make_comm_manager(args, RANK, job.worker_num, "GRPC")

    def say(text: str) -> None:
        print(f"rogue: {text}", flush=True)

    def send(name: str, msg_type: int, status: str | None) -> None:
        msg = Message(msg_type, RANK, 0)
        if status is not None:
            msg.add_params("client_status", status)
        try:
            comm.send_message(msg)
            say(f"sent {name}")
        except Exception as err:  # noqa: BLE001 - report and go on with the next attack
            say(f"send {name} failed: {type(err).__name__}")

    class Observer:
        bursts = 0

        def receive_message(self, msg_type: object, msg: object) -> None:
            if msg_type == 0:
                return  # its own transport is up
            say(f"got type {msg_type}")
            if msg_type == 6:  # the server asks for its status: come online like a worker
                send("online_answer", 5, "ONLINE")
                return
            if msg_type in (1, 2, 7) and self.bursts < 3:
                self.bursts += 1
                say(f"burst {self.bursts} at {time.time()}")
                for name, kind, status in ATTACKS:
                    if not (self.bursts == 3 and name == "finished"):  # after the last round FINISHED would end it
                        send(name, kind, status)

    comm.add_observer(Observer())
    threading.Thread(target=comm.handle_receive_message, daemon=True).start()
    send("hello", 5, "ONLINE")
    time.sleep(lifetime_s)
    return 0


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "rogue":
    sys.exit(rogue_main(sys.argv[2]))
