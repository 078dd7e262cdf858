"""One test per configurable feature that had none: each checks the feature's effect against a hand
computation or a reference, so it fails when the feature breaks (Eq. 4 regularizer, weight decay and
clipping, cosine learning rate, flip/crop augmentation, min_clients_per_round, metrics.csv,
refresh: false, load_dense_state_dict, samples_per_client, data_kwargs, costs --layers,
compare_strategies, FedML's aggregation hooks, start_timeout_s, the worker idle timeout)."""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from runtime_utils import BIN, grpc_config, metrics, run, start, stop, wait_for, write_config
from torch import nn
from torch.utils.data import TensorDataset

from fedml_prism import PrincipalModel, PrismConfig
from fedml_prism.engine.aggregate import Contribution, aggregate_components
from fedml_prism.engine.layers import PrincipalConv2d, PrincipalLayer, PrincipalLinear, convert_static_bn
from fedml_prism.engine.principal import ClientUpdate
from fedml_prism.engine.server import PrismClient, PrismServer, RunSettings
from fedml_prism.engine.train import TrainStats, local_train, principal_regularizer, split_parameters
from fedml_prism.job import build_job, load_data
from fedml_prism.tools.cli import main
from fedml_prism.workloads.models import cnn


def _model() -> nn.Module:
    torch.manual_seed(0)
    return cnn(num_classes=4, in_channels=1, image_size=8, width=0.25, hidden=24)


def _client_data(n_clients: int, n: int = 12) -> dict[int, TensorDataset]:
    g = torch.Generator().manual_seed(5)
    return {c: TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))
            for c in range(n_clients)}


def _perturbed(payload: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g)) if v.is_floating_point() and not k.startswith("prism::")
            else v for k, v in payload.items()}


def _random_principal(layer: PrincipalLayer, seed: int) -> PrincipalLayer:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.u, layer.v):
            p.copy_(torch.randn(p.shape, generator=g))
        layer.sigma.copy_(torch.rand(layer.sigma.shape, generator=g) * 3 + 0.5)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    return layer


class _Spy:
    """Stands in for ``local_train`` in :mod:`fedml_prism.engine.server`: records each call, trains nothing."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, module: nn.Module, batches, **kw) -> TrainStats:
        kw["batches"] = [(x.clone(), y.clone()) for x, y in batches]
        self.calls.append(kw)
        return TrainStats(0.0, sum(len(y) for _, y in kw["batches"]), len(kw["batches"]), {})


# ------------------------------------------------------------------ Eq. 4 regularizer
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_eq4_regularizer_has_the_analytic_gradient(kind: str) -> None:
    """R = λ/2 ‖A Vᵀ‖_F² with A = U diag(σ): ∂R/∂U = λ (W V) diag(σ), ∂R/∂V = λ Aᵀ W; σ gets none."""
    layer = PrincipalLinear(7, 5, rank=3) if kind == "linear" else PrincipalConv2d(3, 5, (3, 3), rank=4)
    module = nn.Sequential(_random_principal(layer, seed=1))
    lam = 0.3
    reg = principal_regularizer(module, lam)
    reg.backward()
    u, v, s = layer.u.detach().double(), layer.v.detach().flatten(1).double(), layer.sigma.double()
    w = (u * s) @ v
    assert float(reg) == pytest.approx(0.5 * lam * float((w ** 2).sum()), rel=1e-5)
    assert torch.allclose(layer.u.grad.double(), lam * (w @ v.t()) * s, rtol=1e-4, atol=1e-6)
    assert torch.allclose(layer.v.grad.flatten(1).double(), lam * (u * s).t() @ w, rtol=1e-4, atol=1e-6)
    assert layer.bias.grad is None and not layer.sigma.requires_grad


def test_local_train_adds_the_regularizer_gradient_to_the_step() -> None:
    """One plain SGD step (no momentum, decay or clipping): p ← p − lr (∂CE/∂p + ∂R/∂p)."""
    torch.manual_seed(0)
    module = nn.Sequential(_random_principal(PrincipalLinear(6, 4, rank=2), seed=2), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 1, 0])
    lam, lr = 0.7, 0.05
    probe = {k: v.detach().clone().requires_grad_(True) for k, v in module.named_parameters()}
    layer = module[0]
    su = probe["0.u"] * layer.sigma
    out = F.linear(torch.tanh(F.linear(F.linear(x, probe["0.v"]), su, probe["0.bias"])), probe["2.weight"], probe["2.bias"])
    ce_grads = dict(zip(probe, torch.autograd.grad(F.cross_entropy(out, y), list(probe.values())), strict=True))
    w = su.detach() @ probe["0.v"].detach()
    reg_grads = {"0.u": lam * (w @ probe["0.v"].detach().t()) * layer.sigma, "0.v": lam * su.detach().t() @ w}
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    local_train(module, [(x, y)], lr=lr, momentum=0.0, weight_decay=0.0, reg_lambda=lam, clip_norm=None)
    for k, p in module.named_parameters():
        expected = before[k] - lr * (ce_grads[k] + reg_grads.get(k, 0.0))
        assert torch.allclose(p.detach(), expected, atol=1e-6), k
    assert any(float(g.abs().max()) > 1e-3 for g in reg_grads.values()), "the regularizer must matter here"


# ------------------------------------------------------------------ weight decay and clipping
def test_weight_decay_applies_to_dense_parameters_only() -> None:
    """Two runs of one step that differ only in weight decay: dense parameters differ by lr·wd·p,
    the factors u, v not at all."""
    pm = PrincipalModel(_model(), PrismConfig(keep_ratio=0.5, factor_scale="frozen"))
    batch = next(iter(torch.utils.data.DataLoader(_client_data(1, 8)[0], batch_size=8)))
    lr, wd = 0.1, 0.05
    after = {}
    for decay in (0.0, wd):
        sub = pm.sample_submodel(0, 0, record=False)
        factors, dense = split_parameters(sub.module)
        assert factors and dense
        before = {k: v.detach().clone() for k, v in sub.module.named_parameters()}
        local_train(sub.module, [batch], lr=lr, momentum=0.0, weight_decay=decay, reg_lambda=0.0, clip_norm=None)
        after[decay] = {k: v.detach().clone() for k, v in sub.module.named_parameters()}
    factor_names = {k for k in before if k.endswith((".u", ".v"))}
    assert factor_names
    for k in before:
        diff = after[wd][k] - after[0.0][k]
        if k in factor_names:
            assert torch.equal(diff, torch.zeros_like(diff)), f"weight decay reached factor {k}"
        else:
            assert torch.allclose(diff, -lr * wd * before[k], atol=1e-6), k


def test_gradient_clipping_bounds_the_total_norm_of_every_trainable_parameter() -> None:
    """``clip_grad_norm``: the step's gradient (factors and dense parameters together) has norm
    ``clip_norm`` when it was larger, and is the raw gradient otherwise."""
    pm = PrincipalModel(_model(), PrismConfig(keep_ratio=0.5, factor_scale="frozen"))
    batch = next(iter(torch.utils.data.DataLoader(_client_data(1, 8)[0], batch_size=8)))
    lr, clip = 0.1, 0.5
    steps = {}
    for clip_norm in (None, clip, 1e6):
        sub = pm.sample_submodel(0, 0, record=False)
        before = {k: v.detach().clone() for k, v in sub.module.named_parameters()}
        local_train(sub.module, [batch], lr=lr, momentum=0.0, weight_decay=0.0, reg_lambda=0.0, clip_norm=clip_norm)
        steps[clip_norm] = {k: (before[k] - v.detach()) / lr for k, v in sub.module.named_parameters()}
    raw = float(torch.cat([g.flatten() for g in steps[None].values()]).norm())
    assert raw > 2 * clip
    clipped = steps[clip]
    assert float(torch.cat([g.flatten() for g in clipped.values()]).norm()) == pytest.approx(clip, rel=1e-3)
    for k, g in clipped.items():  # the same direction: every parameter scaled by one factor
        assert torch.allclose(g, steps[None][k] * (clip / raw), atol=1e-5), k
        assert torch.allclose(steps[1e6][k], steps[None][k], atol=1e-5), k
    assert any(k.endswith(".u") for k in clipped) and any(k.endswith(".bias") for k in clipped)


# ------------------------------------------------------------------ learning-rate schedule
def test_cosine_learning_rate_reaches_training(monkeypatch) -> None:
    model = _model()
    cfg = PrismConfig(keep_ratio=0.5)
    rounds, lr = 8, 0.2
    cosine = PrismClient(model, cfg, RunSettings(comm_round=rounds, learning_rate=lr, lr_schedule="cosine"),
                         _client_data(1))
    constant = PrismClient(model, cfg, RunSettings(comm_round=rounds, learning_rate=lr), _client_data(1))
    expected = [lr * 0.5 * (1 + math.cos(math.pi * r / rounds)) for r in range(rounds)]
    assert [cosine.learning_rate(r) for r in range(rounds)] == pytest.approx(expected)
    assert expected[0] == pytest.approx(lr) and expected[rounds // 2] == pytest.approx(lr / 2)
    assert all(constant.learning_rate(r) == lr for r in range(rounds))
    spy = _Spy()
    monkeypatch.setattr("fedml_prism.engine.server.local_train", spy)
    pm = PrincipalModel(model, cfg)
    for r in (0, 3, 6):
        cosine.train(pm.sample_submodel(0, r, record=False).to_payload("down"))
    assert [c["lr"] for c in spy.calls] == pytest.approx([expected[0], expected[3], expected[6]])


def test_lr_schedule_is_read_from_the_config(tmp_path) -> None:
    cfg = write_config(tmp_path / "c.yaml", train_args={"lr_schedule": "cosine", "augment": "flip_crop"})
    job = build_job(str(cfg))
    assert job.settings.lr_schedule == "cosine" and job.settings.augment == "flip_crop"


# ------------------------------------------------------------------ augmentation
def _flip_crop_candidates(x: torch.Tensor) -> list[torch.Tensor]:
    """Every horizontal flip × 4-pixel-padded crop of one C×H×W image."""
    _, h, w = x.shape
    out = []
    for img in (x, x.flip(2)):
        padded = F.pad(img, (4, 4, 4, 4))
        out += [padded[:, dy:dy + h, dx:dx + w] for dy in range(9) for dx in range(9)]
    return out


@pytest.mark.parametrize("augment", ["none", "flip_crop"])
def test_flip_crop_augments_the_training_batches(monkeypatch, augment: str) -> None:
    """Each training image is a flip and a padded crop of its own original (labels carry the sample
    index), drawn from a generator seeded by (seed, round, client); ``none`` trains on the originals."""
    n = 10
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1, 8, 8, generator=g)
    data = {0: TensorDataset(x, torch.arange(n))}
    model = _model()
    cfg = PrismConfig(keep_ratio=0.5, seed=2)
    client = PrismClient(model, cfg, RunSettings(batch_size=4, augment=augment), data)
    spy = _Spy()
    monkeypatch.setattr("fedml_prism.engine.server.local_train", spy)
    pm = PrincipalModel(model, cfg)
    for r in (0, 0, 1):
        client.train(pm.sample_submodel(0, r, record=False).to_payload("down"))
    first, again, other = ([(xi, int(yi)) for xb, yb in c["batches"] for xi, yi in zip(xb, yb, strict=True)]
                           for c in spy.calls)
    assert sorted(i for _, i in first) == list(range(n))
    changed = 0
    for img, i in first:
        if augment == "none":
            assert torch.equal(img, x[i])
            continue
        assert any(torch.equal(img, c) for c in _flip_crop_candidates(x[i])), f"image {i} is no flip/crop of its source"
        changed += not torch.equal(img, x[i])
    if augment == "flip_crop":
        assert changed >= n // 2
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again, strict=True)), "not seeded"
        assert any(not torch.equal(a, b) for (a, _), (b, _) in zip(first, other, strict=True)), "same every round"


# ------------------------------------------------------------------ min_clients_per_round
def _play_round(server: PrismServer, client: PrismClient, answer: int) -> dict:
    server.open_round()
    updates = []
    for c in server.selected[:answer]:
        up, num, loss, start_loss = client.train(server.payload_for(c))
        updates.append(ClientUpdate(c, up, num, loss, start_loss))
    return server.close_round(updates)


def test_min_clients_per_round_keeps_the_global_model(tmp_path, caplog) -> None:
    model = _model()
    cfg = PrismConfig(keep_ratio=0.5)
    data = _client_data(4)
    strict = RunSettings(comm_round=3, client_num_in_total=4, client_num_per_round=3, min_clients_per_round=3,
                         batch_size=4, output_dir=str(tmp_path / "a"))
    server = PrismServer(model, cfg, strict)
    client = PrismClient(model, cfg, strict, data)
    before = server.pm.dense_state_dict()
    row = _play_round(server, client, answer=2)
    assert row["clients"] == 0 and "min_clients_per_round=3" in caplog.text
    after = server.pm.dense_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert server.round_idx == 1, "the round still counts"
    row = _play_round(server, client, answer=3)
    assert row["clients"] == 3
    assert any(not torch.equal(after[k], v) for k, v in server.pm.dense_state_dict().items())
    # the same two updates are aggregated when the minimum allows them
    lenient = RunSettings(comm_round=3, client_num_in_total=4, client_num_per_round=3, min_clients_per_round=2,
                          batch_size=4, output_dir=str(tmp_path / "b"))
    other = PrismServer(model, cfg, lenient)
    assert _play_round(other, PrismClient(model, cfg, lenient, data), answer=2)["clients"] == 2
    assert any(not torch.equal(before[k], v) for k, v in other.pm.dense_state_dict().items())


# ------------------------------------------------------------------ metrics.csv
def test_metrics_csv_has_one_row_per_round_matching_metrics_json(tmp_path) -> None:
    model = _model()
    cfg = PrismConfig(keep_ratio=0.5)
    settings = RunSettings(comm_round=3, client_num_in_total=4, client_num_per_round=2, batch_size=4,
                           frequency_of_the_test=2, output_dir=str(tmp_path))
    test_data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,)))]
    server = PrismServer(model, cfg, settings, test_data=test_data)
    client = PrismClient(model, cfg, settings, _client_data(4))
    for _ in range(3):
        _play_round(server, client, answer=2)
    rows = json.loads((tmp_path / "metrics.json").read_text())
    with open(tmp_path / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        header, table = reader.fieldnames, list(reader)
    assert header == [k for k in rows[0] if k != "layers"]
    assert {"round", "strategy", "test_acc", "test_loss", "train_loss", "clients", "bytes_down", "bytes_up"} <= set(header)
    assert [int(r["round"]) for r in table] == [1, 2, 3]
    for got, want in zip(table, rows, strict=True):
        for key in header:
            if isinstance(want[key], str):
                assert got[key] == want[key]
            elif isinstance(want[key], float) and math.isnan(want[key]):
                assert math.isnan(float(got[key])), key
            else:
                assert float(got[key]) == pytest.approx(want[key]), key
    assert math.isnan(float(table[0]["test_acc"])) and 0 <= float(table[1]["test_acc"]) <= 1  # every 2nd round + last


# ------------------------------------------------------------------ refresh: false
def test_refresh_false_keeps_eq3_factors_and_the_same_dense_weights() -> None:
    """Without the orthogonal refresh the factors are Eq. 3's output as is (no longer orthonormal);
    with it they are re-decomposed. The dense weights are the same either way."""
    model = _model()
    out = {}
    for refresh in (False, True):
        pm = PrincipalModel(model, PrismConfig(keep_ratio=0.4, factor_scale="frozen", refresh=refresh, seed=1))
        subs = [pm.sample_submodel(c, 0) for c in range(3)]
        payloads = [_perturbed(s.to_payload("up"), 0.2, c) for c, s in enumerate(subs)]
        eq3 = aggregate_components(pm.factors, [Contribution(p, 1.0, s.components) for p, s in zip(payloads, subs, strict=True)])
        pm.aggregate([ClientUpdate(s.client_id, p, 5) for s, p in zip(subs, payloads, strict=True)])
        out[refresh] = pm
        assert pm.layers
        for name, f in pm.factors.items():
            gram = f.u.t() @ f.u
            orthonormal = torch.allclose(gram, torch.eye(len(f.sigma)), atol=1e-4)
            if refresh:
                assert orthonormal and torch.all(f.sigma[:-1] >= f.sigma[1:])
            else:
                assert torch.equal(f.u, eq3[name].u) and torch.equal(f.v, eq3[name].v)
                assert torch.equal(f.sigma, eq3[name].sigma) and not orthonormal, name
    a, b = out[False].dense_state_dict(), out[True].dense_state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


# ------------------------------------------------------------------ load_dense_state_dict
def test_load_dense_state_dict_replaces_the_global_model() -> None:
    pm = PrincipalModel(_model(), PrismConfig(keep_ratio=0.3, seed=0))
    torch.manual_seed(9)
    other = cnn(num_classes=4, in_channels=1, image_size=8, width=0.25, hidden=24)
    state = other.state_dict()
    assert pm.layers and any(not torch.allclose(pm.dense_state_dict()[k], state[k]) for k in pm.dense_state_dict())
    pm.load_dense_state_dict(state)
    loaded = pm.dense_state_dict()
    assert loaded.keys() <= state.keys()
    for k, v in loaded.items():
        assert torch.allclose(v, state[k], atol=1e-5), k
    for f in pm.factors.values():  # factorized layers were decomposed again
        assert torch.allclose(f.u.t() @ f.u, torch.eye(len(f.sigma)), atol=1e-4)
    x = torch.randn(6, 1, 8, 8)
    assert torch.allclose(pm.dense_model().eval()(x), convert_static_bn(other).eval()(x), atol=1e-4)
    broken = {k: v for k, v in state.items() if k != pm.layers[0] + ".weight"}
    with pytest.raises(ValueError, match="missing keys"):
        pm.load_dense_state_dict(broken)


# ------------------------------------------------------------------ samples_per_client, data_kwargs
def _write_idx(folder: Path, prefix: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 6, 6), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">iiii", 2051, n, 6, 6) + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">ii", 2049, n) + labels.tobytes())


def _write_imdb(root: Path) -> None:
    words = "good bad movie plot actor great awful scene story boring".split()
    for split in ("train", "test"):
        for label in ("pos", "neg"):
            folder = root / "aclImdb" / split / label
            folder.mkdir(parents=True)
            for i in range(6):
                text = " ".join(words[(i + j) % len(words)] for j in range(12 + i))
                (folder / f"{i}_{7 if label == 'pos' else 2}.txt").write_text(text)


@pytest.mark.parametrize("dataset", ["digits", "mnist"])
def test_samples_per_client_sets_every_client_size(tmp_path, dataset: str) -> None:
    data_args = {"dataset": dataset, "partition_method": "iid"}
    if dataset == "mnist":
        _write_idx(tmp_path, "train", 120, 0)
        _write_idx(tmp_path, "t10k", 20, 1)
        data_args["data_path"] = str(tmp_path)
    sizes = {}
    for per in (None, 7):
        extra = {} if per is None else {"samples_per_client": per}
        cfg = write_config(tmp_path / f"{dataset}{per}.yaml", data_args={**data_args, **extra},
                           train_args={"client_num_in_total": 5, "client_num_per_round": 2})
        data = load_data(build_job(str(cfg)))
        sizes[per] = [len(data.client_dataset(c)) for c in range(5)]
    assert sizes[7] == [7] * 5
    assert sizes[None][0] > 7, "the default splits the training set evenly"


def test_data_kwargs_reach_the_dataset_loader(tmp_path) -> None:
    _write_imdb(tmp_path)
    shapes = {}
    for kwargs in (None, {"vocab_size": 4, "max_len": 5}):
        extra = {} if kwargs is None else {"data_kwargs": kwargs}
        cfg = write_config(tmp_path / f"imdb{kwargs is None}.yaml",
                           data_args={"dataset": "imdb", "data_path": str(tmp_path), "partition_method": "iid", **extra},
                           train_args={"client_num_in_total": 2, "client_num_per_round": 2})
        data = load_data(build_job(str(cfg)))
        shapes[kwargs is None] = (tuple(data.x_train.shape), int(data.x_train.max()))
    assert shapes[False] == ((12, 5), 4)  # 5 tokens per review, ids 1..4 (0 = padding / out of vocabulary)
    assert shapes[True][0] == (12, 200) and shapes[True][1] == 10


def test_data_kwargs_for_the_bundled_digits_are_refused(tmp_path) -> None:
    cfg = write_config(tmp_path / "d.yaml", data_args={"dataset": "digits", "data_kwargs": {"max_len": 3}})
    with pytest.raises(ValueError, match="data_kwargs"):
        load_data(build_job(str(cfg)))


# ------------------------------------------------------------------ costs --layers
def test_costs_layers_prints_the_per_layer_table_of_the_json_report(capsys) -> None:
    argv = ["costs", "--model", "cnn", "--input-shape", "1,8,8", "--keep-ratio", "0.3",
            *[f"--model-arg={k}={v}" for k, v in {"in_channels": 1, "image_size": 8, "width": 0.25, "hidden": 24,
                                                     "num_classes": 4}.items()]]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--layers"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(plain.rstrip("\n")), "--layers adds to the summary"
    table = text[len(plain.rstrip("\n")):].strip().splitlines()
    assert table[0].split() == ["layer", "kind", "params", "dense", "MACs", "dense", "MACs"]
    rows = {line.split()[0]: line.split()[1:] for line in table[1:]}
    assert len(rows) == len(report["layers"]) >= 4
    factorized = 0
    for layer in report["layers"]:
        kind, *numbers = rows[layer["name"]]
        assert kind == layer["kind"]
        assert [int(n.replace(",", "")) for n in numbers] == [layer["params"], layer["dense_params"], layer["macs"],
                                                                layer["dense_macs"]]
        factorized += layer["params"] < layer["dense_params"]
    assert factorized >= 1


# ------------------------------------------------------------------ compare_strategies (sp, one process)
@pytest.mark.timeout(240)
def test_compare_strategies_runs_each_strategy_and_writes_the_summary(tmp_path) -> None:
    cfg = write_config(tmp_path / "cmp.yaml", train_args={"comm_round": 1, "client_num_per_round": 2,
                                                           "compare_strategies": ["full", "orthdrop", "prism"]})
    out = tmp_path / "out"
    log = run([str(BIN / "fedml-prism"), "run", "--cf", str(cfg), "--output-dir", str(out)], tmp_path, "cmp.log",
              timeout=200)
    summary = json.loads((out / "summary.json").read_text())
    assert [r["strategy"] for r in summary] == ["prism", "full", "orthdrop"]  # configured first, no duplicate
    for r in summary:
        rows = metrics(out / r["strategy"])
        assert [m["round"] for m in rows] == [1] and rows[0]["strategy"] == r["strategy"] and rows[0]["clients"] == 2
        assert 0 <= r["final_acc"] <= 1 and r["client_params"] > 0
        assert (out / r["strategy"] / "checkpoint.pt").is_file()
    by = {r["strategy"]: r for r in summary}
    assert by["prism"]["client_params"] == by["orthdrop"]["client_params"] < by["full"]["client_params"]
    table = (out / "summary.md").read_text()
    for s in ("prism", "full", "orthdrop"):
        assert any(line.startswith(s) for line in table.splitlines()) and s in log


# ------------------------------------------------------------------ FedML's aggregation hooks
HOOKED = '''
"""fedml-prism with an aggregator whose FedML hooks keep only the first worker's upload and record
every call (what a DP or defense plugin does through the same hooks)."""
import json, os, sys
from collections import OrderedDict

from fedml_prism.runtimes import fedml_glue
from fedml_prism.tools.cli import main


def record(entry):
    with open(os.environ["HOOK_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\\n")


class Hooked(fedml_glue.PrismServerAggregator):
    def on_before_aggregation(self, uploads):
        uploads, idx = super().on_before_aggregation(uploads)
        record({"hook": "before", "uploads": len(uploads)})
        return [uploads[0]] + [(n, OrderedDict()) for n, _ in uploads[1:]], idx

    def on_after_aggregation(self, params):
        record({"hook": "after", "heads": sorted({k.split("/")[0] for k in params})})
        return super().on_after_aggregation(params)


fedml_glue.PrismServerAggregator = Hooked
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.timeout(300)
@pytest.mark.parametrize("runtime", ["sp", "mpi"])
def test_fedml_aggregation_hooks_change_what_is_aggregated(tmp_path, runtime: str) -> None:
    """``on_before_aggregation`` runs before PriSM's aggregate and its output is what gets aggregated;
    ``on_after_aggregation`` sees every outgoing bundle: in the sp loop and under FedML's cross-silo
    server (MPI)."""
    script = tmp_path / "hooked.py"
    script.write_text(textwrap.dedent(HOOKED))
    rounds, per_round = 2, 4
    sections = {"train_args": {"comm_round": rounds, "client_num_per_round": per_round}}
    cmd = [str(BIN / "python"), str(script), "run", "--output-dir", str(tmp_path / "out")]
    workers = per_round  # sp: each client is its own worker
    if runtime == "mpi":
        mpiexec = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
        assert mpiexec, "mpiexec missing: install the mpich wheel (pip install mpich)"
        workers = 2
        sections.update(common_args={"training_type": "cross_silo", "scenario": "horizontal"},
                        comm_args={"backend": "MPI", "worker_num": workers})
        cmd = [mpiexec, "-np", str(workers + 1), *cmd]
    cfg = write_config(tmp_path / "hooks.yaml", **sections)
    hook_log = tmp_path / "hooks.jsonl"
    proc = start([*cmd, "--cf", str(cfg)], tmp_path, "run.log", extra_env={"HOOK_LOG": str(hook_log)})
    try:
        assert proc.wait(timeout=240) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        stop(proc)
    calls = [json.loads(line) for line in hook_log.read_text().splitlines()]
    before = [c for c in calls if c["hook"] == "before"]
    after = [c for c in calls if c["hook"] == "after"]
    assert [c["uploads"] for c in before] == [workers] * rounds
    assert len(after) == rounds * workers
    assert all(c["heads"] == ["prism::finished"] for c in after[-workers:]), "the last bundles end the run"
    assert all(h.startswith("c") for c in after[:-workers] for h in c["heads"])
    rows = metrics(tmp_path / "out")
    # only the first worker's clients reach the aggregate (without the hook: all of them)
    assert [r["clients"] for r in rows] == [per_round // workers] * rounds


# ------------------------------------------------------------------ cross-silo deadlines (gRPC)
def _cli(cfg: Path, out: Path, *extra: str) -> list[str]:
    return [str(BIN / "fedml-prism"), "run", "--cf", str(cfg), "--output-dir", str(out), "--run_id", "t", *extra]


def _start_server(cfg: Path, out: Path, tmp: Path):
    server = start([*_cli(cfg, out), "--rank", "0", "--role", "server"], tmp, "server.log")
    wait_for(lambda: "cross-silo GRPC server" in (tmp / "server.log").read_text() or server.poll() is not None,
             timeout=90, what="the gRPC server to start")
    return server


@pytest.mark.timeout(240)
def test_start_timeout_starts_without_a_worker_that_never_comes_online(tmp_path) -> None:
    """Worker 2 is never started: after ``start_timeout_s`` (long enough for worker 1 to import FedML
    on a busy machine) the server runs every round with worker 1's clients and exits 0."""
    cfg = grpc_config(tmp_path, workers=2, train_args={"client_num_per_round": 4, "comm_round": 2},
                tracking_args={"start_timeout_s": 30, "round_timeout_s": 60})
    out = tmp_path / "out"
    server = _start_server(cfg, out, tmp_path)
    worker = start([*_cli(cfg, out), "--rank", "1", "--role", "client"], tmp_path, "client1.log")
    try:  # worker 2 is never started
        assert server.wait(timeout=150) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert worker.wait(timeout=30) == 0, (tmp_path / "client1.log").read_text()[-3000:]
    finally:
        for p in (server, worker):
            stop(p)
    assert "workers [2] did not come online within 30 s: starting without them" in (tmp_path / "server.log").read_text()
    rows = metrics(out)
    assert [r["round"] for r in rows] == [1, 2] and [r["clients"] for r in rows] == [2, 2]


@pytest.mark.timeout(240)
def test_worker_exits_after_client_idle_timeout_of_server_silence(tmp_path) -> None:
    """The server is stopped (alive, silent) after round 1; the worker's watchdog ends it with exit
    code 3 after ``client_idle_timeout_s``, instead of FedML's wait forever."""
    cfg = grpc_config(tmp_path, workers=1, train_args={"client_num_per_round": 2, "comm_round": 5},
                tracking_args={"client_idle_timeout_s": 4, "round_timeout_s": 60})
    out = tmp_path / "out"
    server = _start_server(cfg, out, tmp_path)
    worker = start([*_cli(cfg, out), "--rank", "1", "--role", "client"], tmp_path, "client1.log")
    try:
        wait_for(lambda: (out / "metrics.json").exists() and len(metrics(out)) >= 1, timeout=120, what="round 1")
        os.killpg(server.pid, signal.SIGSTOP)
        assert worker.wait(timeout=60) == 3, (tmp_path / "client1.log").read_text()[-3000:]
    finally:
        for p in (server, worker):
            stop(p)
    assert "no message from the server for 4 s: worker exits" in (tmp_path / "client1.log").read_text()
    assert len(metrics(out)) < 5


def test_watchdog_ends_a_silent_worker_process_only_after_the_idle_time() -> None:
    code = textwrap.dedent("""
        import time, types
        from fedml_prism.runtimes.cross_silo.launch import _watchdog
        trainer = types.SimpleNamespace(last_message_at=time.time())
        _watchdog(trainer, idle_s=1.0)
        for _ in range(8):  # messages keep arriving for 2 s: the worker stays
            time.sleep(0.25)
            trainer.last_message_at = time.time()
        print("alive", flush=True)
        time.sleep(30)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3 and out.stdout.strip() == "alive", out.stderr

