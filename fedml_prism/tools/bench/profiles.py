"""Bench profiles: one YAML file per profile under ``config/bench/`` (``smoke.yaml``, ``cpu.yaml`` …),
read and checked into the dicts :func:`~fedml_prism.tools.bench.plan.plan_runs` takes.

A profile file holds:

- ``strategies`` (list): strategy, method or variant names, run in this order;
- ``keep_ratios`` (list of numbers in (0, 1]), ``partitions`` (list of ``iid`` / ``dirichletALPHA``),
  ``seeds`` (list of integers): every combination runs (full FedAvg and the other methods once, at the
  first keep ratio);
- ``sections``: the FedML config sections every run shares (``data_args``, ``model_args``,
  ``train_args``, ``prism_args``, …), as in a ``fedml_config.yaml``;
- optional ``match`` (``params`` or ``none``), ``memory`` (true: record each client's peak training
  memory) and ``variants``: a name → ``prism_args`` (``strategy``: the base strategy it runs),
  ``sections`` merged over the profile's, the ``keep_ratios`` / ``partitions`` / ``seeds`` it runs at and
  its own ``learning_rates``;
- optional ``learning_rates`` (a learning-rate sweep: list of positive numbers, the same grid for every
  strategy unless a variant names its own) and ``sweep_seeds`` (the seeds that run the whole grid;
  default: every seed). The other seeds run each strategy at its best rate: the one with the highest
  mean final accuracy over the sweep seeds (:func:`~fedml_prism.tools.bench.rows.best_learning_rates`).

Every check runs when the file is read, before any work: an unknown key, a value of the wrong type or a
key FedML's sections do not read is a ``ValueError`` naming the file, the field, the value and what is
allowed. Relative paths inside ``sections`` (``data_path``) are resolved against the working directory,
as for the named profiles.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ...engine.config import STRATEGIES, PrismConfig
from ...job import unread_keys
from ...strategies import OTHER_METHODS

#: the shipped profiles, one ``NAME.yaml`` each
PROFILE_DIR = Path(__file__).resolve().parents[3] / "config" / "bench"

#: the sections every bench run starts from (a profile's own sections replace these section by section)
COMMON: dict[str, dict[str, Any]] = {
    "common_args": {"training_type": "simulation"},
    "comm_args": {"backend": "sp"},
    "tracking_args": {"using_mlops": False, "checkpoint_every": 5},
    "validation_args": {"frequency_of_the_test": 1},
}

REQUIRED_KEYS = ("strategies", "keep_ratios", "partitions", "seeds", "sections")
OPTIONAL_KEYS = ("match", "memory", "variants", "learning_rates", "sweep_seeds")
VARIANT_KEYS = ("prism_args", "sections", "keep_ratios", "partitions", "seeds", "learning_rates")
MATCH_VALUES = ("params", "none")


def partition_name(method: str, alpha: float | None) -> str:
    """``iid`` or ``dirichletALPHA``: how partitions are named in profiles, rows and run folders."""
    return method if alpha is None else f"{method}{alpha:g}"


def parse_partition(text: Any, field: str = "--partitions entry ") -> tuple[str, float | None]:
    """``"iid"`` → ``("iid", None)``, ``"dirichlet0.1"`` → ``("dirichlet", 0.1)``; else a ValueError that
    starts with ``field`` (``"--partitions entry "``, ``"FILE: partitions[0]="``)."""
    if text == "iid":
        return ("iid", None)
    if isinstance(text, str) and text.startswith("dirichlet"):
        try:
            return ("dirichlet", float(text[len("dirichlet"):]))
        except ValueError:
            pass
    raise ValueError(f"{field}{text!r} is invalid: allowed iid or dirichletALPHA (e.g. dirichlet0.1)")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _list(source: str, field: str, value: Any, item_ok: Callable[[Any], bool], allowed: str) -> list[Any]:
    """``value`` as a non-empty list whose items pass ``item_ok``; else a ValueError naming the first bad one."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{source}: {field}={value!r} is invalid: allowed a non-empty list of {allowed}")
    for i, item in enumerate(value):
        if not item_ok(item):
            raise ValueError(f"{source}: {field}[{i}]={item!r} is invalid: allowed {allowed}")
    return list(value)


def _keys(source: str, field: str, value: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    """``value`` as a mapping whose keys are all in ``allowed``."""
    if not isinstance(value, dict):
        raise ValueError(f"{source}: {field or 'the file'} must be a mapping of key: value, got {value!r}")
    for key in value:
        if key not in allowed:
            where = f"{field}.{key}" if field else str(key)
            raise ValueError(f"{source}: key {where!r} is invalid: allowed {', '.join(allowed)}")
    return value


def _keep_ratios(source: str, field: str, value: Any) -> list[float]:
    ok = lambda k: _is_number(k) and 0 < k <= 1
    return [float(k) for k in _list(source, field, value, ok, "numbers in (0, 1]")]


def _learning_rates(source: str, field: str, value: Any) -> list[float]:
    ok = lambda v: _is_number(v) and 0 < v < float("inf")
    rates = [float(v) for v in _list(source, field, value, ok, "positive numbers")]
    if len(set(rates)) != len(rates):
        raise ValueError(f"{source}: {field}={value!r} is invalid: allowed distinct positive numbers")
    return rates


def _partitions(source: str, field: str, value: Any) -> list[tuple[str, float | None]]:
    items = _list(source, field, value, lambda p: isinstance(p, str), "iid or dirichletALPHA (e.g. dirichlet0.1)")
    return [parse_partition(p, f"{source}: {field}[{i}]=") for i, p in enumerate(items)]


def _sections(source: str, field: str, value: Any) -> dict[str, dict[str, Any]]:
    """FedML config sections: a mapping of mappings holding only keys FedML 0.9.6 or fedml_prism reads."""
    if not isinstance(value, dict):
        raise ValueError(f"{source}: {field}={value!r} is invalid: allowed a mapping of sections (data_args:, …)")
    for name, section in value.items():
        if not isinstance(section, dict):
            raise ValueError(f"{source}: {field}.{name}={section!r} is invalid: allowed a mapping of key: value")
    if unread := unread_keys(value):
        raise ValueError(f"{source}: {field}.{unread[0]}")
    return value


def _prism_args(source: str, field: str, *layers: Mapping[str, Any]) -> None:
    """The merged ``prism_args`` layers must build a :class:`PrismConfig` (known keys, valid values)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    try:
        PrismConfig.from_mapping(merged)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {field}: {err}") from err


def _variant(source: str, name: Any, spec: Any, prism_args: Mapping[str, Any]) -> dict[str, Any]:
    """One entry of ``variants``, checked; its ``partitions`` as names (``dirichlet0.1``)."""
    field = f"variants.{name}"
    spec = _keys(source, field, spec if spec is not None else {}, VARIANT_KEYS)
    out: dict[str, Any] = {}
    if "prism_args" in spec:
        out["prism_args"] = _sections(source, field, {"prism_args": spec["prism_args"]})["prism_args"]
        _prism_args(source, f"{field}.prism_args", prism_args, out["prism_args"])
    base = out.get("prism_args", {}).get("strategy", name)
    if base not in STRATEGIES + OTHER_METHODS:
        raise ValueError(f"{source}: {field}.prism_args.strategy={base!r} is invalid: allowed "
                         f"{', '.join(STRATEGIES + OTHER_METHODS)} (the strategy the variant runs)")
    if "sections" in spec:
        out["sections"] = _sections(source, f"{field}.sections", spec["sections"])
    if "keep_ratios" in spec:
        out["keep_ratios"] = _keep_ratios(source, f"{field}.keep_ratios", spec["keep_ratios"])
    if "partitions" in spec:
        out["partitions"] = [partition_name(*p) for p in _partitions(source, f"{field}.partitions", spec["partitions"])]
    if "seeds" in spec:
        out["seeds"] = _list(source, f"{field}.seeds", spec["seeds"], lambda s: isinstance(s, int) and not isinstance(s, bool),
                             "integers")
    if "learning_rates" in spec:
        out["learning_rates"] = _learning_rates(source, f"{field}.learning_rates", spec["learning_rates"])
    return out


def check_profile(data: Any, source: str) -> dict[str, Any]:
    """A profile as read from YAML (``source`` names it in errors), checked and normalized: partitions
    as ``(method, alpha)`` pairs, keep ratios as floats."""
    data = _keys(source, "", data, REQUIRED_KEYS + OPTIONAL_KEYS)
    for key in REQUIRED_KEYS:
        if key not in data:
            raise ValueError(f"{source}: key {key!r} is missing: required {', '.join(REQUIRED_KEYS)}")
    sections = _sections(source, "sections", data["sections"])
    _prism_args(source, "sections.prism_args", sections.get("prism_args", {}))
    variants = data.get("variants") or {}
    if not isinstance(variants, dict):
        raise ValueError(f"{source}: variants={variants!r} is invalid: allowed a mapping of name: settings")
    profile: dict[str, Any] = {
        "sections": sections,
        "variants": {name: _variant(source, name, spec, sections.get("prism_args", {})) for name, spec in variants.items()},
    }
    known = STRATEGIES + OTHER_METHODS
    profile["strategies"] = _list(source, "strategies", data["strategies"], lambda s: s in known or s in variants,
                                  f"{', '.join(known)} or a name under variants")
    profile["keep_ratios"] = _keep_ratios(source, "keep_ratios", data["keep_ratios"])
    profile["partitions"] = _partitions(source, "partitions", data["partitions"])
    profile["seeds"] = _list(source, "seeds", data["seeds"], lambda s: isinstance(s, int) and not isinstance(s, bool),
                             "integers")
    if data.get("match") is not None:
        if data["match"] not in MATCH_VALUES:
            raise ValueError(f"{source}: match={data['match']!r} is invalid: allowed {', '.join(MATCH_VALUES)}")
        profile["match"] = data["match"]
    if "learning_rates" in data:
        profile["learning_rates"] = _learning_rates(source, "learning_rates", data["learning_rates"])
    if "sweep_seeds" in data:
        if "learning_rates" not in data and not any("learning_rates" in v for v in profile["variants"].values()):
            raise ValueError(f"{source}: sweep_seeds is invalid without learning_rates (the sweep it selects seeds for)")
        profile["sweep_seeds"] = _list(source, "sweep_seeds", data["sweep_seeds"], lambda s: s in profile["seeds"],
                                       f"seeds of the profile ({profile['seeds']})")
    if "memory" in data:
        if not isinstance(data["memory"], bool):
            raise ValueError(f"{source}: memory={data['memory']!r} is invalid: allowed true or false")
        profile["memory"] = data["memory"]
    return profile


def load_profile_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check one profile file (see the module docstring); a ValueError names what is wrong."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise ValueError(f"--profile {source!r} is invalid: no such file (allowed a profile name: "
                         f"{', '.join(PROFILES)}, or the path of a profile .yaml file)")
    with open(source) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"{source}: not valid YAML: {' '.join(str(err).split())}") from err
    return check_profile(data, source)


def _shipped() -> dict[str, dict[str, Any]]:
    return {path.stem: load_profile_file(path) for path in sorted(PROFILE_DIR.glob("*.yaml"))}


#: the shipped profiles by name (tests may add their own, in the same normalized form)
PROFILES: dict[str, dict[str, Any]] = _shipped()


def is_profile_path(spec: str) -> bool:
    """Whether ``--profile`` names a file (it ends in .yaml / .yml or holds a path separator) rather than a profile."""
    return spec.endswith((".yaml", ".yml")) or any(sep in spec for sep in (os.sep, os.altsep) if sep)


def profile_label(spec: str) -> str:
    """The name a bench records for ``--profile``: the profile's name, or a file's name without .yaml."""
    return Path(spec).stem if is_profile_path(spec) else spec


def resolve_profile(spec: str) -> tuple[str, Mapping[str, Any]]:
    """``--profile`` (a shipped profile's name or the path of a profile file) as ``(label, profile)``."""
    if is_profile_path(spec):
        return profile_label(spec), load_profile_file(spec)
    if spec not in PROFILES:
        raise ValueError(f"--profile {spec!r} is invalid: allowed {', '.join(PROFILES)}, "
                         "or the path of a profile .yaml file (e.g. a copy of config/bench/smoke.yaml)")
    return spec, PROFILES[spec]
