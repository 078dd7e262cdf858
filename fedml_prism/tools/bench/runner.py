"""Running a profile: plan, load the data once, run each job (resumable), write the results after each; a
learning-rate sweep runs its sweep seeds first, then the other seeds at each strategy's best rate."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from ...job import Job, load_data
from ...runtimes.simulation import run_method, run_sp, submodel_peak_train_mb, summarize
from ...strategies import OTHER_METHODS
from .plan import plan_runs
from .profiles import resolve_profile
from .results import write_results
from .rows import best_learning_rates, num, read_metrics

log = logging.getLogger("fedml_prism")


def _run_one(job: Job, profile: Mapping[str, Any], example: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train one planned job (from its checkpoint when there is one): its summary with the client costs,
    and its metrics rows."""
    if job.prism.strategy in OTHER_METHODS:
        row = dict(run_method(job, resume=True, progress=False))
        return row, read_metrics(job.settings.output_dir) or []
    server = run_sp(job, resume=True, progress=False)
    row = dict(summarize(server, example))
    row["dense_params"] = sum(p.numel() for p in server.pm.dense_model().parameters())
    if profile.get("memory"):
        row["peak_train_mb"] = submodel_peak_train_mb(job, server, example)
    return row, read_metrics(job.settings.output_dir) or server.metrics


def run_bench(
    profile_name: str, out_dir: str, overrides: dict[str, Any] | None = None, match: str | None = None
) -> list[dict[str, Any]]:
    """Run a profile (a shipped profile's name or the path of a profile file); returns the result rows
    (also written to ``out_dir``). ``match``: ``"params"`` for equal-budget runs, ``"none"`` for nominal
    keep ratios, None for the profile's setting."""
    label, profile = resolve_profile(profile_name)
    overrides = overrides or {}
    out_dir = os.path.abspath(out_dir)
    runs = plan_runs(profile, out_dir, overrides, match=match)
    # loads the data once before any training: missing dataset files fail here, and every run
    # shares the dataset, so one real sample probes every run's costs in the data's dtype and shape
    example = load_data(runs[0][1]).x_train[:1].clone()
    results: list[dict[str, Any]] = []
    started = time.time()
    last_plot = [started]

    def play(planned: list[tuple[dict, Job]], total: int) -> None:
        for key, job in planned:
            log.info("bench %d/%d: %s", len(results) + 1, total, key)
            row = dict(key)
            summary, metrics = _run_one(job, profile, example)
            row.update(summary)
            row["strategy"] = key["strategy"]  # a variant's name, not its base strategy
            row["base_strategy"] = job.prism.strategy
            row["keep_ratio"] = key["keep_ratio"]
            row["actual_keep"] = key["actual_keep"]
            row["budget"] = row["client_params"] / row["dense_params"]
            row["curve"] = [num(m.get("test_acc")) for m in metrics]
            row["run_dir"] = os.path.relpath(job.settings.output_dir, out_dir)
            results.append(row)
            # tables after every run; plots at the end and at most once a minute in between
            plots = len(results) == total or time.time() - last_plot[0] > 60
            write_results(out_dir, label, results, time.time() - started, plots=plots)
            last_plot[0] = time.time() if plots else last_plot[0]

    play(runs, len(runs))
    # a learning-rate sweep's other seeds: each strategy at its best rate on the sweep seeds
    done = {job.settings.output_dir for _, job in runs}
    rest = [(k, j) for k, j in plan_runs(profile, out_dir, overrides, match=match, best_lr=best_learning_rates(results))
            if j.settings.output_dir not in done]
    if rest:
        play(rest, len(runs) + len(rest))
    return results
