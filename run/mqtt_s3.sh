#!/usr/bin/env bash
# Cross-silo over MQTT_S3 on this machine: mosquitto + a local S3 endpoint (moto_server), the bucket,
# the server and WORKERS worker processes. Everything has a timeout; on exit only the processes this
# script started are stopped (by PID).
# Usage: bash run/mqtt_s3.sh [CONFIG] [WORKERS] [TIMEOUT_S]   (env: MQTT_PORT, S3_PORT)
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-config/mqtt_s3/fedml_config.yaml}"
WORKERS="${2:-2}"
TIMEOUT="${3:-900}"
BIN="${BIN:-.venv/bin}"
MQTT_PORT="${MQTT_PORT:-1883}"
S3_PORT="${S3_PORT:-5000}"
source run/parties.sh

MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
[ -x "$MOSQUITTO" ] || { echo "mosquitto not found: apt-get install mosquitto" >&2; exit 2; }
background "$MOSQUITTO" -p "$MQTT_PORT" >/dev/null 2>&1
background "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT" >/dev/null 2>&1
"$BIN/python" - "$S3_PORT" "$MQTT_PORT" <<'PY'
import socket, sys, time
import boto3
s3_port, mqtt_port = int(sys.argv[1]), int(sys.argv[2])
deadline = time.time() + 60
for port in (s3_port, mqtt_port):
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                sys.exit(f"nothing listens on 127.0.0.1:{port}")
            time.sleep(0.2)
boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}", aws_access_key_id="testing",
             aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="fedml-prism")
PY

launch_parties "$CONFIG" "$WORKERS" 0
