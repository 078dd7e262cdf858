"""Laws of the principal-form layers and of keep-ratio-1 sub-models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedml_prism import PrincipalConv2d, PrincipalLinear, PrincipalModel, PrismConfig, convert_static_bn
from fedml_prism.engine.decompose import svd_factors

ALL_LAYERS = PrismConfig(keep_ratio=1.0, factorize_include=("Conv2d", "Linear"), static_bn=True)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [(3, 1, 1, 1), (5, 2, 2, 1), (3, 1, 2, 2), ((1, 3), (2, 1), (0, 1), 1), (1, 1, 0, 1)],
)
def test_principal_conv_full_rank_round_trip(kernel, stride, padding, dilation) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, kernel, stride, padding, dilation)
    f = svd_factors(conv.weight.detach())
    layer = PrincipalConv2d.like(conv, rank=len(f.sigma))
    layer.load_state_dict({"u": f.u, "v": f.v, "sigma": f.sigma, "bias": conv.bias.detach()})
    x = torch.randn(2, 5, 11, 10)
    assert torch.allclose(layer.dense_weight(), conv.weight, atol=1e-5)
    assert (layer(x) - conv(x)).abs().max() <= 1e-4


def test_principal_linear_full_rank_round_trip() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(9, 4)
    f = svd_factors(lin.weight.detach())
    layer = PrincipalLinear.like(lin, rank=4)
    layer.load_state_dict({"u": f.u, "v": f.v, "sigma": f.sigma, "bias": lin.bias.detach()})
    x = torch.randn(3, 2, 9)
    assert (layer(x) - lin(x)).abs().max() <= 1e-5


def test_principal_conv_is_physically_small() -> None:
    conv = nn.Conv2d(64, 64, 3, padding=1)
    layer = PrincipalConv2d.like(conv, rank=13)
    assert layer.v.shape == (13, 64, 3, 3) and layer.u.shape == (64, 13)
    n_params = sum(p.numel() for p in layer.parameters())
    assert n_params == 13 * (64 * 9 + 64) + 64
    assert n_params < 0.25 * sum(p.numel() for p in conv.parameters())


def test_sigma_is_frozen_buffer() -> None:
    layer = PrincipalLinear(6, 4, rank=2)
    assert "sigma" in dict(layer.named_buffers())
    assert "sigma" not in dict(layer.named_parameters())
    nn.init.normal_(layer.u)
    nn.init.normal_(layer.v)
    layer(torch.randn(3, 6)).sum().backward()
    assert layer.sigma.grad is None and layer.u.grad is not None


def test_keep_ratio_one_reproduces_dense_model(tiny) -> None:
    _check_keep_one(*tiny)


def test_keep_ratio_one_reproduces_dense_sequence_model(tiny_sequence) -> None:
    _check_keep_one(*tiny_sequence)


def _check_keep_one(name: str, model: nn.Module, x: torch.Tensor) -> None:
    pm = PrincipalModel(model, ALL_LAYERS)
    assert pm.layers, f"{name}: nothing was factorized"
    reference = convert_static_bn(copy.deepcopy(model)).eval()
    sub = pm.sample_submodel(client_id=0, round_idx=0)
    sub.module.eval()
    assert any(isinstance(m, (PrincipalConv2d, PrincipalLinear)) for m in sub.module.modules())
    with torch.no_grad():
        err = (sub.module(x) - reference(x)).abs().max().item()
        dense_err = (pm.dense_model().eval()(x) - reference(x)).abs().max().item()
    assert err <= 1e-4, f"{name}: keep-1 sub-model differs by {err}"
    assert dense_err <= 1e-4


def test_lstm_layers_are_physically_small_on_clients() -> None:
    from fedml_prism.workloads.models import lstm_imdb

    model = lstm_imdb(hidden=64)
    pm = PrincipalModel(model, PrismConfig(keep_ratio=0.2))
    assert pm.layers == ["lstm.0.ih", "lstm.0.hh", "lstm.1.ih", "lstm.1.hh"]
    sub = pm.sample_submodel(0, 0)
    hh = sub.module.lstm[1].hh
    assert isinstance(hh, PrincipalLinear) and hh.u.shape == (256, 13) and hh.v.shape == (13, 64)
    lstm_params = lambda m: sum(p.numel() for p in m.lstm.parameters())  # noqa: E731
    assert lstm_params(sub.module) < 0.3 * lstm_params(model)


def test_convert_static_bn_keeps_affine_and_drops_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].weight.fill_(2.0)
    convert_static_bn(model)
    bn = model[1]
    assert not bn.track_running_stats and bn.running_mean is None
    assert torch.equal(bn.weight, torch.full((4,), 2.0))
    bn.eval()
    x = torch.randn(8, 4, 5, 5)
    expected = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True)
    assert torch.allclose(bn(x), expected)
