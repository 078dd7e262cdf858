"""FedML's cross-silo server manager, extended so a dead or silent worker cannot hang a run.

FedML 0.9.6's ``FedMLServerManager`` waits for every client's upload and every FINISHED status with
no timeout (``cross_silo/server/fedml_server_manager.py:182`` ``check_whether_all_receive``), and a
send to a dead gRPC peer raises out of the message loop. ``PrismServerManager`` keeps FedML's message
protocol and classes, and adds:

- a failed send marks that worker dead; its share of every later round is closed at once with an
  empty upload (its PriSM clients are left out of the aggregate, the run goes on);
- a per-round deadline (``round_timeout_s``): workers that have not uploaded by then are left out of
  that round (a late upload of an old round is rejected by the aggregator's checks);
- a start deadline (workers that never come online) and a finish deadline (dead workers never report
  FINISHED). Each is its own timer, armed only by the server's own progress (its transport ready once,
  a round's bundles sent, the last round closed): nothing a peer sends arms, re-arms or cancels one, so a
  round closes by ``round_timeout_s`` and the run ends by its finish deadline whatever peers send
  (tests/runtimes/test_hostile_control.py). A FINISHED status before the last round is over, a status FedML does
  not know and a message type the server has no handler for are logged and dropped;
- a worker's hello (an ONLINE status without the server's session: it has not heard from this server
  process yet, or it is a recording replayed into a restarted server) is answered only with FedML's
  status question, never counted as online: the answer, carrying this server's session, is;
- PriSM's own transports for gRPC and MQTT_S3 (:mod:`fedml_prism.runtimes.cross_silo.transport`: no pickle, checked
  frames), and checks on every upload before FedML's handler sees it: a known sender, the round and
  session the server sent (no stale or replayed round), a bundle holding only the PriSM clients this
  server gave that worker; a message that still makes a handler fail is logged and dropped, never
  raised out of the server loop;
- resume (``start_round``): a server restarted from its checkpoint after round k starts FedML's round
  counter at k, so it plays rounds k+1..``comm_round``. Its workers are fresh processes whose FedML
  round counters start at 0: after the last round they do not know the run is over, answer the
  ``FINISHED`` bundle with an empty upload instead of reporting FINISHED, and wait. An upload that
  arrives after the last round is therefore answered with FedML's FINISH message; the worker then
  reports FINISHED and exits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from ...engine.server import Deadline
from .._fedml_import import silence_fedml_import_warnings
from ..wire import WIRE_ROUND, WIRE_SESSION
from .transport import SAFE_BACKENDS

silence_fedml_import_warnings()
from fedml.core.distributed.communication.message import Message  # noqa: E402  (after the warnings filter)
from fedml.cross_silo.server.fedml_server_manager import FedMLServerManager  # noqa: E402
from fedml.cross_silo.server.message_define import MyMessage  # noqa: E402

log = logging.getLogger("fedml_prism")


class PrismServerManager(FedMLServerManager):
    def __init__(self, args: Any, aggregator: Any, comm: Any = None, client_rank: int = 0, client_num: int = 0,
                 backend: str = "MQTT_S3", round_timeout_s: float = 600.0, start_timeout_s: float = 300.0,
                 start_round: int = 0) -> None:
        super().__init__(args, aggregator, comm, client_rank, client_num, backend)
        if isinstance(start_round, bool) or not isinstance(start_round, int) or not 0 <= start_round <= self.round_num:
            raise ValueError(f"start_round={start_round!r} is invalid: allowed an integer in [0, comm_round={self.round_num}]")
        self.args.round_idx = start_round  # FedML's counter (set to 0 above): a resumed run goes on from its checkpoint
        self.round_timeout_s = round_timeout_s
        self.start_timeout_s = start_timeout_s
        self.dead: set[int] = set()
        self._lock = threading.RLock()
        # one timer per purpose: arming one never cancels another
        self.start_deadline, self.round_deadline, self.finish_deadline = Deadline(), Deadline(), Deadline()
        self._start_armed = False
        self._finishing = False

    # ------------------------------------------------------------------ safe transports, checked uploads
    def _init_manager(self) -> None:
        if self.backend not in SAFE_BACKENDS:
            super()._init_manager()
            return
        from .transport import make_comm_manager

        self.com_manager = make_comm_manager(self.args, self.rank, self.size, self.backend, round_of=self._prism_round)
        self.com_manager.add_observer(self)

    def _prism_round(self) -> int:
        """The PriSM round the server is collecting (stamped on what it sends; uploads must echo it)."""
        server = getattr(getattr(getattr(self, "aggregator", None), "aggregator", None), "server", None)
        return int(server.round_idx) if server is not None else int(getattr(self.args, "round_idx", 0))

    def receive_message(self, msg_type: Any, msg_params: Any) -> None:
        if msg_type not in self.message_handler_dict:
            log.warning("dropped a message of type %s from %s: the server has no handler for it", _safe(msg_type),
                        _safe(msg_params.get(MyMessage.MSG_ARG_KEY_SENDER)))
            return
        try:
            super().receive_message(msg_type, msg_params)
        except Exception as err:  # noqa: BLE001 - nothing a peer sends may end the server loop
            log.exception("dropped a message of type %r from %r: %s: %s", msg_type,
                          _safe(msg_params.get(MyMessage.MSG_ARG_KEY_SENDER)), type(err).__name__, err)

    def _upload_problem(self, msg_params: Any) -> str | None:
        """Why an upload from a peer is rejected (None: accept)."""
        sender = msg_params.get(MyMessage.MSG_ARG_KEY_SENDER)
        if isinstance(sender, bool) or not isinstance(sender, int) or sender not in self.client_real_ids:
            return f"unknown sender {_safe(sender)}"
        if msg_params.get(WIRE_ROUND) is not None:  # came over a safe transport
            session = getattr(getattr(self.com_manager, "codec", None), "session", None)
            if msg_params.get(WIRE_SESSION) != session:
                return "its session is not this server's (an upload to an earlier server process)"
            sent, now = msg_params.get(WIRE_ROUND), self._prism_round()
            if sent != now:
                return f"it is for round {sent + 1}, not round {now + 1} (stale or replayed)"
        if getattr(self.aggregator, "flag_client_model_uploaded_dict", {}).get(self.client_real_ids.index(sender)):
            return "a second upload for this round (a retried send whose first try arrived): the first is kept"
        params = msg_params.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS)
        if not isinstance(params, Mapping):
            return f"its model_params are a {type(params).__name__}, not a mapping of tensors"
        check = getattr(self.aggregator.aggregator, "bundle_problem", None)
        if check is not None:
            return check(self.client_real_ids.index(sender), params)
        return None

    # ------------------------------------------------------------------ sends never raise
    def send_message(self, message: Message) -> None:
        receiver = int(message.get_receiver_id())
        if receiver in self.dead:
            return
        try:
            super().send_message(message)
        except Exception as err:  # noqa: BLE001 - any transport error means the peer is unreachable
            if message.get_type() == MyMessage.MSG_TYPE_S2C_CHECK_CLIENT_STATUS:
                return  # a worker not started yet: it announces itself when it comes online
            log.warning("worker %d unreachable (%s): it is left out from now on", receiver, type(err).__name__)
            self.dead.add(receiver)

    # ------------------------------------------------------------------ rounds with deadlines
    def handle_message_client_status_update(self, msg_params: Any) -> None:
        """FedML's handler, logging the peer's status escaped (FedML logs it raw: a newline in it would forge
        a log line) and dropping statuses it does not know."""
        status = msg_params.get(MyMessage.MSG_ARG_KEY_CLIENT_STATUS)
        sender = msg_params.get(MyMessage.MSG_ARG_KEY_SENDER)
        if status == self.ONLINE_STATUS_FLAG:
            self.process_online_status(status, msg_params)
        elif status == self.RUN_FINISHED_STATUS_FLAG:
            self.process_finished_status(status, msg_params)
        else:
            log.warning("dropped status %s from worker %s: allowed %s or %s", _safe(status), _safe(sender),
                        self.ONLINE_STATUS_FLAG, self.RUN_FINISHED_STATUS_FLAG)

    def process_online_status(self, client_status: Any, msg_params: Any) -> None:
        """FedML answers every ONLINE status with the whole init round (new bundles to every worker,
        the round deadline re-armed), even mid-run: a peer repeating ONLINE would keep any round from
        closing. After the start, ONLINE only marks the worker online. A hello without this server's
        session is answered with the status question (see the module doc)."""
        sender = msg_params.get_sender_id()
        with self._lock:
            if msg_params.get(WIRE_SESSION) == "":
                log.info("worker %s said hello without this server's session: asking for its status", _safe(sender))
                if sender in self.client_real_ids:
                    self.send_message_check_client_status(sender, self.client_real_ids.index(sender))
                return
            if self.is_initialized:
                self.client_online_mapping[str(sender)] = True
                return
            super().process_online_status(client_status, msg_params)

    def handle_message_connection_ready(self, msg_params: Any) -> None:
        """This party's own transport is up (FedML's type 0: the codec refuses it from peers). An MQTT client
        reconnecting says so again: only the first time starts the run's start deadline."""
        with self._lock:
            super().handle_message_connection_ready(msg_params)
            if not self._start_armed:
                self._start_armed = True
                self.start_deadline.arm(self._start_deadline, self.start_timeout_s)

    def send_init_msg(self) -> None:
        with self._lock:
            super().send_init_msg()
            self._round_sent()

    def handle_message_receive_model_from_client(self, msg_params: Any) -> None:
        with self._lock:
            if (problem := self._upload_problem(msg_params)) is not None:
                log.warning("round %d: rejected an upload from worker %s: %s", self._prism_round() + 1,
                            _safe(msg_params.get(MyMessage.MSG_ARG_KEY_SENDER)), problem)
                return
            if self.args.round_idx >= self.round_num:
                self._release(int(msg_params.get(MyMessage.MSG_ARG_KEY_SENDER)))
                return
            before = self.args.round_idx
            super().handle_message_receive_model_from_client(msg_params)
            if self.args.round_idx != before:
                self._round_sent()

    def _round_sent(self) -> None:
        """A round's bundles went out: close dead workers' shares now, and arm the deadline."""
        self.start_deadline.cancel()
        if self.args.round_idx >= self.round_num:
            self.round_deadline.cancel()
            self.finish_deadline.arm(self._finish_deadline, self.round_timeout_s)
            return
        round_idx = self.args.round_idx
        self.round_deadline.arm(lambda: self._round_deadline(round_idx), self.round_timeout_s)
        for worker in sorted(self.dead & set(self.client_id_list_in_this_round)):
            if self.args.round_idx != round_idx:
                break
            self._empty_upload(worker)

    def _round_deadline(self, round_idx: int) -> None:
        with self._lock:
            if self.args.round_idx != round_idx or self._finishing:
                return
            flags = self.aggregator.flag_client_model_uploaded_dict
            missing = [w for w in self.client_id_list_in_this_round if not flags[self.client_real_ids.index(w)]]
            log.warning("round %d: no upload from worker(s) %s within %.0f s: closing the round without them",
                        round_idx + 1, missing, self.round_timeout_s)
            for worker in missing:
                if self.args.round_idx != round_idx:
                    break
                self._empty_upload(worker)

    def _empty_upload(self, worker: int) -> None:
        msg = Message(MyMessage.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, worker, 0)
        msg.add_params(MyMessage.MSG_ARG_KEY_MODEL_PARAMS, OrderedDict())
        msg.add_params(MyMessage.MSG_ARG_KEY_NUM_SAMPLES, 0)
        self.handle_message_receive_model_from_client(msg)

    def _start_deadline(self) -> None:
        with self._lock:
            if self.is_initialized:
                return
            offline = [w for w in self.client_id_list_in_this_round if not self.client_online_mapping.get(str(w))]
            log.warning("workers %s did not come online within %.0f s: starting without them",
                        offline, self.start_timeout_s)
            self.dead.update(offline)
            self.is_initialized = True
            self.send_init_msg()

    # ------------------------------------------------------------------ finishing
    def _release(self, worker: int) -> None:
        """An upload after the last round comes from a worker that joined a resumed run (its own FedML
        round count is behind the server's): tell it to finish; it answers with FINISHED."""
        log.info("worker %d uploaded after the last round (it joined a resumed run): telling it to finish", worker)
        silo = self.client_real_ids.index(worker) if worker in self.client_real_ids else worker - 1
        self.send_message_finish(worker, silo)

    def process_finished_status(self, client_status: Any, msg_params: Any) -> None:
        with self._lock:
            if self.args.round_idx < self.round_num:
                log.warning("dropped FINISHED from worker %s before the last round (%d of %d rounds done)",
                            _safe(msg_params.get_sender_id()), self.args.round_idx, self.round_num)
                return
            self.client_finished_mapping[str(msg_params.get_sender_id())] = True
            self._maybe_finish()

    def _maybe_finish(self, force: bool = False) -> None:
        pending = [w for w in self.client_id_list_in_this_round
                   if w not in self.dead and not self.client_finished_mapping.get(str(w))]
        if (pending and not force) or self._finishing:
            return
        if pending:
            log.warning("workers %s did not report FINISHED within %.0f s", pending, self.round_timeout_s)
        self._finishing = True
        for timer in (self.start_deadline, self.round_deadline, self.finish_deadline):
            timer.cancel()
        time.sleep(0.5)
        self.finish()

    def _finish_deadline(self) -> None:
        with self._lock:
            self._maybe_finish(force=True)


def _safe(value: Any) -> str:
    """A peer-sent value for a log line: its repr (control characters escaped: no forged lines), cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
