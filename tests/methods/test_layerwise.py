"""Federated Layer-wise Learning + Depth Dropout (``fedml_prism.strategies.layerwise``): the block split
reproduces the model, frozen blocks stay frozen, depth dropout never touches the trained block or a
shape-changing one, aggregation equals a slow reference, a digits run learns and logs its stage, and a
resumed run ends on the same weights."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math

import pytest
import torch
from data_utils import Interrupted, interrupt_at_round
from torch import nn

from fedml_prism.engine.costs import layer_costs
from fedml_prism.engine.sampling import make_generator
from fedml_prism.engine.server import RunSettings
from fedml_prism.engine.train import local_train
from fedml_prism.strategies import base, layerwise
from fedml_prism.workloads.data import load_federated
from fedml_prism.workloads.models import cnn, resnet18_cifar, resnet_tiny, vit_small

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def _digits(clients: int = 4):
    return load_federated("digits", clients, "iid", 0.5, seed=0)


MODELS = {
    "cnn": (lambda: cnn(num_classes=5, in_channels=1, image_size=8, width=0.125), (1, 8, 8),
            ["conv1", "conv2", "head"]),
    "cnn_hidden": (lambda: cnn(num_classes=5, in_channels=1, image_size=8, width=0.125, hidden=12), (1, 8, 8),
                   ["conv1", "conv2", "hidden", "head"]),
    "resnet_tiny": (lambda: resnet_tiny(num_classes=5, width=0.125), (3, 8, 8),
                    ["stem", "layers.0.0", "layers.1.0", "head"]),
    "resnet18": (lambda: resnet18_cifar(num_classes=5, width=0.0625), (3, 8, 8),
                 ["stem"] + [f"layers.{i}.{j}" for i in range(4) for j in range(2)] + ["head"]),
    "sequential": (lambda: nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)), (6,),
                   ["0+1", "2+3", "4"]),
}


def _blocks(name: str):
    torch.manual_seed(0)
    factory, shape, _ = MODELS[name]
    model = factory()
    x = torch.randn(4, *shape)
    return model, layerwise.split_model(model, x), x


# ------------------------------------------------------------------------------------------ the split
@pytest.mark.parametrize("name", sorted(MODELS))
def test_blocks_in_sequence_reproduce_the_model(name: str) -> None:
    model, blocks, x = _blocks(name)
    assert [b.name for b in blocks] == MODELS[name][2]
    model.eval()
    with torch.no_grad():
        out = x
        for b in blocks:
            out = b.module(out)
        assert torch.allclose(out, model(x), atol=1e-6)
    # every parameter of the model lies in exactly one block, and the blocks share the model's tensors
    owned = [id(p) for b in blocks for p in b.module.parameters()]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())


def test_identity_shaped_blocks_are_the_stride_1_same_width_ones() -> None:
    _, blocks, _ = _blocks("resnet18")
    assert [b.name for b in blocks if b.identity_shaped] == ["layers.0.0", "layers.0.1", "layers.1.1", "layers.2.1",
                                                             "layers.3.1"]
    _, blocks, _ = _blocks("cnn")
    assert not any(b.identity_shaped for b in blocks[:-1])


def test_models_that_cannot_be_split_raise() -> None:
    vit = vit_small(image_size=8, patch=4, dim=16, depth=1, heads=2, num_classes=4)
    with pytest.raises(ValueError, match="cannot be split.*cls_token"):
        layerwise.split_model(vit, torch.randn(2, 3, 8, 8))

    class Skip(nn.Module):  # children in order, but the forward adds a residual around them
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x) + x)

    with pytest.raises(ValueError, match="does not reproduce its output"):
        layerwise.split_model(Skip(), torch.randn(2, 4))
    with pytest.raises(ValueError, match="at least 2"):
        layerwise.split_model(nn.Sequential(nn.Linear(4, 2)), torch.randn(2, 4))


@pytest.mark.parametrize("shape", [(6, 4, 4), (5, 6), (6,)])
@pytest.mark.parametrize("hidden", [0, 3])
def test_aux_head_pools_to_features_then_classifies(shape: tuple[int, ...], hidden: int) -> None:
    head = layerwise.AuxHead(shape, 7, hidden)
    assert head(torch.randn(2, *shape)).shape == (2, 7)
    assert len([m for m in head.modules() if isinstance(m, nn.Linear)]) == (2 if hidden else 1)
    assert head.mlp[0].in_features == 6


# ------------------------------------------------------------------------------------------ frozen prefix
def test_frozen_prefix_has_no_grad_and_is_unchanged_by_local_training() -> None:
    model, blocks, x = _blocks("resnet_tiny")
    head = layerwise.make_aux_head(blocks[2], 5, 0, seed=0, stage=2)
    net = layerwise.client_net(blocks, 2, head)
    before = {k: v.clone() for k, v in net.prefix.state_dict().items()}
    block_before = {k: v.clone() for k, v in net.block.state_dict().items()}
    graph = []
    for m in net.prefix:
        m.register_forward_hook(lambda _m, _i, out: graph.append(out.requires_grad or out.grad_fn is not None))
    y = torch.randint(0, 5, (4,))
    stats = local_train(net, [(x, y)] * 3, lr=0.1, reg_lambda=0.0)
    assert stats.steps == 3 and graph and not any(graph)  # the prefix ran without an autograd graph
    assert all(not p.requires_grad and p.grad is None for p in net.prefix.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.prefix.state_dict().items())  # BN statistics too
    assert not all(torch.equal(block_before[k], v) for k, v in net.block.state_dict().items())
    # the client's copies are its own: the server's blocks are untouched
    assert all(torch.equal(v, blocks[2].module.state_dict()[k]) for k, v in block_before.items())


def test_client_costs_are_maxima_over_stages() -> None:
    model, blocks, _ = _blocks("resnet_tiny")
    # a made-up dataset of the 3-channel model's input shape
    data = dataclasses.replace(_digits(), x_train=torch.randn(64, 3, 8, 8), x_test=torch.randn(16, 3, 8, 8))
    settings = RunSettings(comm_round=3, batch_size=8)
    costs = layerwise.client_costs(model, blocks, data, settings, layerwise.Options(), 0, measure_memory=False)
    last_stage = sum(p.numel() for p in blocks[2].module.parameters()) + sum(p.numel() for p in model.linear.parameters())
    assert costs["stage_params"][-1] == last_stage
    assert costs["client_params"] == max(costs["stage_params"])
    assert costs["client_macs"] == max(costs["stage_macs"]) == costs["stage_macs"][-1]  # the deepest stage runs most
    dense_macs = sum(c[2] for c in layer_costs(model, data.x_test[:1]).values())
    assert costs["stage_macs"][-1] == dense_macs  # the last stage runs the whole model


# ------------------------------------------------------------------------------------------ depth dropout
def test_depth_dropout_never_drops_the_trained_block_nor_a_shape_changing_one() -> None:
    model, blocks, x = _blocks("resnet18")
    for s in range(len(blocks) - 1):
        skippable = [b.identity_shaped for b in blocks[:s]]
        for cid in range(20):
            dropped = layerwise.depth_dropout_mask(skippable, 0.95, make_generator(0, "depth", s, cid))
            assert len(dropped) == s  # one decision per frozen block: the trained block gets none
            assert not any(d and not b.identity_shaped for d, b in zip(dropped, blocks, strict=False))
            net = layerwise.client_net(blocks, s, nn.Identity(), dropped)
            assert len(net.prefix) == s - sum(dropped)
            trained = net.block.state_dict()
            assert all(torch.equal(v, blocks[s].module.state_dict()[k]) for k, v in trained.items())
            assert all(p.requires_grad for p in net.block.parameters())
            net.eval()
            with torch.no_grad():
                net(x)  # the kept blocks still chain
    # with p near 1 every identity-shaped frozen block goes at the last stage
    last = len(blocks) - 2
    dropped = layerwise.depth_dropout_mask([b.identity_shaped for b in blocks[:last]], 0.999999, make_generator(1, "d"))
    assert dropped == [b.identity_shaped for b in blocks[:last]]


@pytest.mark.parametrize("p", [0.0, 0.3, 0.7])
def test_depth_dropout_rate_matches_the_option(p: float) -> None:
    skippable = [True, False, True, True, False, True]
    n = 3000
    counts = torch.zeros(len(skippable))
    for cid in range(n):
        counts += torch.tensor(layerwise.depth_dropout_mask(skippable, p, make_generator(7, "depth", 3, cid)), dtype=torch.float)
    rate = counts / n
    tol = 4 * math.sqrt(p * (1 - p) / n) + 1e-9
    for ok, r in zip(skippable, rate.tolist(), strict=True):
        assert abs(r - p) <= tol if ok else r == 0.0


# ------------------------------------------------------------------------------------------ aggregation and schedule
def _slow_fedavg(states, weights):
    total = sum(weights)
    out = {}
    for key in states[0]:
        flat = [s[key].reshape(-1).tolist() for s in states]
        values = []
        for i in range(len(flat[0])):
            v = 0.0
            for w, f in zip(weights, flat, strict=True):
                v += w * f[i] / total
            values.append(v if states[0][key].is_floating_point() else round(v))
        out[key] = torch.tensor(values, dtype=states[0][key].dtype).reshape(states[0][key].shape)
    return out


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [3.0, 1.0, 0.5], [0.0, 2.0, 1.0]])
def test_fedavg_equals_slow_reference(weights: list[float]) -> None:
    g = torch.Generator().manual_seed(0)
    states = [
        {"block.w": torch.randn(2, 3, generator=g), "head.b": torch.randn(4, generator=g),
         "block.n": torch.randint(0, 9, (), generator=g)}
        for _ in weights
    ]
    fast, slow = layerwise.fedavg(states, weights), _slow_fedavg(states, weights)
    assert fast.keys() == slow.keys()
    for k in fast:
        assert fast[k].dtype == states[0][k].dtype
        assert torch.allclose(fast[k], slow[k], atol=1e-6), k
    # laws: identical states average to themselves; weights only matter up to scale
    assert all(torch.equal(v, states[0][k]) for k, v in layerwise.fedavg([states[0]] * 3, weights).items())
    scaled = layerwise.fedavg(states, [10 * w for w in weights])
    assert all(torch.allclose(scaled[k], fast[k]) for k in fast)
    with pytest.raises(ValueError, match="weights"):
        layerwise.fedavg(states, [0.0] * len(states))


def test_stage_schedule() -> None:
    assert layerwise.stage_schedule(10, 3) == [3, 3, 4]
    assert layerwise.stage_schedule(11, 3) == [3, 4, 4]
    assert layerwise.stage_schedule(10, 3, rounds_per_stage=2) == [2, 2, 6]
    assert [layerwise.stage_of(r, [2, 1, 3]) for r in range(6)] == [0, 0, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="comm_round=2"):
        layerwise.stage_schedule(2, 3)
    with pytest.raises(ValueError, match="rounds_per_stage=5"):
        layerwise.stage_schedule(10, 3, rounds_per_stage=5)


@pytest.mark.parametrize("bad", [
    {"depth_dropout": 1.0}, {"depth_dropout": -0.1}, {"depth_dropout": "0.5"}, {"rounds_per_stage": 0},
    {"rounds_per_stage": 1.5}, {"aux_head_hidden": -1}, {"weighting": "loss"}, {"rounds_per_stages": 2},
])
def test_bad_options_raise_naming_the_key(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        base.options_from(layerwise.Options, bad)


# ------------------------------------------------------------------------------------------ runs
def _trainable_in_build(build) -> float:
    """Stands in for the spawned measurement: runs the build here and reports its trainable size."""
    net, loss = build()
    loss().backward()
    return float(sum(p.numel() for p in net.parameters() if p.requires_grad))


def test_peak_memory_is_measured_on_a_frozen_prefix_stage_in_a_fresh_process() -> None:
    model, blocks, x = _blocks("resnet_tiny")
    net = layerwise.client_net(blocks, 2, blocks[-1].module)
    buf = io.BytesIO()
    torch.save(net, buf)
    build = functools.partial(layerwise._build_stage, buf.getvalue(), x, torch.randint(0, 5, (4,)))
    trained, loss = build()
    loss().backward()
    assert all(p.grad is None for p in trained.prefix.parameters()) and trained.block.conv1.weight.grad is not None
    assert base.peak_train_memory_mb(build) > 0


def test_digits_cnn_run_learns_and_logs_stages(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(base, "peak_train_memory_mb", _trainable_in_build)
    torch.manual_seed(0)
    data = _digits()
    model = cnn(num_classes=10, in_channels=1, image_size=8, width=0.25)
    settings = RunSettings(comm_round=3, client_num_in_total=4, client_num_per_round=3, batch_size=32,
                           learning_rate=0.05, output_dir=str(tmp_path))
    result = layerwise.run(model, data, settings, {}, seed=0)
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["stage"] for r in rows] == [1, 2, 2] and [r["block"] for r in rows] == ["conv1", "conv2", "conv2"]
    assert "stage" in (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert rows[-1]["test_acc"] > 0.5  # chance is 0.1
    # bytes: exactly the tensors of what travels, for every selected client
    blocks = layerwise.split_model(model, data.x_test[:2])
    aux = layerwise.make_aux_head(blocks[0], 10, 0, 0, 0)
    tb = base.tensor_bytes
    assert rows[0]["bytes_up"] == 3 * (tb(blocks[0].module.state_dict().values()) + tb(aux.state_dict().values()))
    assert rows[0]["bytes_down"] == rows[0]["bytes_up"]  # nothing frozen in the first stage
    up = tb(blocks[1].module.state_dict().values()) + tb(blocks[2].module.state_dict().values())
    assert rows[1]["bytes_up"] == 3 * up
    assert rows[1]["bytes_down"] == 3 * (up + tb(blocks[0].module.state_dict().values()))
    s = result.summary
    assert s["stages"] == 2 and s["stage_rounds"] == [1, 2] and s["setting"] == layerwise.SETTING
    assert s["dense_params"] == sum(p.numel() for p in model.parameters())
    assert s["client_params"] == max(s["stage_params"]) < s["dense_params"] + 1
    assert s["client_macs"] > 0 and s["final_acc"] == rows[-1]["test_acc"]
    assert s["peak_train_mb"] == max(s["stage_params"])  # the measurement ran on every stage's build


def test_resume_reaches_the_same_weights(tmp_path, monkeypatch) -> None:
    """5 rounds straight vs 3 rounds, a crash, and a resume: stages [2, 2, 1], so the crash falls in
    the middle of stage 2 (an auxiliary head in the checkpoint) and depth dropout acts in stage 3."""
    monkeypatch.setattr(base, "peak_train_memory_mb", lambda build: 1.0)
    data = _digits()
    options = {"depth_dropout": 0.75, "rounds_per_stage": 2}

    def job(out: str):
        torch.manual_seed(0)
        model = resnet_tiny(num_classes=10, in_channels=1, width=0.125)
        return model, RunSettings(comm_round=5, client_num_in_total=4, client_num_per_round=2, batch_size=64,
                                  learning_rate=0.05, output_dir=out)

    straight, settings = job(str(tmp_path / "a"))
    full = layerwise.run(straight, data, settings, options, seed=3)
    assert [r["stage"] for r in full.metrics] == [1, 1, 2, 2, 3]
    assert full.metrics[-1]["dropped_blocks"] > 0  # layers.0.0 is identity-shaped and frozen in stage 3

    resumed, settings = job(str(tmp_path / "b"))
    interrupt_at_round(monkeypatch, layerwise, 3)
    with pytest.raises(Interrupted):
        layerwise.run(resumed, data, settings, options, seed=3)
    monkeypatch.undo()
    resumed, _ = job(str(tmp_path / "b"))  # a fresh process would build the model afresh
    again = layerwise.run(resumed, data, settings, options, seed=3, resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keep = ("round", "stage", "block", "test_acc", "train_loss", "bytes_down", "bytes_up", "dropped_blocks")
    assert [{k: r[k] for k in keep} for r in again.metrics] == [{k: r[k] for k in keep} for r in full.metrics]
    with pytest.raises(ValueError, match="options"):
        layerwise.run(resumed, data, settings, {"depth_dropout": 0.25, "rounds_per_stage": 2}, seed=3, resume=True)


def test_run_rejects_too_few_rounds(tmp_path) -> None:
    model = resnet18_cifar(num_classes=10, in_channels=1, width=0.0625)
    settings = RunSettings(comm_round=4, client_num_in_total=4, client_num_per_round=2, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="comm_round=4"):
        layerwise.run(model, _digits(), settings, {}, seed=0)


def _lrs_of_a_run(tmp_path, monkeypatch, options: dict) -> list[float]:
    """The learning rate every client of a 3-round digits CNN run (stages of 1 and 2 rounds) trains with."""
    monkeypatch.setattr(base, "peak_train_memory_mb", lambda build: 1.0)
    seen: list[float] = []
    real = layerwise.local_train

    def spying(*args, **kwargs):
        seen.append(kwargs["lr"])
        return real(*args, **kwargs)

    monkeypatch.setattr(layerwise, "local_train", spying)
    torch.manual_seed(0)
    model = cnn(num_classes=10, in_channels=1, image_size=8, width=0.25)
    settings = RunSettings(comm_round=3, client_num_in_total=4, client_num_per_round=2, batch_size=32,
                           learning_rate=0.05, lr_schedule="cosine", output_dir=str(tmp_path))
    rows = layerwise.run(model, _digits(), settings, options, seed=0).metrics
    per_round = seen[::2]
    assert seen[1::2] == per_round  # both clients of a round
    assert [r["lr"] for r in rows] == per_round  # and the metrics say which
    return per_round


def test_the_learning_rate_schedule_restarts_at_every_stage(tmp_path, monkeypatch) -> None:
    """Issue 22: with one cosine over the run, the last stage (the real classifier, most of the
    parameters) ran at the schedule's tail; ``lr_schedule: stage`` (the default) restarts it per stage."""
    cos = lambda t, n: 0.05 * 0.5 * (1 + math.cos(math.pi * t / n))  # noqa: E731
    staged = _lrs_of_a_run(tmp_path / "stage", monkeypatch, {})
    assert staged == pytest.approx([cos(0, 1), cos(0, 2), cos(1, 2)])  # stages [1, 2]: 0.05 | 0.05, 0.025
    monkeypatch.undo()
    whole = _lrs_of_a_run(tmp_path / "run", monkeypatch, {"lr_schedule": "run"})
    assert whole == pytest.approx([cos(0, 3), cos(1, 3), cos(2, 3)])


@pytest.mark.parametrize("bn, tracked", [("static", False), ("running", True)])
def test_bn_option_decides_whether_running_statistics_exist_and_travel(tmp_path, monkeypatch, bn: str,
                                                                        tracked: bool) -> None:
    monkeypatch.setattr(base, "peak_train_memory_mb", lambda build: 1.0)
    torch.manual_seed(0)
    model = resnet_tiny(num_classes=10, in_channels=1, width=0.125)
    settings = RunSettings(comm_round=3, client_num_in_total=4, client_num_per_round=2, batch_size=32,
                           learning_rate=0.05, output_dir=str(tmp_path))
    method = layerwise.Layerwise(model, _digits(), settings, layerwise.Options(bn=bn), seed=0)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.track_running_stats is tracked for m in norms)
    net = layerwise.client_net(method.blocks, 1, method._use_head(1))
    assert any("running_mean" in k for k in net.trained_state()) is tracked
    method.play_round(0, [0, 1], 0.05)
    assert math.isfinite(method.evaluate()["test_acc"])
