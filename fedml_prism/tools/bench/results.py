"""A bench's output files: ``results.json``, ``results.md`` and the plots."""

from __future__ import annotations

import json
import os
from typing import Any

from .plots import plot_accuracy, plot_diagnostics
from .rows import at_best_learning_rate, num
from .tables import aggregate_rows, diagnostics_table, markdown_table, sweep_table


def write_results(
    out_dir: str, profile: str, results: list[dict[str, Any]], elapsed: float, plots: bool = True
) -> None:
    """``results.json``, ``results.md`` (results and diagnostics tables) and, with ``plots``, the plots."""
    os.makedirs(out_dir, exist_ok=True)
    shown = at_best_learning_rate(results)
    for r in results:
        if r.get("learning_rate") is not None:
            r["at_best_lr"] = any(r is s for s in shown)
    rows = aggregate_rows(shown)
    sweep = sweep_table(results)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"profile": profile, "elapsed_s": elapsed, "runs": results, "summary": rows}, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(f"# fedml-prism bench, profile `{profile}`\n\n{markdown_table(rows)}\n\n"
                + (f"## Learning-rate sweep\n\nFinal accuracy (%), mean over the seeds run at each rate (their number "
                   f"in brackets); the table above shows each strategy at its best rate (*).\n\n{sweep}\n\n" if sweep else "")
                +
                f"Total wall time: {elapsed / 60:.1f} min (this invocation); the runs' own wall times sum to "
                f"{sum(num(r.get('wall_s')) for r in results) / 60:.1f} min.\n\n## Diagnostics\n\n"
                "Runs with factorized layers, first seed; layer means averaged over the rounds "
                "(effective rank: last round); losses averaged over the diagnosed rounds.\n\n"
                f"{diagnostics_table(out_dir)}\n")
    if plots:
        plot_accuracy(out_dir, shown)
        plot_diagnostics(out_dir, shown)
