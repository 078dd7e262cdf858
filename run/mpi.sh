#!/usr/bin/env bash
# Cross-silo over MPI: server rank 0 and worker_num worker ranks under mpiexec (mpich from the venv).
# Usage: bash run/mpi.sh [CONFIG] [NP] [TIMEOUT_S] [ARGS...]
# ARGS go to every rank, e.g. --resume: after the job died, rerun it whole from the server's last checkpoint
# (output_dir/checkpoint.pt, every checkpoint_every rounds); mpiexec cannot restart a single rank.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:-config/mpi/fedml_config.yaml}"
NP="${2:-3}"
exec timeout "${3:-900}" .venv/bin/mpiexec -np "$NP" .venv/bin/fedml-prism run --cf "$CONFIG" "${@:4}"
