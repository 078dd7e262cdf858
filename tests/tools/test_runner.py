"""Bad configs stop before any work, with the field, value and what is allowed."""

from __future__ import annotations

import pytest
from runtime_utils import write_config

from fedml_prism.tools.cli import main
from fedml_prism.workloads.data import partition


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"prism_args": {"keep_ratio": 1.5}}, "keep_ratio=1.5 is invalid: allowed a number in (0, 1]"),
        ({"prism_args": {"stratgy": "prism"}}, "unknown key(s) ['stratgy']"),
        ({"comm_args": {"backend": "NCCL"}}, "training_type/backend=simulation/NCCL is invalid"),
        ({"train_args": {"client_num_per_round": 50}}, "client_num_per_round=50 is invalid: allowed at most"),
        ({"train_args": {"comm_round": 0}}, "comm_round=0 is invalid: allowed an integer >= 1"),
        ({"data_args": {"partition_method": "shards"}}, "partition_method='shards' is invalid"),
        ({"model_args": {"model": "nope"}}, "neither a built-in"),
        ({"comparison_args": {"compare_strategies": ["fedprox"]}}, "compare_strategies entry 'fedprox'"),
        ({"common_args": {"training_type": "cross_device"}, "comm_args": {"backend": "MQTT_S3_MNN"},
          "train_args": {"client_id_list": [1, 2], "client_num_in_total": 3, "client_num_per_round": 3}},
         "client_id_list=[1, 2] is invalid: allowed 3 distinct edge ids"),
        ({"common_args": {"training_type": "cross_device"}, "comm_args": {"backend": "MQTT_S3_MNN"},
          "train_args": {"client_num_in_total": 3, "client_num_per_round": 3}},
         "customized_training_mqtt_config is missing"),
        ({"common_args": {"training_type": "cross_device"}, "comm_args": {"backend": "MQTT_S3"}},
         "training_type/backend=cross_device/MQTT_S3 is invalid"),
    ],
)
def test_bad_config_exits_2_naming_the_problem(tmp_path, capsys, sections, message) -> None:
    cfg = write_config(tmp_path / "bad.yaml", **sections)
    assert main(["run", "--cf", str(cfg), "--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing started


def test_missing_config_file(tmp_path, capsys) -> None:
    assert main(["run", "--cf", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_partitions_are_equal_sized_and_seeded() -> None:
    import numpy as np

    labels = np.repeat(np.arange(10), 100)
    iid = partition(labels, 10, "iid", seed=1)
    assert [len(p) for p in iid] == [100] * 10 and len(np.unique(np.concatenate(iid))) == 1000
    low = partition(labels, 20, "dirichlet", alpha=0.1, seed=1)
    high = partition(labels, 20, "dirichlet", alpha=100.0, seed=1)
    assert all(len(p) == 50 for p in low + high)
    classes = lambda parts: np.mean([len(np.unique(labels[p])) for p in parts])  # noqa: E731
    assert classes(low) < 4 < 9 < classes(high)
    again = partition(labels, 20, "dirichlet", alpha=0.1, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(low, again, strict=True))


def test_partition_summary_cli(tmp_path, capsys) -> None:
    import json

    cfg = write_config(tmp_path / "p.yaml", data_args={"partition_method": "dirichlet", "partition_alpha": 0.1})
    assert main(["partition", "--cf", str(cfg), "--json", "--plot", str(tmp_path / "p.png")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 12 and len({r["samples"] for r in rows}) == 1
    assert sum(r["classes"] for r in rows) / 12 < 5
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_device_role_needs_a_cross_device_config(tmp_path, capsys) -> None:
    cfg = write_config(tmp_path / "sp.yaml")
    assert main(["run", "--cf", str(cfg), "--role", "device", "--edge-id", "1", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--role device is only for training_type: cross_device" in capsys.readouterr().err
