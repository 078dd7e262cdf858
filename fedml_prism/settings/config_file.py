"""A ``fedml_config.yaml`` read into its sections (``common_args:``, ``train_args:``, …), each a mapping."""

from __future__ import annotations

import os
from typing import Any

import yaml


def read_config(path: str) -> dict[str, dict[str, Any]]:
    """The YAML sections; a missing file or a non-mapping section is an error (FedML ignores both)."""
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    with open(path) as f:
        try:
            sections = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path!r} is not valid YAML: {err}") from err
    if not isinstance(sections, dict):
        raise ValueError(f"config file {path!r} must be a mapping of sections (common_args:, train_args:, …)")
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise ValueError(f"config section {name!r} must be a mapping of key: value, got {section!r}")
    return sections
