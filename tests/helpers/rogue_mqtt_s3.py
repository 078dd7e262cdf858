"""A compromised MQTT_S3 worker for tests/runtimes/test_hostile_mqtt_s3.py.

It holds its own key (``fedml-prism keys``), announces itself ONLINE as FedML's cross-silo workers do
(a ``C2S_CLIENT_STATUS`` message on its topic, again on every ``S2C_CHECK_CLIENT_STATUS``), decodes the
server's frames with its own codec, and answers:

- the first bundle: an upload holding another worker's client, then one accepted upload whose PriSM
  clients each carry one defect of ``hostile_utils.defective_uploads`` (the engine must reject each),
  then transport attacks: pickles (inline and in S3), path-traversal and foreign S3 keys, an oversized
  object, announcements that lie about size and hash, bogus safetensors blobs, spoofed senders (in the
  frame, and on worker 1's topic with its own key), missing and wrong MACs, exact replays, a re-announced
  consumed key, NaN and huge integers in the header, a huge round; S3 announcements without a MAC, with
  another announcement's MAC and with a non-hex MAC, and a signed one whose hash lies, each repeated
  (the server must fetch none of the first three and the last once); and, to honest worker 1, a pickle
  and a forged server message;
- the second bundle: the first round's upload replayed exactly and re-stamped (an older round);
- then silence (no upload in round 2, no FINISHED).

Usage: python rogue_mqtt_s3.py CONFIG RUN_ID RANK KEY_FILE MARKER_PATH TIMEOUT_S
"""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import struct
import sys
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import boto3
import paho.mqtt.client as mqtt
import yaml
from hostile_utils import defective_uploads, frame, header_of, honest_upload, marker_pickle, reframe

from fedml_prism.engine.server import pack_bundle, unpack_bundle
from fedml_prism.runtimes.security import KeyRing, read_key
from fedml_prism.runtimes.wire import FrameCodec

STATUS, UPLOAD, INIT, SYNC, CHECK = 5, 3, 1, 2, 6
REPEATS = 4  # each refused announcement is sent this often


STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"[rogue {time.monotonic() - STARTED:6.1f} s] {text}", flush=True)


class Rogue:
    def __init__(self, cfg_path: str, run_id: str, rank: int, key_path: str, marker: str) -> None:
        from fedml.core.distributed.communication.message import Message

        self.Message = Message
        sections = yaml.safe_load(Path(cfg_path).read_text())
        flat = {k: v for section in sections.values() for k, v in section.items()}
        self.cfg_path, self.run_id, self.rank, self.marker = cfg_path, run_id, rank, Path(marker)
        self.key = read_key(key_path)
        self.max_bytes = int(flat["max_message_mb"] * 1024 * 1024)
        self.clients_total = int(flat["client_num_in_total"])
        self.codec = FrameCodec(run_id, rank, {0}, KeyRing(rank, self.key), self.max_bytes)
        s3 = flat["customized_training_s3_config"]
        self.bucket = s3["BUCKET_NAME"]
        self.s3 = boto3.client("s3", endpoint_url=s3["CN_S3_ENDPOINT"], region_name=s3["CN_REGION_NAME"],
                               aws_access_key_id=s3["CN_S3_AKI"], aws_secret_access_key=s3["CN_S3_SAK"])
        broker = flat["customized_training_mqtt_config"]
        self.own = f"fedml_{run_id}_{rank}"
        self.inbox: queue.Queue = queue.Queue()
        self.client = mqtt.Client(client_id=f"rogue_{uuid.uuid4().hex}", clean_session=True)
        self.client.on_message = lambda c, u, m: self.inbox.put(m)
        subscribed: list[int] = []
        self.client.on_subscribe = lambda c, u, mid, q: subscribed.append(mid)
        self.client.connect(broker["BROKER_HOST"], int(broker["BROKER_PORT"]), 60)
        self.client.loop_start()
        self.client.subscribe(f"fedml_{run_id}_0_{rank}", qos=2)
        deadline = time.time() + 30
        while not subscribed and time.time() < deadline:
            time.sleep(0.05)
        self.done: set[int] = set()
        self.accepted: bytes = b""
        self.accepted_announcement: bytes = b""

    # ------------------------------------------------------------------ plumbing
    def publish(self, topic: str, payload: bytes, what: str) -> None:
        self.client.publish(topic, payload, qos=2).wait_for_publish(timeout=10)
        say(f"sent {what} on {topic}")

    def put(self, data: bytes, key: str | None = None) -> str:
        key = key or f"{self.own}_{uuid.uuid4().hex}"
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
        return key

    def announce(self, topic: str, key: str, data: bytes, what: str, size: int | None = None,
                 sha: str | None = None, mac: str | None = "sign") -> bytes:
        """Announce ``key`` on ``topic``: signed with this worker's key as sender 3 (``mac="sign"``, what
        an honest worker 3 sends), without a MAC (``None``) or with the ``mac`` given."""
        ann: dict[str, Any] = {"key": key, "size": len(data) if size is None else size,
                               "sha256": sha or hashlib.sha256(data).hexdigest()}
        if mac == "sign":
            mac = announcement_mac(self.key, self.run_id, self.rank, 0, ann)
        if mac is not None:
            ann["mac"] = mac
        payload = json.dumps(ann).encode()
        self.publish(topic, payload, f"{what} (key {key})")
        return payload

    def via_s3(self, data: bytes, what: str, topic: str | None = None, key: str | None = None, **lie: Any) -> bytes:
        return self.announce(topic or self.own, self.put(data, key), data, what, **lie)

    def message(self, msg_type: int, **params: Any) -> Any:
        msg = self.Message(msg_type, self.rank, 0)
        for k, v in params.items():
            msg.add_params(k, v)
        return msg

    def status(self, value: str = "ONLINE") -> bytes:
        return self.codec.encode(self.message(STATUS, client_status=value, client_os="Linux"))

    def upload(self, bundle: OrderedDict) -> bytes:
        return self.codec.encode(self.message(UPLOAD, model_params=bundle, num_samples=10))

    def next_seq(self) -> int:
        """A fresh sequence number from the codec's counter (later frames stay above it)."""
        return header_of(self.status())["seq"]

    def receive(self, m: Any) -> Any:
        payload = bytes(m.payload)
        if payload[:1] == b"{":
            key = json.loads(payload)["key"]
            payload = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return self.codec.decode(payload, transport_sender=0)

    # ------------------------------------------------------------------ behaviour
    def run(self, timeout_s: float) -> None:
        self.publish(self.own, self.status(), "ONLINE")
        end = time.time() + timeout_s
        self.flood_until, last_flood = 0.0, 0.0
        while time.time() < end:
            if time.time() < self.flood_until and time.time() - last_flood > 4.0:
                # FedML's server answers every ONLINE with a whole new init round (deadline re-armed): a
                # rogue repeating it would stall the round forever unless the server ignores it mid-run
                self.publish(self.own, self.status(), "ONLINE again mid-run")
                last_flood = time.time()
            try:
                m = self.inbox.get(timeout=1.0)
            except queue.Empty:
                continue
            msg = self.receive(m)
            kind = int(msg.get_type())
            if kind == CHECK:
                self.publish(self.own, self.status(), "ONLINE")
            elif kind in (INIT, SYNC):
                wire_round = msg.get("prism::wire_round")
                say(f"bundle of wire round {wire_round}")
                if wire_round in self.done:
                    continue
                self.done.add(wire_round)
                if wire_round == 0:
                    self.round_one(msg.get("model_params"))
                elif wire_round == 1:
                    self.round_two()
                else:
                    say("silent")

    def round_one(self, bundle: OrderedDict) -> None:
        upload = honest_upload(self.cfg_path, bundle)
        mine = unpack_bundle(upload)
        foreign = next(c for c in range(self.clients_total) if c not in mine)
        self.via_s3(self.upload(pack_bundle({foreign: next(iter(mine.values()))})), "another worker's client")
        defects = defective_uploads(upload)
        say(f"defects {[name for name, _, _ in defects]} on clients {sorted(mine)}")
        merged = pack_bundle({cid: p for _, b, _ in defects for cid, p in unpack_bundle(b).items()})
        self.accepted = self.upload(merged)
        self.accepted_announcement = self.via_s3(self.accepted, "the defective bundle")
        self.transport_attacks()
        self.announcement_attacks()
        self.worker_attacks()

    def transport_attacks(self) -> None:
        own, key, accepted = self.own, self.key, self.accepted
        evil = marker_pickle(self.marker)
        self.publish(own, evil, "a pickle inline")
        self.via_s3(evil, "a pickle in S3")
        self.announce(own, "../../x", accepted, "a path-traversal key")
        self.via_s3(accepted, "worker 1's key prefix on its own topic", key=f"fedml_{self.run_id}_1_{uuid.uuid4().hex}")
        huge = b"PRSM" + bytes(self.max_bytes + 4096)
        self.via_s3(huge, "an oversized object, announced as such")
        self.via_s3(huge, "an oversized object, announced as small", size=100)
        self.via_s3(accepted, "a size lie", size=len(accepted) - 1)
        self.via_s3(accepted, "a hash lie", sha="0" * 64)
        (size,) = struct.unpack(">I", accepted[5:9])
        head = accepted[:9 + size]
        for name, blob in (("garbage", b"\xff" * 8 + b"{}"),
                           ("a huge tensor without data",
                            _st_header({"w": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4 * 10**9]}}))):
            bogus = reframe(head + blob, key, digest=hashlib.sha256(blob).hexdigest(), seq=self.next_seq())
            self.via_s3(bogus, f"bogus safetensors ({name})")
        self.publish(own, reframe(self.status("IDLE"), key, sender=1), "a status frame saying sender 1")
        self.via_s3(reframe(accepted, key, sender=1, seq=self.next_seq()), "an upload saying sender 1")
        topic1 = f"fedml_{self.run_id}_1"
        self.publish(topic1, reframe(self.status("IDLE"), key, sender=1), "a status frame as worker 1 with its own key")
        self.via_s3(reframe(accepted, key, sender=1, seq=self.next_seq()), "an upload as worker 1 with its own key",
                    topic=topic1, key=f"fedml_{self.run_id}_1_{uuid.uuid4().hex}")
        self.via_s3(reframe(accepted, None, mac="", seq=self.next_seq()), "an upload without MAC")
        self.via_s3(reframe(accepted, b"\x01" * 32, seq=self.next_seq()), "an upload with a wrong MAC")
        self.via_s3(accepted, "the accepted upload replayed exactly")
        self.publish(own, self.accepted_announcement, "the consumed announcement again")
        status = self.status("IDLE")  # a status FedML's server ignores (ONLINE again would re-send the round)
        self.publish(own, status, "a status frame")
        self.publish(own, status, "the status frame replayed exactly")
        self.publish(own, _edit_header(self.status("IDLE"), '"round":', '"round":NaN,"x":'), "NaN in the header")
        self.publish(own, _edit_header(self.status("IDLE"), '"round":', '"round":' + "9" * 5000 + ',"x":'),
                     "a 5000-digit integer in the header")
        self.via_s3(reframe(accepted, key, round=10**30, seq=self.next_seq()), "an upload for round 10**30")

    def announcement_attacks(self) -> None:
        """Announcements the server must refuse before any S3 request (no MAC; the MAC of another
        announcement, made with this worker's key; a MAC that is not hex), then one signed announcement
        whose hash lies (downloaded once, rejected); each sent ``REPEATS`` times: none is fetched again."""
        data = self.accepted
        other = {"key": f"{self.own}_{uuid.uuid4().hex}", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for what, mac, sha in (("an announcement without MAC", None, None),
                               ("an announcement with another announcement's MAC",
                                announcement_mac(self.key, self.run_id, self.rank, 0, other), None),
                               ("an announcement with a non-hex MAC", "\u00e9" * 64, None),
                               ("a signed announcement with a hash lie", "sign", "0" * 64)):
            key = self.put(data)
            for i in range(REPEATS):
                self.announce(self.own, key, data, what if i == 0 else f"{what}, again", sha=sha, mac=mac)

    def worker_attacks(self) -> None:
        """Honest worker 1 hears only the server's topic to it: a pickle and a forged FINISH there."""
        topic = f"fedml_{self.run_id}_0_1"
        self.publish(topic, marker_pickle(self.marker), "a pickle to worker 1")
        forged = frame({"run": self.run_id, "session": self.codec.session, "seq": time.time_ns(), "round": 0, "sender": 0,
                        "receiver": 1, "type": "7", "params": {}, "tensors": False}, key=self.key)
        self.publish(topic, forged, "a FINISH to worker 1 as the server with its own key")

    def round_two(self) -> None:
        self.via_s3(self.accepted, "round 1's upload replayed exactly")
        self.via_s3(reframe(self.accepted, self.key, seq=self.next_seq()), "round 1's upload re-stamped (older round)")
        self.flood_until = time.time() + 60.0
        say("no upload from now on (ONLINE every 4 s for 60 s)")


def announcement_mac(key: bytes, run_id: str, sender: int, receiver: int, ann: dict[str, Any]) -> str:
    """The MAC of an S3 announcement as the module doc of ``fedml_prism.runtimes.cross_silo.mqtt_transport`` specifies
    it, written out here so that the test pins the format: HMAC-SHA256 with the link key over the compact
    JSON array [label, run, sender, receiver, key, size, sha256]."""
    signed = json.dumps(["fedml_prism MQTT_S3 announcement v1", run_id, sender, receiver, ann["key"], ann["size"],
                         ann["sha256"]], separators=(",", ":")).encode()
    return hmac.new(key, signed, hashlib.sha256).hexdigest()


def _st_header(header: dict) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text


def _edit_header(data: bytes, old: str, new: str) -> bytes:
    """``data`` with the first ``old`` in its JSON header replaced by ``new`` (text: not valid JSON after)."""
    (size,) = struct.unpack(">I", data[5:9])
    text = data[9:9 + size].decode().replace(old, new, 1)
    head = text.encode()
    return data[:5] + struct.pack(">I", len(head)) + head + data[9 + size:]


if __name__ == "__main__":
    cfg, run, rank, key_file, marker, timeout = sys.argv[1:7]
    Rogue(cfg, run, int(rank), key_file, marker).run(float(timeout))
