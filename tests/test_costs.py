"""Costs measured from the modules and payloads, and the costs CLI."""

from __future__ import annotations

import json

from fedml_prism import PrincipalModel, PrismConfig
from fedml_prism.cli import main
from fedml_prism.costs import layer_costs, submodel_costs
from fedml_prism.models import cnn


def test_layer_costs_hand_computed() -> None:
    model = cnn(num_classes=10, in_channels=1, image_size=8, width=0.125)  # 8 channels
    costs = layer_costs(model, (1, 8, 8))
    assert costs["conv1"] == ("Conv2d", 8 * 25 + 8, 8 * 8 * 8 * 25)
    assert costs["conv2"] == ("Conv2d", 8 * 8 * 9 + 8, 8 * 4 * 4 * 8 * 9)
    assert costs["fc"] == ("Linear", 8 * 2 * 2 * 10 + 10, 8 * 2 * 2 * 10)


def test_principal_layer_costs_follow_rank() -> None:
    model = cnn(num_classes=10, in_channels=1, image_size=8, width=0.5)  # 32 channels
    pm = PrincipalModel(model, PrismConfig(keep_ratio=0.25))
    sub = pm.sample_submodel(0, 0)
    report = submodel_costs(pm, sub, (1, 8, 8))
    conv2 = next(lc for lc in report.layers if lc.name == "conv2")
    r = 8  # ceil(0.25 * 32)
    assert conv2.kind == "PrincipalConv2d"
    assert conv2.params == r * (32 * 9 + 32) + 32
    assert conv2.macs == 4 * 4 * r * (32 * 9 + 32)
    assert conv2.dense_macs == 4 * 4 * 32 * 32 * 9
    assert report.bytes_up < report.bytes_down < report.dense_bytes


def test_costs_cli_resnet18_at_keep_02(capsys) -> None:
    assert main(["costs", "--model", "resnet18_cifar", "--input-shape", "3,32,32", "--keep-ratio", "0.2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dense_params"] == 11_173_962
    for key in ("params", "macs", "bytes_down", "bytes_up"):
        assert 0.15 < report["ratios"][key] <= 0.25, (key, report["ratios"][key])


def test_costs_cli_import_path_and_errors(capsys) -> None:
    assert main(["costs", "--model", "fedml_prism.models:cnn", "--model-arg", "width=0.25",
                 "--input-shape", "1,28,28", "--keep-ratio", "0.5"]) == 0
    assert "params" in capsys.readouterr().out
    assert main(["costs", "--model", "nosuch.module:f", "--input-shape", "1,28,28"]) == 2
    assert "cannot import 'nosuch.module'" in capsys.readouterr().err
