"""A rogue cross-device peer for tests/runtimes/test_hostile_cross_device.py: it holds edge ids of the job (a
compromised phone, or anyone who may publish on those devices' topics) and speaks FedML's device
protocol like :class:`fedml_prism.runtimes.cross_device.device.ReferenceDevice`, but every upload is hostile.

Usage: python rogue_cross_device.py CONFIG RUN_ID MARKER_PATH EDGE [EDGE ...]

Per edge and round it first sends messages the server must refuse before downloading anything (they do
not use up the device's upload of the round), then one upload the server downloads and must refuse
after parsing (that is the device's update of the round, rejected, so the round closes without waiting).
Each attack prints ``rogue: sent NAME``; exit 0 after FINISHED for every edge, 3 when the server is
silent for 120 s."""

from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any

import boto3
import paho.mqtt.client as mqtt
import torch
from hostile_utils import marker_pickle

from fedml_prism.job import build_job
from fedml_prism.runtimes.cross_device.mnn_export import train_graph

CHECK, INIT, SYNC, FINISH, MODEL, STATUS = 6, 1, 2, 7, 3, 5


class Rogue:
    def __init__(self, cfg: str, run_id: str, marker: str, edges: list[int]) -> None:
        job = build_job(cfg)
        mq, s3 = job.flat["customized_training_mqtt_config"], job.flat["customized_training_s3_config"]
        self.cap = int(float(job.flat.get("max_message_mb", 256)) * 1024 * 1024)
        self.run_id, self.marker, self.edges = run_id, marker, edges
        self.bucket = s3["BUCKET_NAME"]
        self.s3 = boto3.client("s3", endpoint_url=s3["CN_S3_ENDPOINT"], region_name=s3["CN_REGION_NAME"],
                               aws_access_key_id=s3["CN_S3_AKI"], aws_secret_access_key=s3["CN_S3_SAK"])
        self.work = tempfile.mkdtemp(prefix="rogue_")
        self.jobs: queue.Queue = queue.Queue()
        self.rounds = {e: 0 for e in edges}
        self.finished: set[int] = set()
        self.replay: dict[int, dict[str, Any]] = {}
        self.old_key: dict[int, str] = {}
        self.client = mqtt.Client(client_id=f"rogue_{uuid.uuid4().hex[:8]}")
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, msg: None if msg.retain else self.jobs.put((msg.topic, msg.payload))
        self.client.connect(mq["BROKER_HOST"], int(mq["BROKER_PORT"]), 60)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: int) -> None:
        for e in self.edges:
            client.subscribe(f"fedml_{self.run_id}_0_{e}", qos=2)

    # ------------------------------------------------------------------ tools
    def key(self, edge: int) -> str:
        return f"fedml_{self.run_id}_0_{edge}-{uuid.uuid4().hex}"

    def put(self, key: str, data: bytes) -> str:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
        return key

    def publish(self, edge: int, message: dict[str, Any] | bytes, name: str) -> None:
        payload = message if isinstance(message, bytes) else json.dumps(message)
        self.client.publish(f"fedml_{self.run_id}_{edge}", payload, qos=2).wait_for_publish(timeout=30)
        print(f"rogue: sent {name}", flush=True)

    def upload(self, edge: int, key: str, num: Any = 10, sender: Any = None) -> dict[str, Any]:
        return {"model_params": key, "client_idx": "0", "num_samples": num, "msg_type": MODEL,
                "sender": edge if sender is None else sender, "receiver": 0}

    def graph(self, message: dict[str, Any]) -> bytes:
        path = os.path.join(self.work, uuid.uuid4().hex)
        self.s3.download_file(self.bucket, str(message["model_params"]), path)
        with open(path, "rb") as f:
            return f.read()

    # ------------------------------------------------------------------ attacks
    def round_one_13(self, edge: int, message: dict[str, Any]) -> None:
        graph = self.graph(message)
        self.publish(edge, marker_pickle(self.marker), "pickle_message")
        self.put("../../victim", b"rogue bytes")
        self.put("../../created_by_rogue", b"rogue bytes")
        self.publish(edge, self.upload(edge, "../../victim"), "traversal_victim")
        self.publish(edge, self.upload(edge, "../../created_by_rogue"), "traversal_create")
        self.publish(edge, self.upload(edge, self.put(self.key(11), graph)), "other_edge_key")
        self.publish(edge, self.upload(edge, self.put(self.key(edge), graph), sender=11), "spoofed_sender")
        self.publish(edge, self.upload(edge, self.put(self.key(edge), b"\0" * (self.cap + self.cap // 2))), "oversized")
        self.publish(edge, self.upload(edge, self.put(self.key(edge), graph), num=[5, 5]), "two_element_count")
        self.publish(edge, self.upload(edge, self.put(self.key(edge), graph), num=10**30), "huge_count")
        self.publish(edge, self.upload(edge, self.put(self.key(edge), graph), num="32"), "string_count")
        self.publish(edge, json.dumps(self.upload(edge, self.put(self.key(edge), graph), num=float("nan"))).encode(),
                     "nan_count")
        self.publish(edge, {**self.upload(edge, self.key(edge)), "msg_type": 42}, "unknown_type")
        self.publish(edge, self.upload(edge, self.key(edge)), "missing_object")
        # an object written now and announced next round: an earlier round's upload
        self.old_key[edge] = self.put(self.key(edge), graph)
        time.sleep(1.2)  # S3 times have 1 s resolution: next round's model is sent strictly later
        garbage = self.upload(edge, self.put(self.key(edge), os.urandom(len(graph))))
        self.replay[edge] = garbage
        self.publish(edge, garbage, "garbage_graph")

    def round_one_14(self, edge: int, message: dict[str, Any]) -> None:
        self.publish(edge, self.upload(edge, self.put(self.key(edge), marker_pickle(self.marker))), "pickle_object")

    def round_two_13(self, edge: int, message: dict[str, Any]) -> None:
        graph = self.graph(message)
        self.publish(edge, self.replay[edge], "replayed_upload")
        self.publish(edge, self.upload(edge, self.old_key[edge]), "earlier_round_object")
        self.publish(edge, self.upload(edge, self.put(self.key(edge), graph[: len(graph) // 2])), "truncated_graph")

    def round_two_14(self, edge: int, message: dict[str, Any]) -> None:
        path = os.path.join(self.work, "nan.mnn")
        with open(path, "wb") as f:
            f.write(self.graph(message))
        x, y = torch.full((8, 1, 8, 8), float("nan")), torch.zeros(8, dtype=torch.long)
        train_graph(path, [(x, y)], 10, 0.05)
        with open(path, "rb") as f:
            self.publish(edge, self.upload(edge, self.put(self.key(edge), f.read())), "nan_graph")

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        plan = {(13, 1): self.round_one_13, (14, 1): self.round_one_14, (13, 2): self.round_two_13,
                (14, 2): self.round_two_14}
        self.client.loop_start()
        try:
            while len(self.finished) < len(self.edges):
                try:
                    topic, payload = self.jobs.get(timeout=120)
                except queue.Empty:
                    print("rogue: the server is silent", flush=True)
                    return 3
                edge = int(topic.rsplit("_", 1)[1])
                message = json.loads(payload)
                kind = int(message.get("msg_type", 0))
                if kind == CHECK:
                    self.publish(edge, {"client_status": "ONLINE", "client_os": "Android", "msg_type": STATUS,
                                        "sender": edge, "receiver": 0}, f"online_{edge}")
                elif kind in (INIT, SYNC):
                    self.rounds[edge] += 1
                    plan[(edge, self.rounds[edge])](edge, message)
                elif kind == FINISH:
                    self.finished.add(edge)
                    self.publish(edge, {"client_status": "FINISHED", "client_os": "Android", "msg_type": STATUS,
                                        "sender": edge, "receiver": 0}, f"finished_{edge}")
            return 0
        finally:
            self.client.loop_stop()
            self.client.disconnect()
            shutil.rmtree(self.work, ignore_errors=True)


if __name__ == "__main__":
    cfg, run_id, marker, *edges = sys.argv[1:]
    sys.exit(Rogue(cfg, run_id, marker, [int(e) for e in edges]).run())
