"""A round's clients trained together: worker processes and the vectorized path in sp give the
sequential run's results, and FedML's MPI simulation (``training_type: simulation``, ``backend: MPI``)
runs under ``mpiexec`` with the sp run's results."""

from __future__ import annotations

import shutil

import pytest
import torch
from runtime_utils import BIN, assert_same_as_sp, final_state, metrics, run, start, stop, write_config

from fedml_prism.runtimes.parallel import resolve_mode

pytestmark = pytest.mark.timeout(300)


def _cli(cfg, out) -> list[str]:
    return [str(BIN / "fedml-prism"), "run", "--cf", str(cfg), "--output-dir", str(out)]


def _mpiexec() -> str:
    mpiexec = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
    assert mpiexec, "mpiexec missing: install the mpich wheel (pip install mpich)"
    return mpiexec


def test_mpi_simulation_runs_under_mpiexec_with_the_sp_results(tmp_path) -> None:
    sections = {"train_args": {"client_num_in_total": 12, "client_num_per_round": 6, "comm_round": 2}}
    cfg = write_config(tmp_path / "sim_mpi.yaml", **sections, comm_args={"backend": "MPI"})  # worker_num from mpiexec
    log = run([_mpiexec(), "-np", "3", *_cli(cfg, tmp_path / "mpi")], tmp_path, "mpi.log", timeout=200)
    assert "2 workers" in log
    assert_same_as_sp(tmp_path, tmp_path / "mpi", **sections)


def test_mpi_simulation_with_the_wrong_rank_count_exits_2_naming_both(tmp_path) -> None:
    cfg = write_config(tmp_path / "sim_mpi.yaml", comm_args={"backend": "MPI", "worker_num": 2})
    proc = start([_mpiexec(), "-np", "2", *_cli(cfg, tmp_path / "mpi")], tmp_path, "mpi.log")
    try:
        proc.wait(timeout=120)
    finally:
        stop(proc)
    text = (tmp_path / "mpi.log").read_text()
    assert proc.returncode != 0 and "worker_num=2 is invalid for mpiexec -np 2: allowed worker_num=1" in text, text[-2000:]


@pytest.mark.parametrize("mode, rounds, atol", [("processes", 3, 0.0), ("vectorized", 1, 1e-5)])
def test_parallel_modes_give_the_sequential_run(tmp_path, mode: str, rounds: int, atol: float) -> None:
    """torch_threads 1 everywhere: the workers compute with the sequential run's thread count, so
    ``processes`` is bit for bit over several rounds; ``vectorized`` batches the arithmetic differently:
    one round's aggregate within 1e-5 (later rounds' SVD refreshes amplify float rounding)."""
    base = {"train_args": {"client_num_in_total": 12, "client_num_per_round": 6, "comm_round": rounds}}
    seq = write_config(tmp_path / "seq.yaml", **base)
    par = write_config(tmp_path / "par.yaml", train_args={**base["train_args"], "parallel_clients": mode,
                                                         "parallel_processes": 2})
    run(_cli(seq, tmp_path / "seq"), tmp_path, "seq.log", timeout=180)
    log = run(_cli(par, tmp_path / "par"), tmp_path, "par.log", timeout=180)
    assert f"parallel_clients: {mode}" in log
    if mode == "vectorized":
        assert "a batched group trains with plain autograd" in log and "one after the other" not in log
    a, b = final_state(tmp_path / "seq"), final_state(tmp_path / "par")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), f"{mode} differs at {key}"
    acc_a = [r["test_acc"] for r in metrics(tmp_path / "seq")]
    acc_b = [r["test_acc"] for r in metrics(tmp_path / "par")]
    assert acc_b == pytest.approx(acc_a, abs=1e-3 if atol else 0)


def test_a_bad_parallel_mode_exits_2_before_any_work(tmp_path) -> None:
    cfg = write_config(tmp_path / "bad.yaml", train_args={"parallel_clients": "fast"})
    proc = start(_cli(cfg, tmp_path / "out"), tmp_path, "bad.log")
    proc.wait(timeout=60)
    text = (tmp_path / "bad.log").read_text()
    assert proc.returncode == 2, text
    assert "parallel_clients='fast' is invalid: allowed auto, sequential, processes, vectorized" in text
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_auto_picks_vectorized_on_cuda_and_processes_on_several_cores() -> None:
    assert resolve_mode("auto", "cuda:0", per_round=20, cores=16) == "vectorized"
    assert resolve_mode("auto", "cpu", per_round=10, cores=2) == "processes"
    assert resolve_mode("auto", "cpu", per_round=10, cores=1) == "sequential"
    assert resolve_mode("auto", "cpu", per_round=1, cores=8) == "sequential"
    assert resolve_mode("vectorized", "cpu", per_round=10, cores=2) == "vectorized"
    with pytest.raises(ValueError, match="parallel_clients='x' is invalid"):
        resolve_mode("x", "cpu", per_round=2)


