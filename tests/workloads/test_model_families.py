"""Every built-in model family end to end: ``fedml-prism run`` (sp) and ``fedml-prism bench`` on data
written in the loaders' real on-disk formats, down to the summary table and ``summary.json``.

The token models (``char_lstm``, ``lstm_imdb``) once trained every round and then crashed in the
summary, whose cost probe fed float zeros to their embedding; these tests would catch that again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from data_utils import write_cifar10, write_fed_shakespeare, write_femnist, write_imdb
from runtime_utils import BIN, run, write_config

from fedml_prism.runtimes.simulation import format_table
from fedml_prism.tools import bench
from fedml_prism.tools.cli import main

KEEP = 0.3


@dataclass(frozen=True)
class Family:
    """One model family: its model, the dataset it trains on and how to write that dataset."""

    model: str
    model_kwargs: dict[str, Any]
    dataset: str
    write: Callable[[Path], Path]
    data_kwargs: dict[str, Any] | None = None
    partition_method: str = "iid"


FAMILIES = {
    "cnn": Family("cnn", {"in_channels": 1, "image_size": 28, "width": 0.125, "hidden": 16, "num_classes": 62},
                  "femnist", write_femnist, partition_method="natural"),
    "resnet": Family("resnet_tiny", {"width": 0.125, "num_classes": 10}, "cifar10", write_cifar10),
    "vit": Family("vit_small", {"image_size": 32, "patch": 8, "dim": 16, "depth": 1, "heads": 2, "num_classes": 10},
                  "cifar10", write_cifar10),
    "char_lstm": Family("char_lstm", {"embed_dim": 4, "hidden": 8}, "fed_shakespeare", write_fed_shakespeare,
                        partition_method="natural"),
    "lstm_imdb": Family("lstm_imdb", {"vocab_size": 20, "embed_dim": 4, "hidden": 8}, "imdb", write_imdb,
                        data_kwargs={"vocab_size": 20, "max_len": 12}),
}


def _sections(family: Family, data_path: Path) -> dict[str, dict[str, Any]]:
    """Config sections of a one-round, 4-client run of ``family`` on the data at ``data_path``."""
    data = {"dataset": family.dataset, "data_path": str(data_path), "partition_method": family.partition_method}
    if family.data_kwargs:
        data["data_kwargs"] = family.data_kwargs
    return {
        "data_args": data,
        "model_args": {"model": family.model, "model_kwargs": family.model_kwargs},
        "train_args": {"client_num_in_total": 4, "client_num_per_round": 2, "comm_round": 1, "batch_size": 8},
        "prism_args": {"keep_ratio": KEEP},
    }


def _assert_summary_row(row: dict[str, Any], strategy: str, keep: float) -> None:
    assert row["strategy"] == strategy and row["keep_ratio"] == pytest.approx(keep)
    assert 0 <= row["final_acc"] <= 1 and 0 <= row["best_acc"] <= 1
    assert row["client_params"] > 0 and row["client_macs"] > 0 and row["dense_macs"] > 0
    assert row["bytes_per_round"] > 0


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_run_prints_summary_for_every_model_family(name: str, tmp_path: Path) -> None:
    family = FAMILIES[name]
    data_path = family.write(tmp_path / "data")
    sections = _sections(family, data_path)
    sections["train_args"]["compare_strategies"] = ["full"]
    cfg = write_config(tmp_path / f"{name}.yaml", **sections)
    out = tmp_path / "out"
    log = run([str(BIN / "fedml-prism"), "run", "--cf", str(cfg), "--output-dir", str(out)], tmp_path, "run.log",
              timeout=150)

    rows = json.loads((out / "summary.json").read_text())
    assert [r["strategy"] for r in rows] == ["prism", "full"]
    prism, full = rows
    _assert_summary_row(prism, "prism", KEEP)
    _assert_summary_row(full, "full", 1.0)
    # full FedAvg trains the dense model; PriSM's client sub-model is physically smaller
    assert full["client_macs"] == full["dense_macs"] == prism["dense_macs"]
    assert prism["client_params"] < full["client_params"] and prism["client_macs"] < full["client_macs"]
    for strategy in ("prism", "full"):
        assert [m["round"] for m in json.loads((out / strategy / "metrics.json").read_text())] == [1]

    header = format_table([]).splitlines()[0]
    assert header in log.splitlines()
    for r in rows:  # the printed table holds the same numbers as summary.json
        line = (rf"^{r['strategy']}\s+{r['keep_ratio']:.2f}\s+{r['final_acc']:.4f}\s+{r['best_acc']:.4f}"
                rf"\s+{r['client_params']:,}\s+{r['client_macs']:,}\s")
        assert re.search(line, log, re.MULTILINE), f"no table row for {r['strategy']} in:\n{log[-3000:]}"
    assert (out / "summary.md").read_text().startswith(header)


@pytest.mark.parametrize("name", ["char_lstm", "lstm_imdb"])
def test_bench_runs_token_models(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    family = FAMILIES[name]
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sections = _sections(family, family.write(tmp_path / "data"))
    sections["train_args"]["torch_threads"] = 1
    monkeypatch.setitem(bench.PROFILES, "families", {
        "sections": sections, "strategies": ["full", "prism"], "keep_ratios": [KEEP], "partitions": [("iid", None)],
        "seeds": [0],
    })
    out = tmp_path / "bench"
    assert main(["bench", "--profile", "families", "--out", str(out)]) == 0

    table = capsys.readouterr().out
    assert table.startswith("| partition | strategy | setting | keep |")
    runs = {r["strategy"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert set(runs) == {"full", "prism"}
    _assert_summary_row(runs["prism"], "prism", KEEP)
    _assert_summary_row(runs["full"], "full", 1.0)
    assert runs["full"]["client_macs"] == runs["full"]["dense_macs"] > runs["prism"]["client_macs"]
    for strategy, r in runs.items():
        assert len(r["curve"]) == 1
        assert f"| iid | {strategy} | {r['setting']} | {r['keep_ratio']:g} |" in table
        assert f"| {r['client_params']:,} | {r['client_macs']:,} |" in table
