#!/usr/bin/env bash
# Cross-silo over gRPC on 127.0.0.1: the server and each worker in its own process, as Octopus runs them.
# Usage: bash run/grpc.sh [CONFIG] [WORKERS] [TIMEOUT_S] [ARGS...]
# ARGS go to every party, e.g. --resume: after the server died, continue from its last checkpoint
# (output_dir/checkpoint.pt, every checkpoint_every rounds) with fresh workers.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-config/grpc/fedml_config.yaml}"
WORKERS="${2:-2}"
TIMEOUT="${3:-900}"
BIN="${BIN:-.venv/bin}"
source run/parties.sh
# FedML: a gRPC client started before the server crashes, so the server gets a head start
launch_parties "$CONFIG" "$WORKERS" "${SERVER_START_S:-8}" "${@:4}"
