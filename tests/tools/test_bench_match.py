"""fedml-prism bench: equal-parameter matching, budget / gap columns, gap and diagnostics plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from fedml_prism.engine.config import PrismConfig
from fedml_prism.engine.principal import PrincipalModel
from fedml_prism.tools.bench import (
    PROFILES,
    ParamCounter,
    aggregate_rows,
    diagnostics_table,
    markdown_table,
    match_keep_ratio,
    plan_runs,
    write_results,
)
from fedml_prism.tools.cli import main
from fedml_prism.workloads.models import create_model

NAN = float("nan")


def _params(model: Any, strategy: str, keep: float) -> int:
    """Parameters of the client sub-model, built from scratch (no cache)."""
    pm = PrincipalModel(model, PrismConfig(strategy=strategy, keep_ratio=keep, kappa=2.5))
    return sum(p.numel() for p in pm.sample_submodel(0, 0, record=False).module.parameters())


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("resnet_tiny", {"width": 0.5}), ("cnn", {}), ("cnn", {"in_channels": 1, "image_size": 8, "width": 0.25, "hidden": 32})],
)
def test_matched_channel_baselines_hold_prism_parameter_count(name: str, kwargs: dict[str, Any]) -> None:
    model = create_model(name, **kwargs)
    target = _params(model, "prism", 0.2)
    counter = ParamCounter(model, PrismConfig(kappa=2.5))
    assert counter.count("prism", 0.2) == target
    for strategy in ("origdrop", "rolex"):
        keep = match_keep_ratio(model, strategy, target, PrismConfig(kappa=2.5), counter=counter)
        assert 0.2 < keep <= 1.0
        assert abs(_params(model, strategy, keep) - target) <= 0.02 * target
        assert _params(model, strategy, 0.2) < 0.5 * target  # unmatched, far smaller
    # the principal baselines hold exactly prism's count at the same keep ratio
    assert counter.count("orthdrop", 0.2) == counter.count("uniform", 0.2) == target
    assert counter.count("orthdrop", match_keep_ratio(model, "orthdrop", target, counter=counter)) == target


def test_match_keep_ratio_fails_when_no_step_is_close_enough() -> None:
    # the smoke CNN's origdrop counts step from 3,572 to 4,017 around prism's 3,674 at keep 0.5
    model = create_model("cnn", in_channels=1, image_size=8, width=0.25, hidden=32)
    target = _params(model, "prism", 0.5)
    with pytest.raises(ValueError, match=rf"origdrop.*{target:,}"):
        match_keep_ratio(model, "origdrop", target)
    with pytest.raises(ValueError, match="target_params"):
        match_keep_ratio(model, "rolex", 0)


def test_plan_runs_with_match_params(tmp_path: Path) -> None:
    overrides = {"keep_ratios": [0.2]}
    matched = plan_runs(PROFILES["smoke"], str(tmp_path), overrides, match="params")
    plain = plan_runs(PROFILES["smoke"], str(tmp_path), overrides)
    by = {key["strategy"]: (key, job) for key, job in matched}
    for key, job in matched:
        assert key["keep_ratio"] == (1.0 if key["strategy"] == "full" else 0.2)
        if key["strategy"] != "full":
            assert job.prism.keep_ratio == key["actual_keep"]
    assert by["full"][0]["actual_keep"] == 1.0
    for s in ("orthdrop", "uniform"):
        assert by[s][0]["actual_keep"] == by["prism"][0]["actual_keep"] == 0.2
    for s in ("origdrop", "rolex"):
        assert by[s][0]["actual_keep"] > by["prism"][0]["actual_keep"]
        assert f"k{by[s][0]['actual_keep']:g}" in by[s][1].settings.output_dir
    dirs = [job.settings.output_dir for _, job in matched]
    assert len(set(dirs)) == len(dirs)
    plain_dirs = {key["strategy"]: job.settings.output_dir for key, job in plain}
    assert all(key["actual_keep"] == key["keep_ratio"] for key, _ in plain)
    for s in ("origdrop", "rolex"):
        assert by[s][1].settings.output_dir != plain_dirs[s]
    for s in ("full", "prism", "orthdrop", "uniform"):  # identical runs share (and resume) their folder
        assert by[s][1].settings.output_dir == plain_dirs[s]
    # a profile can ask for matching itself; "none" turns it off; anything else is an error
    profile = dict(PROFILES["smoke"], match="params")
    from_profile = {k["strategy"]: k["actual_keep"] for k, _ in plan_runs(profile, str(tmp_path), overrides)}
    assert from_profile["origdrop"] == by["origdrop"][0]["actual_keep"]
    off = {k["strategy"]: k["actual_keep"] for k, _ in plan_runs(profile, str(tmp_path), overrides, match="none")}
    assert off["origdrop"] == 0.2
    with pytest.raises(ValueError, match="match='flops'"):
        plan_runs(PROFILES["smoke"], str(tmp_path), overrides, match="flops")


def test_cli_bench_match_params_runs_at_the_matched_keep(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench"
    args = ["bench", "--profile", "smoke", "--out", str(out), "--strategies", "origdrop", "--keep-ratios", "0.2",
            "--rounds", "1", "--match", "params"]
    assert main(args) == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    model = create_model("resnet_tiny", in_channels=1, width=0.25, num_classes=10)  # the smoke profile's
    target = _params(model, "prism", 0.2)  # the reference needs no prism run
    assert run["keep_ratio"] == 0.2 and run["actual_keep"] > 0.2 and f"k{run['actual_keep']:g}" in run["run_dir"]
    assert abs(run["client_params"] - target) <= 0.02 * target
    assert run["budget"] == pytest.approx(run["client_params"] / run["dense_params"])
    row = f"| iid | origdrop | weights only | 0.2 | {run['actual_keep']:.4g} | {100 * run['budget']:.1f} |"
    assert row in capsys.readouterr().out


def test_cli_match_rejects_a_bad_value(capsys) -> None:
    with pytest.raises(SystemExit) as err:
        main(["bench", "--match", "flops"])
    assert err.value.code == 2
    assert "--match" in capsys.readouterr().err


def _run(partition: str, strategy: str, keep: float, seed: int, final: float, params: int, dense: int = 1000,
         actual: float | None = None, curve: list[float] | None = None, **extra: Any) -> dict[str, Any]:
    row = {"partition": partition, "strategy": strategy, "keep_ratio": keep, "seed": seed,
           "actual_keep": keep if actual is None else actual, "final_acc": final, "best_acc": final,
           "client_params": params, "dense_params": dense, "budget": params / dense, "client_macs": 10 * params,
           "dense_macs": 10 * dense, "bytes_per_round": 4e6, "wall_s": 3.0,
           "curve": curve if curve is not None else [NAN, final - 0.1, final]}
    row.update(extra)
    return row


def test_markdown_table_budget_and_gap_columns() -> None:
    results = [
        _run("iid", "full", 1.0, 0, 0.80, 1000), _run("iid", "full", 1.0, 1, 0.82, 1000),
        _run("iid", "prism", 0.2, 0, 0.70, 240), _run("iid", "prism", 0.2, 1, 0.74, 240),
        _run("iid", "origdrop", 0.2, 0, 0.61, 236, actual=0.4921875),
        _run("noniid", "prism", 0.2, 0, 0.50, 240),
        # a row of an older bench: no actual keep / budget; the same partition's full run is the dense size
        {k: v for k, v in _run("iid", "rolex", 0.2, 0, 0.605, 40).items() if k not in ("actual_keep", "budget",
                                                                                       "dense_params")},
    ]
    rows = aggregate_rows(results)
    by = {(r["partition"], r["strategy"]): r for r in rows}
    assert by[("iid", "prism")]["gap_to_full"] == pytest.approx(0.72 - 0.81)
    assert by[("iid", "prism")]["budget"] == pytest.approx(0.24)
    assert by[("iid", "full")]["gap_to_full"] == pytest.approx(0.0)
    assert by[("noniid", "prism")]["gap_to_full"] is None
    assert by[("iid", "rolex")]["budget"] == pytest.approx(0.04) and by[("iid", "rolex")]["actual_keep"] == 0.2
    table = markdown_table(rows).splitlines()
    assert table[0].startswith("| partition | strategy | setting | keep | actual keep | budget (% of dense params) | "
                               "final acc (%) | gap to full (pts) |")
    lines = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table[2:]}
    assert lines[("iid", "prism")].startswith("| iid | prism |  | 0.2 | 0.2 | 24.0 | 72.00 ± 2.83 | -9.00 |")
    assert lines[("iid", "origdrop")].startswith("| iid | origdrop |  | 0.2 | 0.4922 | 23.6 | 61.00 ± 0.00 | -20.00 |")
    assert lines[("iid", "rolex")].startswith("| iid | rolex |  | 0.2 | 0.2 | 4.0 | 60.50 ± 0.00 | -20.50 |")
    assert lines[("iid", "full")].startswith("| iid | full |  | 1 | 1 | 100.0 | 81.00 ± 1.41 | +0.00 |")
    assert lines[("noniid", "prism")].startswith("| noniid | prism |  | 0.2 | 0.2 | 24.0 | 50.00 ± 0.00 |  |")


def _layers(energy: float, rank: int = 8, untrained: float = NAN) -> dict[str, dict[str, float]]:
    return {name: {"energy_kept": energy, "coverage": 0.5, "effective_rank": rank / 2, "rank": rank,
                   "delta_rel": 0.1, "delta_top": 0.2, "delta_rest": untrained} for name in ("conv2", "hidden")}


def _metrics(rounds: int, layers: bool, acc: float) -> list[dict[str, Any]]:
    rows = []
    for r in range(1, rounds + 1):
        row = {"round": r, "test_acc": acc if r % 2 == 0 else NAN, "train_loss": 2.0 / r,
               "start_loss": 2.5 / r if r % 2 == 0 else NAN, "dense_client_loss": NAN if r == rounds else 1.5 / r,
               "coverage": 0.5 if layers else 0.0}
        if layers and r > 1:  # round 1 of this fabricated run has no diagnostics (an older writer)
            row["layers"] = _layers(0.9 - 0.1 * r, untrained=0.01 * r if r < rounds else NAN)
        rows.append(row)
    return rows


def test_plots_and_diagnostics_on_fabricated_metrics(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    results = []
    runs = [("full", 1.0, False, 0.8), ("prism", 0.2, True, 0.7), ("orthdrop", 0.2, True, 0.65),
            ("origdrop", 0.2, False, 0.6), ("uniform", 0.2, True, 0.55)]
    for partition in ("iid", "dirichlet0.1"):
        for seed in (0, 1):
            for strategy, keep, layers, acc in runs:
                metrics = _metrics(4, layers, acc + 0.01 * seed)
                name = f"{partition}_{strategy}_k{keep:g}_s{seed}"
                if strategy == "uniform" and partition == "dirichlet0.1":
                    continue  # a principal run without metrics.json: left out of the diagnostics
                (out / "runs" / name).mkdir(parents=True)
                (out / "runs" / name / "metrics.json").write_text(json.dumps(metrics))
                extra = {"run_dir": f"runs/{name}"} if strategy != "orthdrop" else {}  # orthdrop: older row
                results.append(_run(partition, strategy, keep, seed, acc + 0.01 * seed, 240,
                                    curve=[m["test_acc"] for m in metrics], **extra))
        # the prism run at a second keep ratio is not in the diagnostics plot (first keep only)
        results.append(_run(partition, "prism", 0.5, 0, 0.75, 500))
    # a variant (ablation) of prism on iid only: its own row, and an ablations plot next to prism and full
    results.append(_run("iid", "prism-reset", 0.2, 0, 0.5, 240, curve=[0.2, NAN, 0.3, 0.4, 0.5]))
    write_results(str(out), "fake", results, 12.0)
    assert (out / "ablations_iid.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "ablations_dirichlet0.1.png").exists()
    variant = next(r for r in aggregate_rows(results) if r["strategy"] == "prism-reset")
    assert variant["last3_acc"] == pytest.approx(0.4) and variant["gap_to_full"] == pytest.approx(-0.305)
    for partition in ("iid", "dirichlet0.1"):
        for png in (f"accuracy_vs_round_{partition}.png", f"diagnostics_{partition}.png"):
            data = (out / png).read_bytes()
            assert data[:4] == b"\x89PNG" and len(data) > 1000
    assert (out / "accuracy_vs_keep_ratio.png").stat().st_size > 0
    summary = json.loads((out / "results.json").read_text())["summary"]
    prism = next(r for r in summary if (r["partition"], r["strategy"], r["keep_ratio"]) == ("iid", "prism", 0.2))
    assert prism["gap_to_full"] == pytest.approx(-0.1) and prism["budget"] == pytest.approx(0.24)
    assert prism["actual_keep"] == 0.2

    table = diagnostics_table(str(out))
    lines = {tuple(c.strip() for c in line.split("|")[1:4]): line for line in table.splitlines()[2:]}
    assert set(lines) == {("dirichlet0.1", "orthdrop", "0.2"), ("dirichlet0.1", "prism", "0.2"),
                          ("iid", "orthdrop", "0.2"), ("iid", "prism", "0.2"), ("iid", "uniform", "0.2")}
    # rounds 2-4 carry layers: energy (0.7 + 0.6 + 0.5) / 3, coverage 0.5, rank ratio (round 4) 0.5,
    # Δ top-k 0.2, Δ others (0.02 + 0.03) / 2 (round 4 is NaN); the diagnosed rounds 2 and 4 (finite
    # start loss): start (2.5/2 + 2.5/4) / 2, train (2/2 + 2/4) / 2, dense client 1.5/2 (round 4 NaN)
    assert lines[("iid", "prism", "0.2")] == (
        "| iid | prism | 0.2 | 0.600 | 0.500 | 0.500 | 0.200 | 0.025 | 0.938 | 0.750 | 0.750 |")
    md = (out / "results.md").read_text()
    assert "## Diagnostics" in md and lines[("iid", "prism", "0.2")] in md
    assert "| iid | prism |  | 0.2 | 0.2 | 24.0 | 70.50 ± 0.71 | -10.00 |" in md
    assert not math.isnan(prism["final_acc"][0])


def test_diagnostics_without_principal_metrics(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    (out / "runs" / "iid_full_k0.2_s0").mkdir(parents=True)
    (out / "runs" / "iid_full_k0.2_s0" / "metrics.json").write_text(json.dumps(_metrics(2, False, 0.8)))
    results = [_run("iid", "full", 1.0, 0, 0.8, 1000, run_dir="runs/iid_full_k0.2_s0"),
               _run("iid", "prism", 0.2, 0, 0.7, 240)]  # no run folder at all
    write_results(str(out), "fake", results, 1.0)
    assert diagnostics_table(str(out)).startswith("No per-round diagnostics")
    assert (out / "diagnostics_iid.png").stat().st_size > 0
    with pytest.raises(ValueError, match="results.json"):
        diagnostics_table(str(tmp_path / "nowhere"))


def test_variants_override_prism_args_and_sections_where_listed(tmp_path: Path) -> None:
    profile = dict(
        PROFILES["smoke"],
        strategies=["full", "prism", "prism-reset", "full-kaiming", "rolex"],
        keep_ratios=[0.2, 0.5],
        partitions=[("iid", None), ("dirichlet", 0.5)],
        variants={
            "prism-reset": {"prism_args": {"strategy": "prism", "optimizer_state": "reset", "kappa": 4.0},
                            "keep_ratios": [0.2], "partitions": ["dirichlet0.5"]},
            "full-kaiming": {"prism_args": {"strategy": "full"}, "keep_ratios": [0.2],
                             "sections": {"model_args": {"model_init": "kaiming_fan_out"}}},
            "rolex": {"keep_ratios": [0.5]},
        },
    )
    profile["sections"] = dict(profile["sections"], prism_args={"kappa": 2.5, "optimizer_state": "aggregate"})
    runs = {(k["partition"], k["strategy"], k["keep_ratio"]): job for k, job in plan_runs(profile, str(tmp_path), {})}
    reset = runs[("dirichlet0.5", "prism-reset", 0.2)]
    assert (reset.prism.strategy, reset.prism.optimizer_state, reset.prism.kappa) == ("prism", "reset", 4.0)
    assert ("iid", "prism-reset", 0.2) not in runs and ("dirichlet0.5", "prism-reset", 0.5) not in runs
    plain = runs[("dirichlet0.5", "prism", 0.2)]
    assert (plain.prism.optimizer_state, plain.prism.kappa, plain.model_init) == ("aggregate", 2.5, "default")
    kaiming = runs[("iid", "full-kaiming", 1.0)]
    assert kaiming.prism.strategy == "full" and kaiming.model_init == "kaiming_fan_out"
    assert kaiming.settings.output_dir != runs[("iid", "full", 1.0)].settings.output_dir
    assert {k for k in runs if k[1] == "rolex"} == {("iid", "rolex", 0.5), ("dirichlet0.5", "rolex", 0.5)}
