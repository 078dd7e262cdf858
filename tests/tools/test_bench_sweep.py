"""The bench's learning-rate sweep (issue 22): the same grid for every strategy on the sweep seeds, the
other seeds at each strategy's best rate, and tables that show each strategy at that rate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedml_prism.tools.bench import PROFILE_DIR, load_profile_file, plan_runs
from fedml_prism.tools.bench.rows import at_best_learning_rate, best_learning_rates
from fedml_prism.tools.bench.tables import sweep_table
from fedml_prism.tools.cli import main


def _profile(tmp_path: Path, **changes: Any) -> Path:
    data = yaml.safe_load((PROFILE_DIR / "smoke.yaml").read_text())
    data.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_sweep_seeds_run_the_grid_and_the_others_the_best_rate(tmp_path: Path) -> None:
    profile = load_profile_file(_profile(
        tmp_path, strategies=["full", "prism", "fixed"], keep_ratios=[0.5], seeds=[0, 1, 2], sweep_seeds=[0, 1],
        learning_rates=[0.01, 0.05],
        variants={"fixed": {"prism_args": {"strategy": "prism"}, "learning_rates": [0.2], "seeds": [1, 2]}}))
    first = plan_runs(profile, str(tmp_path), {})
    got = sorted((k["strategy"], k["seed"], k["learning_rate"]) for k, _ in first)
    assert got == sorted([(s, seed, lr) for s in ("full", "prism") for seed in (0, 1) for lr in (0.01, 0.05)]
                         + [("fixed", 1, 0.2)])  # a variant runs at its own seeds only
    for key, job in first:  # the rate reaches the run and names its folder
        assert job.settings.learning_rate == key["learning_rate"]
        assert job.settings.output_dir.endswith(f"_lr{key['learning_rate']:g}_s{key['seed']}")
    best = {("iid", 1.0, "full"): 0.05, ("iid", 0.5, "prism"): 0.01, ("iid", 0.5, "fixed"): 0.2}
    second = [(k["strategy"], k["seed"], k["learning_rate"]) for k, _ in plan_runs(profile, str(tmp_path), {}, best_lr=best)
              if k["seed"] == 2]
    assert sorted(second) == [("fixed", 2, 0.2), ("full", 2, 0.05), ("prism", 2, 0.01)]
    with pytest.raises(ValueError, match=r"--seeds \[2\] is invalid for this profile: it holds none of its sweep_seeds"):
        plan_runs(profile, str(tmp_path), {"seeds": [2]})


def _row(strategy: str, lr: float, seed: int, acc: float) -> dict[str, Any]:
    return {"partition": "iid", "keep_ratio": 1.0, "strategy": strategy, "learning_rate": lr, "seed": seed,
            "final_acc": acc}


def test_the_best_rate_is_the_best_mean_over_the_seeds_that_ran_every_rate() -> None:
    rows = [_row("a", 0.1, 0, 0.50), _row("a", 0.2, 0, 0.40), _row("a", 0.1, 1, 0.30), _row("a", 0.2, 1, 0.45),
            _row("a", 0.2, 2, 0.99),  # seed 2 ran only one rate: it does not vote
            _row("b", 0.1, 0, 0.60), _row("b", 0.2, 0, 0.60),  # a tie goes to the smaller rate
            {"partition": "iid", "keep_ratio": 1.0, "strategy": "c", "seed": 0, "final_acc": 0.1}]  # no sweep
    best = best_learning_rates(rows)
    assert best == {("iid", 1.0, "a"): 0.2, ("iid", 1.0, "b"): 0.1}  # a: 0.425 at 0.2 vs 0.40 at 0.1
    shown = at_best_learning_rate(rows)
    assert [(r["strategy"], r.get("learning_rate"), r["seed"]) for r in shown] == [
        ("a", 0.2, 0), ("a", 0.2, 1), ("a", 0.2, 2), ("b", 0.1, 0), ("c", None, 0)]
    table = sweep_table(rows).splitlines()
    assert table[0] == "| partition | strategy | keep | lr 0.1 | lr 0.2 |"
    assert table[2] == "| iid | a | 1 | 40.00 (2) | 61.33* (3) |"
    assert sweep_table([rows[-1]]) == ""


def test_cli_sweep_end_to_end(tmp_path: Path, capsys) -> None:
    path = _profile(tmp_path, strategies=["full"], seeds=[0, 1], sweep_seeds=[0], learning_rates=[0.001, 0.1])
    out = tmp_path / "out"
    assert main(["bench", "--profile", str(path), "--out", str(out), "--rounds", "2"]) == 0
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    runs = {(r["seed"], r["learning_rate"]): r for r in results["runs"]}
    assert set(runs) == {(0, 0.001), (0, 0.1), (1, 0.1)}  # 0.1 learns, 0.001 barely moves in 2 rounds
    assert runs[(0, 0.1)]["final_acc"] > runs[(0, 0.001)]["final_acc"]
    assert [r["at_best_lr"] for r in results["runs"]] == [False, True, True]
    (summary,) = results["summary"]
    assert summary["seeds"] == 2 and summary["learning_rate"] == 0.1
    text = (out / "results.md").read_text()
    assert "| iid | full | weights only; clients train the full model; lr 0.1 |" in text
    assert "## Learning-rate sweep" in text and "| iid | full | 1 |" in text
    # a re-run finds every run done and plans nothing new
    assert main(["bench", "--profile", str(path), "--out", str(out), "--rounds", "2"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert [(r["seed"], r["learning_rate"], r["final_acc"]) for r in again["runs"]] == [
        (r["seed"], r["learning_rate"], r["final_acc"]) for r in results["runs"]]
