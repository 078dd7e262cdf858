"""Issue 21's comparison: every PriSM variant of the ``fidelity_variants`` bench against full FedAvg,
OrthDrop and OrigDrop at equal budget run side by side in the same bench, mean of seeds, per partition.

    .venv/bin/python benchmarks/fidelity_variants.py     # reads benchmarks/results/fidelity_variants/results.json,
                                                         # writes comparison.{json,md} beside it, and
                                                         # fidelity_300/rank_over_rounds.{json,md}

Diagnostics per PriSM row (layer means over the rounds, mean of seeds): energy kept, coverage, effective
rank / rank at the last round, and the sub-model's loss before training minus the dense model's on the
same client data (the handicap of a sampled sub-model, docs/fidelity.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from fedml_prism.tools.bench.rows import fmean, layer_mean, num, rank_ratio, read_metrics, run_dir  # noqa: E402
from fedml_prism.tools.bench.tables import run_diagnostics  # noqa: E402

BASELINES = {"full": "full", "orthdrop": "OrthDrop", "origdrop": "OrigDrop (equal params)"}
#: the targets of issue 21 (points, Dirichlet 0.1 against OrthDrop / OrigDrop, iid against full)
TARGETS = {"orthdrop": 3.0, "origdrop": 3.0, "full_iid": -3.0}


def _runs(folder: str) -> list[dict[str, Any]]:
    with open(os.path.join(folder, "results.json")) as f:
        runs = json.load(f)["runs"]
    for r in runs:
        r["_dir"] = run_dir(folder, r)
    return runs


def _last3(run: dict[str, Any]) -> float:
    curve = [num(a) for a in run.get("curve") or []]
    evaluated = [a for a in curve if a == a]
    return fmean(evaluated[-3:])


def compare(folder: str) -> dict[str, Any]:
    runs = _runs(folder)
    keep = min(r["keep_ratio"] for r in runs)  # the bench's keep ratio (full FedAvg's rows say 1)
    runs = [r for r in runs if r["strategy"] == "full" or r["keep_ratio"] == keep]
    seeds = sorted({r["seed"] for r in runs})
    out: dict[str, Any] = {"seeds": seeds, "keep_ratio": keep, "partitions": {}}
    for part in dict.fromkeys(r["partition"] for r in runs):
        here = [r for r in runs if r["partition"] == part]
        base = {}
        for name in BASELINES:
            rows = [r for r in here if r["strategy"] == name]
            base[name] = {"final": 100 * fmean(r["final_acc"] for r in rows), "last3": 100 * fmean(_last3(r) for r in rows),
                          "seeds": sorted(r["seed"] for r in rows), "actual_keep": rows[0]["actual_keep"] if rows else None}
        variants = []
        for name in dict.fromkeys(r["strategy"] for r in here if r["strategy"] not in BASELINES):
            rows = [r for r in here if r["strategy"] == name]
            diags = [run_diagnostics(read_metrics(r["_dir"]) or []) or {} for r in rows]
            final = 100 * fmean(r["final_acc"] for r in rows)
            variants.append({
                "variant": name, "seeds": sorted(r["seed"] for r in rows), "final": final,
                "per_seed": {r["seed"]: 100 * r["final_acc"] for r in rows}, "last3": 100 * fmean(_last3(r) for r in rows),
                **{f"gap_{b}": final - base[b]["final"] for b in BASELINES},
                **{k: fmean(d.get(k) for d in diags) for k in ("energy_kept", "coverage", "rank_ratio")},
                "loss_handicap": fmean(num(d.get("start_loss")) - num(d.get("dense_client_loss")) for d in diags),
            })
        out["partitions"][part] = {"baselines": base, "variants": variants}
    return out


def markdown(cmp: dict[str, Any]) -> str:
    lines = [f"Mean of seeds {cmp['seeds']}, keep {cmp['keep_ratio']:g}, final test accuracy (%); gaps in points; "
             "OrigDrop at PriSM's parameter budget (its actual keep in results.md).", ""]
    for part, data in cmp["partitions"].items():
        b = data["baselines"]
        lines += [f"### {part}", "",
                  "| | final acc | last 3 evals | gap to full | gap to OrthDrop | gap to OrigDrop | energy kept | coverage | "
                  "eff. rank / rank | sub-model loss − dense loss |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, label in BASELINES.items():
            lines.append(f"| {label} | {b[name]['final']:.2f} | {b[name]['last3']:.2f} | | | | | | | |")
        for r in data["variants"]:
            lines.append(f"| {r['variant']} | {r['final']:.2f} | {r['last3']:.2f} | {r['gap_full']:+.2f} | "
                         f"{r['gap_orthdrop']:+.2f} | {r['gap_origdrop']:+.2f} | {r['energy_kept']:.3f} | "
                         f"{r['coverage']:.3f} | {r['rank_ratio']:.3f} | {r['loss_handicap']:+.3f} |")
        lines.append("")
    lines.append(f"Targets (Dirichlet 0.1): ≥ OrthDrop + {TARGETS['orthdrop']:g} and ≥ OrigDrop + {TARGETS['origdrop']:g}; "
                 f"iid: ≥ full {TARGETS['full_iid']:g}.")
    return "\n".join(lines) + "\n"


#: the rounds at which the long-horizon table samples each run
LONG_ROUNDS = (1, 10, 30, 50, 100, 150, 200, 250, 300)


def rank_over_rounds(folder: str) -> dict[str, Any]:
    """Per run of the long-horizon bench: test accuracy, effective rank / rank (layer mean) and coverage of the
    round at :data:`LONG_ROUNDS` (the accuracy of the last evaluation at or before it)."""
    out: dict[str, Any] = {}
    for r in _runs(folder):
        metrics = read_metrics(r["_dir"]) or []
        rows = {}
        for target in LONG_ROUNDS:
            upto = [m for m in metrics if int(m.get("round", 0)) <= target]
            if len(upto) < target:
                continue
            m = upto[-1]
            acc = [num(x.get("test_acc")) for x in upto if num(x.get("test_acc")) == num(x.get("test_acc"))]
            rows[target] = {"acc": 100 * acc[-1] if acc else float("nan"),
                            "rank_ratio": rank_ratio(m) if m.get("layers") else float("nan"),
                            "coverage": layer_mean(m, "coverage") if m.get("layers") else float("nan")}
        out[r["strategy"]] = rows
    return out


def long_markdown(data: dict[str, Any]) -> str:
    rounds = [t for t in LONG_ROUNDS if any(t in rows for rows in data.values())]
    head = "| strategy | " + " | ".join(f"r{t}" for t in rounds) + " |"
    rule = "|---|" + "---|" * len(rounds)
    parts = []
    for field, label, digits in (("acc", "test accuracy (%), last evaluation at or before the round", 1),
                                 ("rank_ratio", "effective rank / rank (layer mean)", 3),
                                 ("coverage", "coverage: share of components trained that round (layer mean)", 2)):
        lines = [f"**{label}**", "", head, rule]
        for name, rows in data.items():
            cells = [f"{rows[t][field]:.{digits}f}" if t in rows and rows[t][field] == rows[t][field] else "" for t in rounds]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=os.path.join(HERE, "results", "fidelity_variants"),
                    help="the variants bench's output folder")
    ap.add_argument("--long-results", default=os.path.join(HERE, "results", "fidelity_300"),
                    help="the fidelity_300 bench's output folder")
    args = ap.parse_args(argv)
    folder = args.results
    cmp = compare(folder)
    with open(os.path.join(folder, "comparison.json"), "w") as f:
        json.dump(cmp, f, indent=1)
    text = markdown(cmp)
    with open(os.path.join(folder, "comparison.md"), "w") as f:
        f.write(text)
    print(text)
    if os.path.isfile(os.path.join(args.long_results, "results.json")):
        long = rank_over_rounds(args.long_results)
        with open(os.path.join(args.long_results, "rank_over_rounds.json"), "w") as f:
            json.dump(long, f, indent=1)
        text = long_markdown(long)
        with open(os.path.join(args.long_results, "rank_over_rounds.md"), "w") as f:
            f.write(text)
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
