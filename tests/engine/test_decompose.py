"""Which layers are factorized, and SVD robustness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedml_prism import PrismConfig
from fedml_prism.engine.decompose import factorizable_layers, svd_factors
from fedml_prism.workloads.models import resnet18_cifar


@pytest.mark.parametrize("rule", ["default", "paper"])
def test_both_rules_on_resnet18_keep_paper_layers_dense(rule: str) -> None:
    layers = factorizable_layers(resnet18_cifar(), PrismConfig(rule=rule))
    assert "conv1" not in layers  # first conv on raw image channels
    assert "linear" not in layers  # classifier
    assert not any("shortcut" in n for n in layers)  # 1x1 convs
    assert len(layers) == 16 and all(n.endswith(("conv1", "conv2")) for n in layers)


def test_include_and_exclude_patterns() -> None:
    model = resnet18_cifar(width=0.25)
    cfg = PrismConfig(factorize_include=("*shortcut.0",), factorize_exclude=("layers.3.*", "layers.0.0.conv1"))
    layers = factorizable_layers(model, cfg)
    assert "layers.1.0.shortcut.0" in layers
    assert not any(n.startswith("layers.3.") for n in layers)
    assert "layers.0.0.conv1" not in layers
    by_type = factorizable_layers(model, PrismConfig(factorize_include=("Linear",)))
    assert "linear" in by_type


def test_layers_that_save_nothing_are_skipped() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 2))
    # "0" is the first layer on raw input, which the default rule keeps dense: switched off here
    cfg = PrismConfig(keep_ratio=0.2, skip_classifier=True, skip_first_conv=False)
    # keep 0.2: 8x8 keeps 2 components, 2*(8+8)=32 < 64 entries, so it is factorized;
    # keep 0.6: it keeps 5, 5*16=80 >= 64, so the principal form would save nothing.
    assert factorizable_layers(model, cfg) == ["0", "1", "2"]
    assert "0" not in factorizable_layers(model, PrismConfig(keep_ratio=0.6, skip_first_conv=False))
    assert factorizable_layers(model, PrismConfig(keep_ratio=1.0, skip_first_conv=False)) == []
    everything = PrismConfig(keep_ratio=1.0, skip_no_saving=False, skip_first_conv=False)
    assert factorizable_layers(model, everything) == ["0", "1", "2"]


def test_svd_rejects_non_finite_weights() -> None:
    w = torch.randn(4, 6)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="layer 'x'.*non-finite"):
        svd_factors(w, name="x")


def test_svd_falls_back_to_float64(monkeypatch) -> None:
    real = torch.linalg.svd

    def flaky(a, **kw):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real(a, **kw)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    w = torch.randn(5, 3, 2, 2)
    f = svd_factors(w)
    assert f.u.dtype == torch.float32
    assert torch.allclose(f.dense(), w, atol=1e-5)
