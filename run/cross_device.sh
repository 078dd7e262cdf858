#!/usr/bin/env bash
# PriSM cross-device (Beehive) on this machine: mosquitto + a local S3 endpoint (moto_server), the bucket,
# the PriSM MNN server and DEVICES reference devices (Python, FedML Android SDK protocol, MNN training).
# Everything has a timeout; on exit only the processes this script started are stopped (by PID).
# Usage: bash run/cross_device.sh [CONFIG] [DEVICES] [TIMEOUT_S]   (env: MQTT_PORT, S3_PORT, RUN_ID)
# Edge ids are the config's client_id_list; DEVICES of them get a reference device (the others may be
# real phones on the same broker and bucket).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-config/cross_device/fedml_config.yaml}"
DEVICES="${2:-3}"
TIMEOUT="${3:-900}"
BIN="${BIN:-.venv/bin}"
MQTT_PORT="${MQTT_PORT:-1883}"
S3_PORT="${S3_PORT:-5000}"
RUN_ID="${RUN_ID:-$$}"   # numeric: the Android SDK reads runId as a long
source run/parties.sh

start_broker_and_s3

background "$BIN/fedml-prism" run --cf "$CONFIG" --role server --run_id "$RUN_ID"
server=$last_pid
edges="$("$BIN/python" -c "import sys; from fedml_prism.job import build_job; from fedml_prism.job import edge_ids; print(*edge_ids(build_job(sys.argv[1]))[:int(sys.argv[2])])" "$CONFIG" "$DEVICES")"
for edge in $edges; do
  background "$BIN/fedml-prism" run --cf "$CONFIG" --role device --edge-id "$edge"
done
wait "$server"
