"""benchmarks/fidelity_variants.py: the variants' gaps to the baselines of the same bench, and the long
horizon's rank table, computed from results.json and each run's metrics.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fidelity_variants.py"


@pytest.fixture(scope="module")
def fv():
    spec = importlib.util.spec_from_file_location("fidelity_variants", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(folder: Path, finals: dict[tuple[str, str, int], float], rounds: int = 3) -> None:
    runs = []
    for (part, strategy, seed), acc in finals.items():
        keep = 1.0 if strategy == "full" else 0.2
        rel = f"runs/{part}_{strategy}_s{seed}"
        (folder / rel).mkdir(parents=True)
        layers = {"l1": {"rank": 10, "effective_rank": 4.0, "coverage": 0.5, "energy_kept": 0.6},
                  "l2": {"rank": 20, "effective_rank": 12.0, "coverage": 0.7, "energy_kept": 0.4}}
        metrics = [{"round": r + 1, "test_acc": acc - 0.01 * (rounds - 1 - r), "start_loss": 1.5, "dense_client_loss": 1.25,
                    "layers": {} if strategy == "full" else layers} for r in range(rounds)]
        (folder / rel / "metrics.json").write_text(json.dumps(metrics))
        runs.append({"partition": part, "strategy": strategy, "seed": seed, "keep_ratio": keep, "actual_keep": keep,
                     "final_acc": acc, "curve": [m["test_acc"] for m in metrics], "run_dir": rel})
    (folder / "results.json").write_text(json.dumps({"runs": runs}))


def test_gaps_are_differences_of_seed_means_within_the_bench(tmp_path, fv) -> None:
    finals = {}
    for seed, shift in ((0, 0.0), (1, 0.02)):
        finals.update({("dir", "full", seed): 0.50 + shift, ("dir", "orthdrop", seed): 0.44 + shift,
                       ("dir", "origdrop", seed): 0.42 + shift, ("dir", "prism", seed): 0.40 + shift,
                       ("dir", "prism-x", seed): 0.46 + shift})
    _bench(tmp_path, finals)
    cmp = fv.compare(str(tmp_path))
    assert cmp["seeds"] == [0, 1]
    rows = {r["variant"]: r for r in cmp["partitions"]["dir"]["variants"]}
    assert set(rows) == {"prism", "prism-x"}
    x = rows["prism-x"]
    assert x["final"] == pytest.approx(47.0)
    assert x["gap_full"] == pytest.approx(-4.0) and x["gap_orthdrop"] == pytest.approx(2.0)
    assert x["gap_origdrop"] == pytest.approx(4.0)
    assert x["last3"] == pytest.approx(46.0)  # mean of 45, 46, 47
    assert x["rank_ratio"] == pytest.approx((0.4 + 0.6) / 2) and x["coverage"] == pytest.approx(0.6)
    assert x["loss_handicap"] == pytest.approx(0.25)
    text = fv.markdown(cmp)
    assert "| prism-x | 47.00 | 46.00 | -4.00 | +2.00 | +4.00 |" in text


def test_the_long_table_samples_the_rounds_each_run_reached(tmp_path, fv) -> None:
    _bench(tmp_path, {("dir", "prism", 0): 0.5, ("dir", "full", 0): 0.6}, rounds=12)
    data = fv.rank_over_rounds(str(tmp_path))
    assert sorted(data["prism"]) == [1, 10]
    assert data["prism"][10]["rank_ratio"] == pytest.approx(0.5)
    assert data["prism"][10]["acc"] == pytest.approx(100 * (0.5 - 0.02))
    assert data["full"][10]["rank_ratio"] != data["full"][10]["rank_ratio"]  # NaN: no factorized layers
    assert "| prism |" in fv.long_markdown(data)
