#!/usr/bin/env bash
# Quickstart, step 1: create .venv (Python 3.11), install fedml_prism with FedML 0.9.6 and its
# dependencies, then run the built-in default job (PriSM at keep 0.2 next to full FedAvg, ~1 minute).
# Set PRISM_SKIP_MAIN=1 to only install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi
version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$version" != "3.11" ]; then
  echo "fedml_prism needs Python 3.11 (found $version at $PYTHON): FedML 0.9.6 does not install on 3.12+." >&2
  echo "Install Python 3.11 and run: PYTHON=/path/to/python3.11 bash run/setup.sh" >&2
  exit 2
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# --isolated: ignore this machine's pip config, whose local CPU torch wheel breaks torchvision (and FedML)
.venv/bin/pip install --isolated -q --upgrade pip wheel
.venv/bin/pip install --isolated -q -e ".[dev]"

if [ "${PRISM_SKIP_MAIN:-0}" != "1" ]; then
  .venv/bin/fedml-prism run --cf config/fedml_config.yaml
fi
