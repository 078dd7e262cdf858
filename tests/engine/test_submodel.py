"""Wire payloads: round trip, physical size, and checkpoints."""

from __future__ import annotations

import io

import pytest
import torch

from fedml_prism import PrincipalModel, PrismConfig, SubModel, convert_static_bn
from fedml_prism.engine.submodel import META
from fedml_prism.workloads.models import resnet_tiny


@pytest.mark.parametrize("strategy", ["prism", "orthdrop", "origdrop", "rolex", "full"])
def test_payload_round_trip_rebuilds_same_submodel(strategy) -> None:
    torch.manual_seed(0)
    model = resnet_tiny(width=0.5)
    pm = PrincipalModel(model, PrismConfig(strategy=strategy, keep_ratio=0.3))
    sub = pm.sample_submodel(2, 5)
    payload = sub.to_payload("down")
    assert all(isinstance(v, torch.Tensor) for v in payload.values()) and META in payload
    client = SubModel.from_payload(payload, convert_static_bn(resnet_tiny(width=0.5)))
    assert (client.client_id, client.round_idx, client.strategy) == (2, 5, strategy)
    assert client.keep_ratio == pytest.approx(0.3)
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(client.module(x), sub.module(x), atol=1e-6)
    for name, idx in sub.components.items():
        assert torch.equal(client.components[name], idx)
    up = client.to_payload("up")
    assert not any(k.endswith(".sigma") for k in up)
    assert set(up) <= set(payload)


@pytest.mark.parametrize("strategy", ["prism", "origdrop"])
def test_submodel_tensors_are_physically_smaller(strategy) -> None:
    model = resnet_tiny(width=1.0)
    pm = PrincipalModel(model, PrismConfig(strategy=strategy, keep_ratio=0.2))
    sub = pm.sample_submodel(0, 0)
    dense = sum(p.numel() for p in model.parameters())
    small = sum(p.numel() for p in sub.module.parameters())
    assert small < 0.4 * dense
    biggest = max(p.numel() for p in sub.module.parameters())
    assert biggest < max(p.numel() for p in model.parameters())


def test_from_payload_names_the_problem_on_wrong_template() -> None:
    pm = PrincipalModel(resnet_tiny(width=0.5), PrismConfig())
    payload = pm.sample_submodel(0, 0).to_payload()
    with pytest.raises(ValueError, match="does not fit the model architecture"):
        SubModel.from_payload(payload, resnet_tiny(width=0.25))
    with pytest.raises(ValueError, match="prism::meta"):
        SubModel.from_payload({"a": torch.zeros(1)}, resnet_tiny(width=0.5))


def test_checkpoint_loads_weights_only_and_restores_state() -> None:
    torch.manual_seed(0)
    cfg = PrismConfig(keep_ratio=0.3, capacities={0.2: 0.5, 0.5: 0.5})
    pm = PrincipalModel(resnet_tiny(width=0.5), cfg)
    sub = pm.sample_submodel(0, 0)
    pm.aggregate([(sub, 3)])
    buf = io.BytesIO()
    torch.save(pm.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = PrincipalModel(resnet_tiny(width=0.5), cfg)
    fresh.load_state_dict(state)
    assert fresh.rounds_done == 1
    for k, v in pm.dense_state_dict().items():
        assert torch.equal(fresh.dense_state_dict()[k], v)
