"""``fedml-prism bench``: strategies side by side on the same partition, seeds and schedule.

Every run goes through the same runtime code as ``fedml-prism run`` (a :class:`~fedml_prism.job.Job`
driven by :func:`~fedml_prism.runtimes.simulation.run_sp`). Outputs in ``--out``: ``results.json``,
``results.md`` (final / best accuracy as mean ± spread over seeds, actual keep ratio, budget = client
params as % of the dense model's, gap to the same partition's full run in points, client params / MACs
/ bytes per round, wall time, and a diagnostics table of the principal strategies),
``accuracy_vs_round_<partition>.png`` (with the gap to full below), ``diagnostics_<partition>.png``
and ``accuracy_vs_keep_ratio.png``, plus one sub-folder per run with its metrics and checkpoint
(finished runs are skipped on a re-run: resumable). In ``results.json`` ``budget`` and
``gap_to_full`` are fractions, like ``final_acc``.

Equal budgets (``--match params`` or a profile's ``match: params``): at each keep ratio k every
non-full strategy runs at the keep ratio whose client sub-model has as many parameters (within 2 %)
as prism's at k (:func:`match_keep_ratio`); rows keep the nominal ``keep_ratio`` for grouping and the
``actual_keep`` used, and run folders are named after the actual keep.

Profiles are YAML files, one per profile under ``config/bench/`` (``smoke``: seconds, for tests;
``cpu``, ``fidelity``, ``fidelity_long``, ``fidelity_methods``, ``fidelity_methods_cnn``: CIFAR-10 on 2 CPU cores; ``paper``: the
paper's setting for a GPU; each file's header says what it is for). ``--profile NAME`` runs a shipped
one, ``--profile PATH`` (ending in .yaml) a file of the same form (:mod:`.profiles` describes it).

Modules: :mod:`.profiles` (reading and checking profile files), :mod:`.matching` (equal budgets),
:mod:`.plan` (the runs of a profile), :mod:`.runner` (running them), :mod:`.rows` (result rows and run
metrics as numbers), :mod:`.tables`, :mod:`.plots` and :mod:`.results` (the output files).
"""

from .matching import KeepMatcher, ParamCounter, match_keep_ratio, resolve_match
from .plan import plan_runs
from .plots import plot_accuracy, plot_diagnostics
from .profiles import COMMON, PROFILE_DIR, PROFILES, check_profile, load_profile_file, parse_partition, resolve_profile
from .results import write_results
from .runner import run_bench
from .tables import aggregate_rows, diagnostics_table, markdown_table

_COMMON = COMMON  # the name tests and older scripts use

__all__ = [
    "COMMON", "PROFILES", "PROFILE_DIR", "KeepMatcher", "ParamCounter", "aggregate_rows", "check_profile",
    "diagnostics_table", "load_profile_file", "markdown_table", "match_keep_ratio", "parse_partition", "plan_runs",
    "plot_accuracy", "plot_diagnostics", "resolve_match", "resolve_profile", "run_bench", "write_results",
]
