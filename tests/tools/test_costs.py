"""Costs measured from the modules and payloads, and the costs CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fedml_prism import PrincipalModel, PrismConfig
from fedml_prism.engine.costs import input_dtype, layer_costs, probe_input, submodel_costs
from fedml_prism.tools.cli import main
from fedml_prism.workloads.models import char_lstm, cnn, lstm_imdb, resnet_tiny, vit_small


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
    assert main(["costs", "--model", "fedml_prism.workloads.models:cnn", "--model-arg", "width=0.25",
                 "--input-shape", "1,28,28", "--keep-ratio", "0.5"]) == 0
    assert "params" in capsys.readouterr().out
    assert main(["costs", "--model", "nosuch.module:f", "--input-shape", "1,28,28"]) == 2
    assert "cannot import 'nosuch.module'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "dtype"),
    [(char_lstm(hidden=8), torch.long), (lstm_imdb(hidden=8), torch.long),
     (cnn(width=0.125), torch.float32), (vit_small(image_size=8, patch=4, dim=8, depth=1, heads=2), torch.float32),
     (resnet_tiny(width=0.125).double(), torch.float64), (nn.Sequential(nn.Flatten(), nn.Embedding(5, 2)), torch.long)],
)
def test_input_dtype_follows_the_first_layer(model: nn.Module, dtype: torch.dtype) -> None:
    assert input_dtype(model) == dtype
    assert probe_input(model, (3, 8, 8)).dtype == dtype


def test_token_model_costs_from_a_real_batch_match_the_shape_probe_and_hand_count() -> None:
    torch.manual_seed(0)
    steps, embed, hidden, classes = 7, 4, 6, 2
    model = lstm_imdb(vocab_size=30, embed_dim=embed, hidden=hidden, num_classes=classes)
    batch = torch.randint(1, 31, (5, steps), generator=torch.Generator().manual_seed(1))
    costs = layer_costs(model, batch)
    assert costs == layer_costs(model, (steps,))  # MACs depend on shapes only; one sample of the batch is run
    assert costs["embedding"] == ("Embedding", 31 * embed, 0)
    assert costs["lstm.0.ih"][2] == steps * 4 * hidden * embed
    assert costs["lstm.1.hh"][2] == steps * 4 * hidden * hidden  # called once per time step
    assert costs["fc"][2] == hidden * classes


def test_submodel_costs_of_char_lstm_on_token_ids() -> None:
    model = char_lstm(embed_dim=4, hidden=16)
    pm = PrincipalModel(model, PrismConfig(keep_ratio=0.25))
    x = torch.randint(0, 90, (3, 80), generator=torch.Generator().manual_seed(0))
    report = submodel_costs(pm, pm.sample_submodel(0, 0), x)
    assert report.input_shape == (80,) and report.input_dtype == "int64"
    assert 0 < report.macs < report.dense_macs and 0 < report.params < report.dense_params
    hh = next(lc for lc in report.layers if lc.name == "lstm.1.hh")
    r = 4  # ceil(0.25 * 16)
    assert hh.kind == "PrincipalLinear" and hh.macs == 80 * r * (16 + 64) and hh.dense_macs == 80 * 64 * 16


@pytest.mark.parametrize(("model", "shape"), [("char_lstm", "80"), ("lstm_imdb", "200")])
def test_costs_cli_token_models(model: str, shape: str, capsys) -> None:
    args = ["costs", "--model", model, "--model-arg", "hidden=32", "--input-shape", shape, "--keep-ratio", "0.2"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input_shape"] == [int(shape)] and report["input_dtype"] == "int64"
    # the LSTM's matrices are factorized (MACs shrink); lstm_imdb's 1001-row embedding stays dense
    assert 0 < report["ratios"]["params"] < 1 and 0 < report["ratios"]["macs"] < 0.5
    assert {lc["kind"] for lc in report["layers"] if ".ih" in lc["name"] or ".hh" in lc["name"]} == {"PrincipalLinear"}
    assert main([*args, "--layers"]) == 0
    text = capsys.readouterr().out
    assert f"input=({shape},) int64" in text and "lstm.0.ih" in text


def test_costs_cli_input_dtype_choice_and_errors(capsys) -> None:
    base = ["costs", "--model", "lstm_imdb", "--model-arg", "hidden=8", "--input-shape", "12"]
    assert main([*base, "--input-dtype", "int32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_dtype"] == "int32"
    assert main([*base, "--input-dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert "cost probe: LSTMClassifier cannot run one input of shape (12,) and dtype float32" in err
    assert main([*base, "--input-dtype", "complex"]) == 2
    assert "--input-dtype 'complex' is invalid: allowed auto, float32" in capsys.readouterr().err
    with pytest.raises(ValueError, match="example of shape"):
        layer_costs(cnn(), torch.zeros(0, 1, 28, 28))


def test_costs_cli_training_memory_line(capsys) -> None:
    """The training-memory line: activation bytes held for backward at --batch-size, lower with
    activation_memory principal than with plain autograd, and growing with the batch."""
    held = {}
    for mode, batch in (("principal", 8), ("full", 8), ("principal", 16)):
        assert main(["costs", "--model", "resnet_tiny", "--input-shape", "3,16,16", "--keep-ratio", "0.2", "--json",
                     "--batch-size", str(batch), "--activation-memory", mode]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["batch_size"] == batch and report["activation_memory"] == mode
        held[mode, batch] = report["activation_bytes"]
        assert report["ratios"]["activation_bytes"] == report["activation_bytes"] / report["dense_activation_bytes"]
    assert held["principal", 8] < held["full", 8]
    assert held["principal", 8] < held["principal", 16]
    assert main(["costs", "--model", "resnet_tiny", "--input-shape", "3,16,16"]) == 0
    assert "activation bytes held for backward at batch 32" in capsys.readouterr().out
