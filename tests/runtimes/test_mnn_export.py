"""Sub-model → ONNX → MNN export: same outputs, the device trains exactly the sub-model's parameters,
and the trained graph maps back onto the payload the server checks."""

from __future__ import annotations

import copy

import pytest
import torch

from fedml_prism import PrincipalModel, PrismConfig
from fedml_prism.engine.layers import convert_static_bn
from fedml_prism.engine.principal import ClientUpdate
from fedml_prism.runtimes.cross_device import mnn_export as me
from fedml_prism.workloads.models import cnn, resnet_tiny

# Exported graphs compute in float32 with other kernels; measured differences are ~1e-7 on
# probabilities, the bound leaves room for other CPUs.
TOLERANCE = 1e-5

CASES = {
    "cnn": (lambda: cnn(in_channels=1, image_size=16, width=0.25, hidden=32), (1, 16, 16)),
    "resnet": (lambda: resnet_tiny(in_channels=3, width=0.25), (3, 16, 16)),
}


def _principal(name: str, strategy: str = "prism", seed: int = 0) -> tuple[PrincipalModel, tuple[int, ...]]:
    factory, shape = CASES[name]
    torch.manual_seed(seed)
    return PrincipalModel(convert_static_bn(factory()), PrismConfig(strategy=strategy, keep_ratio=0.4, seed=seed)), shape


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("strategy", ["prism", "full"])
def test_exported_graph_computes_the_pytorch_submodel(tmp_path, name, strategy) -> None:
    pm, shape = _principal(name, strategy)
    sub = pm.sample_submodel(0, 0)
    if strategy == "prism":
        assert any(isinstance(m, me.PrincipalLayer) for m in sub.module.modules())
    graph = me.MnnExporter(shape).export(sub.module, str(tmp_path / "sub.mnn"))
    x = torch.randn(6, *shape)
    want = torch.softmax(sub.module.train()(x), dim=1).detach()
    got = me.predict(graph.path, x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOLERANCE
    # every trainable tensor of the sub-model is a parameter of the graph, mapped to its key
    trainable = {f"net.{k}" for k, _ in sub.module.named_parameters()}
    assert trainable <= set(graph.keys)
    assert len(graph.keys) == len(set(graph.keys))


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_device_step_equals_a_pytorch_sgd_step(tmp_path, name) -> None:
    """One SGD step of the MNN device (SGD, cross entropy on probabilities) moves every parameter as
    PyTorch's SGD step on the same sub-model and batch does. The one difference is the first factor's
    bias v_b that MNN's converter adds and trains: on return it is folded into the layer bias,
    b + U σ v_b, which the expected bias accounts for (v_b after one step = -lr σ ⊙ Uᵀ ∂L/∂b)."""
    pm, shape = _principal(name)
    sub = pm.sample_submodel(1, 0)
    graph = me.MnnExporter(shape).export(sub.module, str(tmp_path / "sub.mnn"))
    x, y = torch.randn(8, *shape), torch.randint(0, 10, (8,))
    lr = 0.1
    start = {k: v.clone() for k, v in sub.module.state_dict().items()}
    module = copy.deepcopy(sub.module).train()
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    torch.nn.functional.cross_entropy(module(x), y).backward()
    opt.step()
    want = {k: v.clone() for k, v in module.state_dict().items()}
    for layer, has_bias in graph.principal.items():
        if has_bias:
            sigma = graph.sigma[layer]
            grad_b = (start[layer + ".bias"] - want[layer + ".bias"]) / lr
            v_b = -lr * sigma * (start[layer + ".u"].t() @ grad_b)
            want[layer + ".bias"] = want[layer + ".bias"] + (want[layer + ".u"] * sigma) @ v_b
    me.train_graph(graph.path, [(x, y)], 10, lr)
    got = me.read_trained(graph.path, graph, sub.to_payload("up"))
    moved = 0
    for key, value in want.items():
        if key not in got:
            continue
        assert torch.allclose(got[key], value, atol=2e-5, rtol=1e-4), key
        moved += int(not torch.equal(value, start[key]))
    assert moved >= len(list(sub.module.parameters())) - 1  # the step changed (nearly) every parameter


def test_untrained_graph_maps_back_to_what_was_sent_and_is_accepted(tmp_path) -> None:
    pm, shape = _principal("resnet")
    sub = pm.sample_submodel(2, 0)
    graph = me.MnnExporter(shape).export(sub.module, str(tmp_path / "sub.mnn"))
    sent = sub.to_payload("up")
    back = me.read_trained(graph.path, graph, sent)
    assert list(back) == list(sent)
    for key in sent:
        assert torch.allclose(back[key].float(), sent[key].float(), atol=1e-6), key
    report = pm.aggregate([ClientUpdate(2, back, 10, 0.0)])
    assert report.accepted == [2] and not report.rejected


def test_trained_graph_changes_the_aggregate(tmp_path) -> None:
    pm, shape = _principal("cnn")
    before = pm.dense_state_dict()
    exporter = me.MnnExporter(shape)
    updates = []
    for client in range(2):
        sub = pm.sample_submodel(client, 0)
        graph = exporter.export(sub.module, str(tmp_path / f"c{client}.mnn"))
        batches = [(torch.randn(8, *shape), torch.randint(0, 10, (8,))) for _ in range(3)]
        samples, loss = me.train_graph(graph.path, batches, 10, 0.05, epochs=2)
        assert samples == 24 and loss == loss
        updates.append(ClientUpdate(client, me.read_trained(graph.path, graph, sub.to_payload("up")), samples, loss))
    assert pm.aggregate(updates).accepted == [0, 1]
    after = pm.dense_state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))


def test_graph_saved_by_the_device_keeps_its_parameter_order(tmp_path) -> None:
    """The device re-saves the graph from an NC4HW4 placeholder (as the Android SDK does); reading it
    must give the same parameters in the same order."""
    pm, shape = _principal("cnn")
    sub = pm.sample_submodel(0, 0)
    graph = me.MnnExporter(shape).export(sub.module, str(tmp_path / "sub.mnn"))
    before = me.read_parameters(graph.path)
    me.train_graph(graph.path, [(torch.randn(4, *shape), torch.randint(0, 10, (4,)))], 10, 0.0)  # lr 0: only the save
    after = me.read_parameters(graph.path)
    assert [a.shape for a in after] == [b.shape for b in before]
    assert all((a == b).all() for a, b in zip(after, before, strict=True))


def test_evaluate_graph_gives_accuracy_and_loss(tmp_path) -> None:
    pm, shape = _principal("cnn")
    model = pm.dense_model()
    graph = me.MnnExporter(shape).export(model, str(tmp_path / "global.mnn"))
    x, y = torch.randn(20, *shape), torch.randint(0, 10, (20,))
    acc, loss = me.evaluate_graph(graph.path, [(x[:10], y[:10]), (x[10:], y[10:])])
    with torch.no_grad():
        logits = torch.cat([model.train()(x[:10]), model(x[10:])])
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), abs=1e-4)


def test_unsupported_norm_layer_is_a_clear_error(tmp_path) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm1d(4))
    with pytest.raises(TypeError, match="BatchNorm1d cannot be exported"):
        me.MnnExporter((1, 8, 8)).export(model, str(tmp_path / "x.mnn"))
