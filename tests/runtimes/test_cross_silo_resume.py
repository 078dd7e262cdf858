"""Cross-silo resume: a server killed with SIGKILL mid-run restarts with ``--resume`` from its checkpoint.

Workers hold no state but their data, so the restarted job starts fresh workers (over gRPC) or is the
whole ``mpiexec`` job again (MPI cannot restart one rank). The final model must equal an uninterrupted
run's; the sp simulation is the reference (``test_mpi_cross_silo_and_equivalence_with_sp`` shows
cross-silo equals sp for the same config). The restarted server must play only the rounds after its
checkpoint: its log names exactly those rounds, and the metrics rows of the earlier rounds are the ones
the killed server wrote (a retrain from round 1 would rewrite their timings).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from runtime_utils import (
    BIN,
    checkpoint_metrics,
    checkpoint_round,
    final_state,
    grpc_config,
    metrics,
    run,
    start,
    start_grpc_parties,
    stop,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.timeout(240)

ROUNDS = 4
# 2 local epochs: a round takes long enough that the kill lands before the last one
COMMON: dict[str, dict[str, Any]] = {
    "train_args": {"client_num_in_total": 12, "client_num_per_round": 6, "comm_round": ROUNDS, "epochs": 2},
    "tracking_args": {"checkpoint_every": 1, "round_timeout_s": 60},
    "prism_args": {"optimizer_state": "aggregate", "factor_scale": "sqrt"},
}


def fedml_prism(cfg: Path, out: Path, *extra: str) -> list[str]:
    return [str(BIN / "fedml-prism"), "run", "--cf", str(cfg), "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final dense weights of the same job run without interruption (sp simulation)."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tmp / "sp.yaml", **COMMON)
    run(fedml_prism(cfg, tmp / "out"), tmp, "sp.log", timeout=180)
    assert [r["round"] for r in metrics(tmp / "out")] == list(range(1, ROUNDS + 1))
    return final_state(tmp / "out")


def wait_for_checkpoint(out: Path, proc: subprocess.Popen) -> None:
    """Until the job has checkpointed round 1 (or the process died)."""
    wait_for(lambda: checkpoint_round(out) >= 1 or proc.poll() is not None, timeout=150, what="checkpoint of round 1")
    assert proc.poll() is None, "the job ended before it could be killed"


def killed_at(out: Path) -> tuple[int, list[dict[str, Any]]]:
    """The checkpoint a killed job left: its round k (1 <= k < ROUNDS) and its metrics rows."""
    k = checkpoint_round(out)
    assert 1 <= k < ROUNDS, f"the job was killed after round {k}: nothing left to resume"
    return k, checkpoint_metrics(out)


def assert_resumed(log: str, out: Path, k: int, before: list[dict[str, Any]], reference: dict[str, torch.Tensor]) -> None:
    """The restarted server resumed after round k, played only rounds k+1..ROUNDS, and ended at the
    uninterrupted run's model."""
    assert f"after round {k}" in log and "resumed from" in log
    played = [int(r) for r in re.findall(rf"round (\d+)/{ROUNDS} \|", log)]
    assert played == list(range(k + 1, ROUNDS + 1)), f"the restarted server played rounds {played}"
    rows = metrics(out)
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    for old, new in zip(before, rows[:k], strict=True):  # rows of the first job, not retrained
        assert (old["round"], old["round_s"], old["elapsed_s"]) == (new["round"], new["round_s"], new["elapsed_s"])
    assert checkpoint_round(out) == ROUNDS
    resumed = final_state(out)
    for key, ref in reference.items():  # bit-identical: selection, sampling and data order are seeded
        assert torch.equal(resumed[key], ref), f"resumed run differs from the uninterrupted one at {key}"


def test_grpc_server_killed_resumes_from_checkpoint(tmp_path: Path, uninterrupted: dict[str, torch.Tensor]) -> None:
    cfg = grpc_config(tmp_path, workers=2, **COMMON)
    out = tmp_path / "out"
    server, workers = start_grpc_parties(cfg, out, tmp_path, 2)
    try:
        wait_for_checkpoint(out, server)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        # workers end by themselves, freeing their ports for fresh ones: a waiting worker when the server's
        # port stops answering (exit 3), a training one when its upload fails (FedML raises, exit 1)
        assert all(w.wait(timeout=60) in (1, 3) for w in workers)
    finally:
        for p in [server, *workers]:
            stop(p)
    k, before = killed_at(out)

    server, workers = start_grpc_parties(cfg, out, tmp_path, 2, "--resume", tag="_resumed")
    try:
        assert server.wait(timeout=180) == 0, (tmp_path / "server_resumed.log").read_text()[-3000:]
        for w in workers:
            assert w.wait(timeout=30) == 0
    finally:
        for p in [server, *workers]:
            stop(p)
    log = (tmp_path / "server_resumed.log").read_text()
    assert_resumed(log, out, k, before, uninterrupted)
    # fresh workers count rounds from 0: after the last round the server tells each of them to finish
    assert log.count("uploaded after the last round") == 2 and "did not report FINISHED" not in log


def test_mpi_job_killed_restarts_whole_from_checkpoint(tmp_path: Path, uninterrupted: dict[str, torch.Tensor]) -> None:
    mpiexec = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
    assert mpiexec, "mpiexec missing: install the mpich wheel (pip install mpich)"
    cfg = write_config(tmp_path / "mpi.yaml", **COMMON,
                       common_args={"training_type": "cross_silo", "scenario": "horizontal"},
                       comm_args={"backend": "MPI", "worker_num": 2})
    out = tmp_path / "out"
    job = start([mpiexec, "-np", "3", *fedml_prism(cfg, out)], tmp_path, "mpi.log")
    try:
        wait_for_checkpoint(out, job)
        os.killpg(job.pid, signal.SIGKILL)  # the whole job: mpiexec cannot restart one rank
        job.wait(timeout=10)
    finally:
        stop(job)
    k, before = killed_at(out)
    log = run([mpiexec, "-np", "3", *fedml_prism(cfg, out, "--resume")], tmp_path, "mpi_resumed.log", timeout=200)
    assert_resumed(log, out, k, before, uninterrupted)


def test_grpc_worker_exits_once_its_server_stops_listening() -> None:
    # a worker left from a killed server must not hold its port when the restarted job starts fresh ones
    listener = socket.create_server(("127.0.0.1", 0))
    code = textwrap.dedent(f"""
        import time, types
        from fedml_prism.runtimes.cross_silo.launch import _watchdog
        trainer = types.SimpleNamespace(last_message_at=time.time() + 3600)  # never idle
        _watchdog(trainer, idle_s=600.0, server=("127.0.0.1", {listener.getsockname()[1]}), probe_s=0.2)
        print("watching", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "watching"
        time.sleep(1.5)  # 7 probes while the server listens: the worker stays
        assert proc.poll() is None, proc.stderr.read()
        listener.close()
        assert proc.wait(timeout=30) == 3
        assert "is gone" in proc.stderr.read()
    finally:
        listener.close()
        stop(proc)
