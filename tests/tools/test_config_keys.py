"""Keys in FedML's sections that neither FedML 0.9.6 nor fedml_prism reads: a warning naming the key, the
section and the closest known key; ``run --check`` lists them; ``strict_config: true`` makes them an error
before any work (issue 23, item 4). The shipped configs and bench profiles hold none."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from runtime_utils import BASE

from fedml_prism.job import FEDML_KEYS, PRISM_KEYS, job_from_sections, read_config, unread_keys
from fedml_prism.tools import bench
from fedml_prism.tools.cli import main

ROOT = Path(__file__).resolve().parents[2]
TYPO = "train_args.learing_rate is not a key FedML 0.9.6 or fedml_prism reads; did you mean learning_rate?"


def _typo_sections(**common: Any) -> dict[str, dict[str, Any]]:
    """The test config with ``learning_rate`` misspelt ``learing_rate``."""
    sections = copy.deepcopy(BASE)
    del sections["train_args"]["learning_rate"]
    sections["train_args"]["learing_rate"] = 0.05
    sections["common_args"].update(common)
    return sections


def _write(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump(sections))
    return path


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_typo_in_train_args_is_warned_with_the_closest_key(tmp_path) -> None:
    # a handler of its own: the CLI's logging setup (another test) stops propagation to pytest's
    handler, logger = _Records(), logging.getLogger("fedml_prism")
    logger.addHandler(handler)
    try:
        job = job_from_sections(_typo_sections(), str(tmp_path / "typo.yaml"), str(tmp_path / "out"))
    finally:
        logger.removeHandler(handler)
    assert job.unread == [TYPO]
    assert [r.getMessage() for r in handler.records] == [TYPO]
    assert job.settings.learning_rate != 0.05  # what the warning is for: the misspelt key trains nothing


def test_unread_keys_name_section_and_suggest_only_close_keys() -> None:
    lines = unread_keys({
        "common_args": {"training_type": "simulation", "strict_config": True},
        "data_args": {"data_cache_dir": "~/data", "partition_methd": "iid"},  # a FedML key, then a typo
        "train_args": {"gpu_speedup": 4, "learning_rate": 0.1},
        "tracking_args": {"checkpoint_every": 2, "log_file_dir": "logs"},  # fedml_prism's, then FedML's
        "prism_args": {"nonsense": 1},  # checked by PrismConfig, not here
        "method_args": {"nonsense": 1},
        "security_args": {"nonsense": 1},
    })
    assert lines == [
        "data_args.partition_methd is not a key FedML 0.9.6 or fedml_prism reads; did you mean partition_method?",
        "train_args.gpu_speedup is not a key FedML 0.9.6 or fedml_prism reads",
    ]


def test_check_lists_unread_keys(tmp_path, capsys) -> None:
    cfg = _write(tmp_path / "typo.yaml", _typo_sections())
    assert main(["run", "--cf", str(cfg), "--check", "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("config OK: ")
    assert out[1:] == [f"warning: {TYPO}"]


@pytest.mark.parametrize("check", [True, False])
def test_strict_config_refuses_an_unread_key_before_any_work(tmp_path, capsys, check) -> None:
    cfg = _write(tmp_path / "typo.yaml", _typo_sections(strict_config=True))
    argv = ["run", "--cf", str(cfg), "--output-dir", str(tmp_path / "out")] + (["--check"] if check else [])
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "config OK" not in captured.out
    assert "fedml-prism run: error: strict_config: true refuses keys nothing reads" in captured.err
    assert TYPO in captured.err
    assert not (tmp_path / "out").exists()  # nothing started


def test_strict_config_must_be_a_boolean(tmp_path, capsys) -> None:
    cfg = _write(tmp_path / "c.yaml", _typo_sections(strict_config="yes"))
    assert main(["run", "--cf", str(cfg), "--check"]) == 2
    assert "strict_config='yes' is invalid: allowed true or false" in capsys.readouterr().err


def test_strict_config_accepts_a_clean_config(tmp_path, capsys) -> None:
    sections = copy.deepcopy(BASE)
    sections["common_args"]["strict_config"] = True
    cfg = _write(tmp_path / "clean.yaml", sections)
    assert main(["run", "--cf", str(cfg), "--check", "--output-dir", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == []


SHIPPED = sorted([*ROOT.glob("config/**/fedml_config.yaml"), ROOT / "run" / "fedml_native" / "fedml_config.yaml"])


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_shipped_configs_hold_no_unread_key(path: Path) -> None:
    assert unread_keys(read_config(str(path))) == []


def test_bench_profiles_hold_no_unread_key() -> None:
    for name, profile in bench.PROFILES.items():
        sections = copy.deepcopy(bench._COMMON) | copy.deepcopy(profile["sections"])
        assert unread_keys(sections) == [], name
        for variant, spec in profile.get("variants", {}).items():
            assert unread_keys(spec.get("sections", {})) == [], (name, variant)


def test_every_key_the_code_reads_off_the_flat_config_is_known() -> None:
    """A key read from ``job.flat`` but missing from the tables would be warned about while it works."""
    pattern = re.compile(r"flat(?:\.get\(|\[)\"(\w+)\"")
    read = {key for path in (ROOT / "fedml_prism").rglob("*.py") for key in pattern.findall(path.read_text())}
    assert {"torch_threads", "client_idle_timeout_s", "mnn_parse_timeout_s", "partition_disjoint"} <= read
    assert read - (FEDML_KEYS | PRISM_KEYS) == set()
