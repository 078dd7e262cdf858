"""Original-space channel groups for origdrop / rolex."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedml_prism import PrincipalModel, PrismConfig, convert_static_bn
from fedml_prism.engine.channels import channel_plan
from fedml_prism.workloads.models import cnn, resnet_tiny


def test_residual_additions_share_a_group() -> None:
    plan = channel_plan(resnet_tiny(width=0.5))
    m = plan.modules
    assert m["conv1"].in_group is None  # raw image channels are never cut
    assert m["linear"].out_group is None  # logits are never cut
    # stage 1: the stem conv, block conv2 and the identity skip are added -> one group
    assert m["conv1"].out_group == m["layers.0.0.conv2"].out_group
    # stage 2: conv2 output and the 1x1 shortcut are added -> one group
    assert m["layers.1.0.conv2"].out_group == m["layers.1.0.shortcut.0"].out_group
    assert m["layers.0.0.conv1"].out_group != m["conv1"].out_group


def test_flatten_expands_linear_columns() -> None:
    plan = channel_plan(cnn(num_classes=3, in_channels=1, image_size=8, width=0.125))
    assert plan.modules["fc"].in_repeat == 4  # 8 channels x 2 x 2


@pytest.mark.parametrize("strategy", ["origdrop", "rolex"])
def test_channel_submodels_run_and_keep_one_is_dense(strategy) -> None:
    torch.manual_seed(0)
    model = resnet_tiny(width=0.5)
    x = torch.randn(4, 3, 8, 8)
    sub = PrincipalModel(model, PrismConfig(strategy=strategy, keep_ratio=0.3)).sample_submodel(0, 3)
    assert sub.module(x).shape == (4, 10)
    assert sub.module.conv1.out_channels == 10  # ceil(0.3 * 32)
    full = PrincipalModel(model, PrismConfig(strategy=strategy, keep_ratio=1.0)).sample_submodel(0, 3)
    assert torch.allclose(full.module(x), convert_static_bn(model)(x), atol=1e-5)


def test_unsupported_operation_is_named() -> None:
    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], 1)

    with pytest.raises(ValueError, match="cannot follow channels through 'cat'"):
        PrincipalModel(Cat(), PrismConfig(strategy="origdrop"))
