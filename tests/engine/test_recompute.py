"""Principal-width training (selective recomputation): the same loss, gradients and SGD step as plain
autograd for every model family, less memory held for backward, and falling with the keep ratio."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fedml_prism import PrincipalModel, PrismConfig
from fedml_prism.engine.costs import activation_bytes
from fedml_prism.engine.layers import PrincipalLayer
from fedml_prism.engine.principal import ClientUpdate
from fedml_prism.engine.recompute import principal_width, recompute_units
from fedml_prism.engine.server import PrismClient, PrismServer, RunSettings
from fedml_prism.engine.train import local_train, make_optimizer, principal_regularizer
from fedml_prism.workloads.models import create_model

torchvision = pytest.importorskip("torchvision")


def _images(n: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def _tokens(n: int, vocab: int, steps: int, per_position: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, vocab, (n, steps), generator=g)
    y = torch.randint(0, vocab if per_position else 2, (n, steps) if per_position else (n,), generator=g)
    return x, y


#: every built-in model family and two torchvision models, small, with a batch they take
FAMILIES: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]]] = {
    "cnn": lambda: (create_model("cnn", in_channels=3, image_size=16, width=0.25, hidden=12), _images(6)),
    "resnet_tiny": lambda: (create_model("resnet_tiny"), _images(6)),
    "resnet18_cifar": lambda: (create_model("resnet18_cifar", width=0.125), _images(4)),
    "vit_small": lambda: (create_model("vit_small", image_size=16, dim=24, depth=2, heads=2), _images(4)),
    "lstm_imdb": lambda: (create_model("lstm_imdb", vocab_size=30, embed_dim=6, hidden=12), _tokens(4, 30, 7, False)),
    "char_lstm": lambda: (create_model("char_lstm", vocab_size=20, embed_dim=4, hidden=12), _tokens(4, 20, 6, True)),
    # torchvision's ResNet-18 blocks, one per stage (the same modules, a quarter of the SVD work)
    "torchvision_resnet": lambda: (torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                                                    num_classes=10), _images(2, 32)),
    "torchvision_mobilenet_v2": lambda: (torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25), _images(2, 32)),
}


def _sub(family: str, strategy: str = "prism", keep: float = 0.3) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model, (x, y) = FAMILIES[family]()
    model = model.double()
    cfg = PrismConfig(strategy=strategy, keep_ratio=keep, svd_dtype="float64")
    module = PrincipalModel(model, cfg).sample_submodel(0, 0, record=False).module.train()
    return module, (x, y)


def _loss_and_grads(module: nn.Module, x: torch.Tensor, y: torch.Tensor, principal: bool) -> tuple[float, dict]:
    module.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks (torchvision's classifiers) in both runs
    with principal_width(module, principal) as found:
        loss = F.cross_entropy(module(x), y) + principal_regularizer(module, 5e-4)
        loss.backward()
    assert bool(found.units) == principal  # the recomputation really ran (or really did not)
    return float(loss), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_gradients_and_step_equal_plain_autograd(family: str) -> None:
    """float64: loss, every gradient and one SGD step (local_train) of the recomputed sub-model equal the
    plain sub-model's within 1e-6; the principal layers' units keep less for backward."""
    module, (x, y) = _sub(family)
    assert any(isinstance(m, PrincipalLayer) for m in module.modules())
    plain_loss, plain_grads = _loss_and_grads(copy.deepcopy(module), x, y, principal=False)
    loss, grads = _loss_and_grads(copy.deepcopy(module), x, y, principal=True)
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, g in grads.items():
        assert torch.allclose(g, plain_grads[name], atol=1e-6, rtol=0), name
    stepped = {}
    for mode in ("full", "principal"):
        m = copy.deepcopy(module)
        torch.manual_seed(7)
        stats = local_train(m, [(x, y)], lr=0.1, activation_memory=mode)
        stepped[mode] = (stats.loss, {n: p.detach().clone() for n, p in m.named_parameters()})
    assert stepped["principal"][0] == pytest.approx(stepped["full"][0], abs=1e-6)
    for name, p in stepped["principal"][1].items():
        assert torch.allclose(p, stepped["full"][1][name], atol=1e-6, rtol=0), name
    held = {mode: activation_bytes(copy.deepcopy(module), x, mode) for mode in ("full", "principal")}
    assert held["principal"] < held["full"]


@pytest.mark.parametrize(("family", "strategy"), [("resnet_tiny", "full"), ("resnet_tiny", "origdrop"),
                                                   ("torchvision_resnet", "full"), ("vit_small", "full")])
def test_dense_and_channel_models_recompute_bn_and_activation_exactly(family: str, strategy: str) -> None:
    """The dense model and the channel baselines: their blocks (the layers the default rule would
    factorize) keep the conv / matmul outputs; loss and gradients equal plain autograd's."""
    module, (x, y) = _sub(family, strategy, keep=0.5)
    assert not any(isinstance(m, PrincipalLayer) for m in module.modules())
    plain_loss, plain_grads = _loss_and_grads(copy.deepcopy(module), x, y, principal=False)
    loss, grads = _loss_and_grads(copy.deepcopy(module), x, y, principal=True)
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    for name, g in grads.items():
        assert torch.allclose(g, plain_grads[name], atol=1e-6, rtol=0), name


@pytest.mark.parametrize("family", ["resnet18_cifar", "vit_small", "char_lstm"])
def test_held_activation_bytes_fall_with_the_keep_ratio(family: str) -> None:
    """The law: with recomputation, a keep-ρ sub-model holds fewer bytes for backward as ρ falls
    (0.2 < 0.5 < 1.0), and fewer than the same sub-model with plain autograd (counted, not timed)."""
    held = {}
    for keep in (0.2, 0.5, 1.0):
        module, (x, _) = _sub(family, keep=keep)
        x = torch.cat([x] * 4)  # large enough that the narrow tensors, not the allocator's constants, decide
        held[keep] = activation_bytes(module, x, "principal")
    assert held[0.2] < held[0.5] < held[1.0]
    module, (x, _) = _sub(family, keep=0.2)
    assert held[0.2] < 0.6 * activation_bytes(module, torch.cat([x] * 4), "full")


def test_dense_blocks_without_normalization_keep_plain_autograd() -> None:
    """A dense LSTM layer has no norm to recompute from its kept products: left to plain autograd, with
    the reason; the same layers in principal form are recomputed."""
    dense, _ = _sub("char_lstm", "full")
    found = recompute_units(dense)
    assert not found.units and [n for n, _ in found.skipped] == ["lstm.0", "lstm.1"]
    assert "without normalization" in found.skipped[0][1]
    principal, _ = _sub("char_lstm")
    assert [n for n, _ in recompute_units(principal).units] == ["lstm.0", "lstm.1"]


def test_a_block_whose_forward_is_already_wrapped_trains_with_plain_autograd() -> None:
    module, (x, y) = _sub("resnet_tiny")
    block = module.layers[0][0]
    block.forward = block.forward  # e.g. a hook tool's wrapper on the instance
    with principal_width(module) as found:
        assert "layers.0.0" in dict(found.skipped) and "layers.0.0" not in dict(found.units)
        with principal_width(module) as inner:  # nested: the outer wrapping is not wrapped again
            assert not inner.units
    assert "forward" in vars(block)  # the tool's own wrapper is left in place


def test_units_are_the_blocks_around_principal_layers() -> None:
    module, _ = _sub("resnet18_cifar")
    names = [n for n, _ in recompute_units(module).units]
    assert names == [f"layers.{s}.{b}" for s in range(4) for b in range(2)]  # the 8 basic blocks; stem and head plain
    cnn, _ = _sub("cnn")
    assert [n for n, _ in recompute_units(cnn).units] == [""]  # principal layers called by the model itself
    vit, _ = _sub("vit_small")
    assert [n for n, _ in recompute_units(vit).units] == ["blocks.0", "blocks.1"]


class _DropoutBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 48), nn.Linear(48, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.dropout(F.gelu(self.fc1(x)), 0.5, self.training))


class _DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.blocks, self.head = nn.Linear(6, 12), nn.Sequential(_DropoutBlock(), _DropoutBlock()), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)))


def test_dropout_inside_a_unit_draws_the_same_mask_when_recomputed() -> None:
    torch.manual_seed(0)
    model = _DropoutNet().double()
    module = PrincipalModel(model, PrismConfig(keep_ratio=0.5, svd_dtype="float64")).sample_submodel(0, 0, record=False).module
    assert isinstance(module.blocks[0].fc1, PrincipalLayer)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    results = []
    for principal in (False, True):
        results.append(_loss_and_grads(copy.deepcopy(module).train(), x, y, principal))
    (plain_loss, plain_grads), (loss, grads) = results
    assert loss == pytest.approx(plain_loss, abs=1e-12)
    for name, g in grads.items():
        assert torch.allclose(g, plain_grads[name], atol=1e-10, rtol=0), name


def test_running_statistics_bn_trains_with_plain_autograd() -> None:
    """A block whose BN updates running statistics is not recomputed (it would update them twice): it is
    reported as skipped, and the running statistics after a step equal plain autograd's."""
    torch.manual_seed(0)
    model = create_model("resnet_tiny").double()
    cfg = PrismConfig(keep_ratio=0.5, static_bn=False, svd_dtype="float64")
    module = PrincipalModel(model, cfg).sample_submodel(0, 0, record=False).module.train()
    x, y = _images(4)
    states = []
    for mode in ("full", "principal"):
        m = copy.deepcopy(module)
        local_train(m, [(x, y)], lr=0.1, activation_memory=mode)
        states.append(m.state_dict())
    for key, value in states[0].items():
        assert torch.equal(states[1][key], value), key
    found = recompute_units(module)
    assert not found.units and found.skipped and "running statistics" in found.skipped[0][1]


def test_full_mode_is_plain_autograd_bit_for_bit() -> None:
    """``activation_memory: full`` wraps nothing and reproduces a hand-written plain SGD step exactly."""
    module, (x, y) = _sub("resnet_tiny")
    module = module.float()
    x = x.float()
    reference = copy.deepcopy(module)
    opt = make_optimizer(reference, 0.1)
    loss = F.cross_entropy(reference(x), y)
    (loss + principal_regularizer(reference, 5e-4)).backward()
    nn.utils.clip_grad_norm_(reference.parameters(), 5.0)
    opt.step()
    with principal_width(module, enabled=False) as found:
        assert not found.units and all("forward" not in vars(m) for m in module.modules())
    stats = local_train(module, [(x, y)], lr=0.1, activation_memory="full")
    assert stats.loss == float(loss)
    for (name, p), q in zip(module.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert all("forward" not in vars(m) for m in module.modules())  # the wrapping is undone after training


def test_bad_activation_memory_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"activation_memory='half' is invalid: allowed one of principal, full"):
        PrismConfig(activation_memory="half")
    module, (x, y) = _sub("cnn")
    with pytest.raises(ValueError, match="activation_memory='half'"):
        local_train(module, [(x, y)], activation_memory="half")


def _sp_rows(activation_memory: str) -> list[dict]:
    torch.manual_seed(0)
    model = create_model("resnet_tiny", width=0.125)
    g = torch.Generator().manual_seed(3)
    data = {c: TensorDataset(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
            for c in range(4)}
    test = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))]
    cfg = PrismConfig(keep_ratio=0.3, activation_memory=activation_memory)
    settings = RunSettings(comm_round=5, client_num_in_total=4, client_num_per_round=2, batch_size=4,
                           frequency_of_the_test=1)
    server, client = PrismServer(model, cfg, settings, test_data=test), PrismClient(model, cfg, settings, data)
    rows = []
    while not server.finished:
        server.open_round()
        ups = []
        for c in server.selected:
            up, num, loss, start = client.train(server.payload_for(c))
            ups.append(ClientUpdate(c, up, num, loss, start))
        rows.append(server.close_round(ups))
    return rows


def test_five_round_sp_run_has_the_same_metrics_either_way() -> None:
    plain, recomputed = _sp_rows("full"), _sp_rows("principal")
    assert len(plain) == len(recomputed) == 5
    for a, b in zip(plain, recomputed, strict=True):
        for key in ("test_acc", "test_loss", "train_loss"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
