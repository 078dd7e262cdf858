"""The FedML import boundary: silence exactly the two warnings ``import fedml`` prints on every run.

``import fedml`` (FedML 0.9.6) imports ``requests``, which warns that the installed ``urllib3`` /
``chardet`` / ``charset_normalizer`` versions are newer than it knows (``RequestsDependencyWarning``,
``requests/__init__.py``), and ``pkg_resources``, which warns that it is deprecated (a ``UserWarning``
raised from ``fedml/computing/scheduler/comm_utils/sys_utils.py:17``). Neither is actionable for a
fedml_prism user. Every project module that imports FedML calls :func:`silence_fedml_import_warnings`
first; the filters match those two messages only, so every other warning still shows.

This module itself imports nothing from FedML (the engine stays FedML-free).
"""

from __future__ import annotations

import warnings

#: (message regex, category, module regex) of each silenced warning. The requests category
#: (``requests.exceptions.RequestsDependencyWarning``) cannot be named without importing requests,
#: which is what emits it: its message and module pin it down instead.
FEDML_IMPORT_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"urllib3 \(.*\) or chardet \(.*\)/charset_normalizer \(.*\) doesn't match a supported version", Warning,
     r"requests(\.|$)"),
    (r"pkg_resources is deprecated as an API", UserWarning, ""),
)


def silence_fedml_import_warnings() -> None:
    """Install the two filters (once per process; calling again adds nothing)."""
    for message, category, module in FEDML_IMPORT_WARNINGS:
        # filterwarnings(append=False) first removes an identical filter, so repeated calls do not pile up
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
