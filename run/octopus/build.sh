#!/usr/bin/env bash
# Build the Octopus server and client packages of a PriSM job with `fedml build` (works offline).
# Usage: bash run/octopus/build.sh [CONFIG] [DEST]
# DEST/{server,client}/dist-packages/*.zip hold conf/fedml.yaml (entry main.py, config, dynamic args).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
CONFIG="$(realpath "${1:-$root/config/mqtt_s3/fedml_config.yaml}")"
DEST="$(realpath -m "${2:-$root/outputs/octopus}")"
BIN="${BIN:-$root/.venv/bin}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src" "$work/config" "$DEST"
cp "$root/run/octopus/main.py" "$work/src/"
cp "$CONFIG" "$work/config/fedml_config.yaml"
cd "$work"   # fedml build resolves -cf against the current directory
for role in server client; do
  "$BIN/fedml" build -t "$role" -sf src -ep main.py -cf config -df "$DEST/$role"
done
ls -R "$DEST" | head -20
