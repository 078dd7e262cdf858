"""fedml-prism bench (smoke profile) and the rank analysis."""

from __future__ import annotations

import json

import pytest
import torch

from fedml_prism.engine import server as server_module
from fedml_prism.engine.rank import effective_kernels
from fedml_prism.tools.cli import main
from fedml_prism.workloads.data import load_federated


def _count_local_training(monkeypatch) -> list[int]:
    """Count every local training run (one per client per round) in this process."""
    calls: list[int] = []
    real = server_module.local_train

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(server_module, "local_train", counting)
    return calls


def test_bench_smoke_profile_writes_results_table_and_plots(tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "--profile", "smoke", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    strategies = {(r["strategy"], r["keep_ratio"]) for r in results["runs"]}
    assert ("full", 1.0) in strategies
    for s in ("prism", "orthdrop", "origdrop", "rolex", "uniform"):
        assert {(s, 0.2), (s, 0.5)} <= strategies
    for r in results["runs"]:
        assert len(r["curve"]) == 3 and 0 <= r["final_acc"] <= 1 and r["client_params"] > 0
    by = {(r["strategy"], r["keep_ratio"]): r for r in results["runs"]}
    assert by[("prism", 0.2)]["client_params"] < by[("prism", 0.5)]["client_params"] < by[("full", 1.0)]["client_params"]
    row = "| iid | prism | weights only | 0.2 |"
    assert row in (out / "results.md").read_text() and row in table
    for r in results["runs"]:
        assert r["actual_keep"] == r["keep_ratio"] and r["budget"] == pytest.approx(r["client_params"] / r["dense_params"])
        assert (out / r["run_dir"] / "metrics.json").is_file()
    assert "| iid | full | weights only; clients train the full model | 1 | 1 | 100.0 |" in table
    assert "## Diagnostics" in (out / "results.md").read_text()
    for png in ("accuracy_vs_round_iid.png", "accuracy_vs_keep_ratio.png", "diagnostics_iid.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    calls = _count_local_training(monkeypatch)
    # a re-run takes every finished run from its checkpoint: no client trains again
    assert main(["bench", "--profile", "smoke", "--out", str(out), "--strategies", "prism", "--keep-ratios", "0.2"]) == 0
    again = json.loads((out / "results.json").read_text())["runs"][0]
    assert again["curve"] == by[("prism", 0.2)]["curve"] and calls == []
    # a half-done run continues from its checkpoint round: rounds 2 and 3 only (3 clients each)
    half = tmp_path / "half"
    one = ["bench", "--profile", "smoke", "--out", str(half), "--strategies", "prism", "--keep-ratios", "0.5"]
    assert main([*one, "--rounds", "1"]) == 0
    assert len(calls) == 3
    assert main(one) == 0
    assert len(calls) == 9, "the resumed run trained more than its missing rounds"
    resumed = json.loads((half / "results.json").read_text())["runs"][0]
    assert resumed["curve"] == by[("prism", 0.5)]["curve"]
    a = torch.load(out / by[("prism", 0.5)]["run_dir"] / "checkpoint.pt", weights_only=True)["server"]
    b = torch.load(half / resumed["run_dir"] / "checkpoint.pt", weights_only=True)["server"]
    assert a["rounds_done"] == b["rounds_done"] == 3
    for key, value in a["dense"].items():
        assert torch.equal(value, b["dense"][key]), key
    assert a["factors"].keys() == b["factors"].keys() and a["factors"]
    for name, f in a["factors"].items():
        assert all(torch.equal(f[part], b["factors"][name][part]) for part in ("u", "sigma", "v")), name


def test_rank_command_on_a_checkpoint(tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "--profile", "smoke", "--out", str(out), "--strategies", "prism", "--keep-ratios", "0.5"]) == 0
    ckpt = next(out.glob("runs/*/checkpoint.pt"))
    capsys.readouterr()
    assert main(["rank", "--checkpoint", str(ckpt), "--plot", str(tmp_path / "rank.png"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"layers.0.0.conv2", "layers.1.0.conv2"} <= {r["layer"] for r in report}
    assert all(1 <= r["effective_kernels"] <= r["rank"] for r in report)
    assert (tmp_path / "rank.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["rank", "--checkpoint", str(tmp_path / "nope.pt")]) == 2


def test_effective_kernels_measure() -> None:
    assert effective_kernels(torch.ones(16)) == pytest.approx(16)
    assert effective_kernels(torch.tensor([100.0] + [1e-3] * 15)) == pytest.approx(1, abs=1e-3)
    mid = effective_kernels(torch.linspace(1, 0.1, 32))
    assert 1 < mid < 32


def test_file_datasets_need_a_path() -> None:
    with pytest.raises(ValueError, match="dataset='cifar10' needs data_path"):
        load_federated("cifar10", 10, "iid", 0.5, 0)
    with pytest.raises(ValueError, match="dataset='svhn' is invalid"):
        load_federated("svhn", 10, "iid", 0.5, 0)


def test_bench_smoke_runs_the_other_methods_next_to_prism(tmp_path, capsys) -> None:
    """``fedml-prism bench --profile smoke --strategies prism,layerwise,fedgkt,superfed`` (issue 12):
    every method on the same partition, seed and rounds, with its setting, client costs and curve."""
    out = tmp_path / "methods"
    argv = ["bench", "--profile", "smoke", "--out", str(out), "--strategies", "prism,layerwise,fedgkt,superfed,full",
            "--keep-ratios", "0.2"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    runs = {r["strategy"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert set(runs) == {"prism", "layerwise", "fedgkt", "superfed", "full"}
    dense = runs["full"]["client_params"]
    for name, r in runs.items():
        assert len(r["curve"]) == 3 and 0 <= r["final_acc"] <= 1 and r["dense_params"] == dense, name
        assert (out / r["run_dir"] / "metrics.json").is_file()
    assert runs["fedgkt"]["setting"] == "shares features, logits and labels"
    assert runs["superfed"]["setting"] == "one client trains the full model" and runs["superfed"]["client_params"] == dense
    assert runs["layerwise"]["setting"] == runs["prism"]["setting"] == "weights only"
    for name in ("layerwise", "fedgkt"):
        assert 0 < runs[name]["client_params"] < dense and runs[name]["peak_train_mb"] > 0
    assert "| iid | fedgkt | shares features, logits and labels | — | — |" in table
    # the same clients per round as PriSM: every method trained 3 clients in each of 3 rounds
    for name in ("layerwise", "fedgkt", "superfed"):
        rows = json.loads((out / runs[name]["run_dir"] / "metrics.json").read_text())
        assert [row["clients"] for row in rows] == [3, 3, 3], name
