#!/usr/bin/env bash
# Cross-silo over gRPC on 127.0.0.1: the server and each worker in its own process, as Octopus runs them.
# Usage: bash run/grpc.sh [CONFIG] [WORKERS] [TIMEOUT_S]
# Every process gets a timeout; on exit this script ends only the processes it started (by PID).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-config/grpc/fedml_config.yaml}"
WORKERS="${2:-2}"
TIMEOUT="${3:-900}"
BIN="${BIN:-.venv/bin}"
RUN_ID="prism-$$"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

timeout "$TIMEOUT" "$BIN/fedml-prism" run --cf "$CONFIG" --rank 0 --role server --run_id "$RUN_ID" &
server=$!
pids+=("$server")
sleep "${SERVER_START_S:-8}"   # FedML: a gRPC client started before the server crashes
for rank in $(seq 1 "$WORKERS"); do
  timeout "$TIMEOUT" "$BIN/fedml-prism" run --cf "$CONFIG" --rank "$rank" --role client --run_id "$RUN_ID" &
  pids+=("$!")
done
wait "$server"
