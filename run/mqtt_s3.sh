#!/usr/bin/env bash
# Cross-silo over MQTT_S3 on this machine: mosquitto + a local S3 endpoint (moto_server), the bucket,
# the server and WORKERS worker processes. Everything has a timeout; on exit only the processes this
# script started are stopped (by PID).
# Usage: bash run/mqtt_s3.sh [CONFIG] [WORKERS] [TIMEOUT_S] [ARGS...]   (env: MQTT_PORT, S3_PORT)
# ARGS go to every party, e.g. --resume: after the server died, continue from its last checkpoint
# (output_dir/checkpoint.pt, every checkpoint_every rounds) with fresh workers.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-config/mqtt_s3/fedml_config.yaml}"
WORKERS="${2:-2}"
TIMEOUT="${3:-900}"
BIN="${BIN:-.venv/bin}"
MQTT_PORT="${MQTT_PORT:-1883}"
S3_PORT="${S3_PORT:-5000}"
source run/parties.sh

start_broker_and_s3

launch_parties "$CONFIG" "$WORKERS" 0 "${@:4}"
