"""FedGKT (fedml_prism.strategies.fedgkt): the model split, the distillation loss, logits that stay with
their samples when loaders shuffle, exact byte counts, a short run on digits and exact resume."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedml_prism.engine.rounds import read_checkpoint
from fedml_prism.engine.server import RunSettings, select_clients
from fedml_prism.strategies import base, fedgkt
from fedml_prism.workloads.data import load_federated
from fedml_prism.workloads.models import cnn, lstm_imdb, resnet_tiny, vit_small

pytestmark = pytest.mark.timeout(300)


def _digits_cnn() -> nn.Module:
    torch.manual_seed(0)
    return cnn(num_classes=10, in_channels=1, image_size=8, width=0.25)


@pytest.fixture(scope="module")
def digits():
    return load_federated("digits", 4, "iid", 0.5, 0)


@pytest.fixture(scope="module")
def small_digits():
    """80 samples per client: enough for shuffled batches and a partial last batch, fast to train."""
    return load_federated("digits", 4, "dirichlet", 0.5, 0, samples_per_client=80)


# ---------------------------------------------------------------------------------------------- the split
@pytest.mark.parametrize("name,blocks", [("cnn", 0), ("resnet_tiny", 0), ("resnet_tiny", 1)])
def test_split_runs_end_to_end_and_starts_as_the_model(name: str, blocks: int) -> None:
    """Client features feed the server, which predicts num_classes; at the start extractor → server is
    the job's model itself, the head is a pooled linear on the features, and the model is left alone."""
    torch.manual_seed(0)
    if name == "cnn":
        model, x = cnn(num_classes=7, in_channels=1, image_size=8, width=0.25), torch.randn(5, 1, 8, 8)
    else:
        model, x = resnet_tiny(num_classes=7, in_channels=3, width=0.125), torch.randn(5, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    client, server = fedgkt.split_model(model, client_blocks=blocks, seed=3)
    for module in (model, client, server):
        module.eval()
    with torch.no_grad():
        features = client.extractor(x)
        assert features.dim() == 4 and len(features) == 5
        assert server(features).shape == (5, 7)
        assert client(x).shape == (5, 7)
        torch.testing.assert_close(server(features), model(x))
    assert client.head[-1].in_features == features.shape[1]
    with torch.no_grad():
        next(server.parameters()).add_(1.0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    client_params = sum(p.numel() for p in client.parameters())
    assert client_params < sum(p.numel() for p in model.parameters())


def test_split_refuses_other_models_and_too_many_client_blocks() -> None:
    with pytest.raises(ValueError, match="ViT"):
        fedgkt.split_model(vit_small(image_size=8, patch=4, dim=16, depth=1, heads=2))
    with pytest.raises(ValueError, match="LSTMClassifier"):
        fedgkt.split_model(lstm_imdb(vocab_size=10, hidden=8))
    with pytest.raises(ValueError, match=r"client_blocks=2 .*\[0, 1\]"):
        fedgkt.split_model(resnet_tiny(width=0.125), client_blocks=2)
    with pytest.raises(ValueError, match="client_blocks=1"):
        fedgkt.split_model(cnn(image_size=8, width=0.25), client_blocks=1)


def test_head_initialisation_depends_on_the_seed_only() -> None:
    a, _ = fedgkt.split_model(_digits_cnn(), seed=1)
    torch.manual_seed(123)
    b, _ = fedgkt.split_model(_digits_cnn(), seed=1)
    c, _ = fedgkt.split_model(_digits_cnn(), seed=2)
    assert torch.equal(a.head[-1].weight, b.head[-1].weight)
    assert not torch.equal(a.head[-1].weight, c.head[-1].weight)


# ---------------------------------------------------------------------------------------------- the loss
def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for temperature in (1.0, 3.0, 0.5):
        assert fedgkt.kd_loss(s, s.clone(), temperature).item() == 0.0
        assert fedgkt.kd_loss(s, t, temperature).item() > 0
    # a shift of every logit of a row changes no probability
    assert fedgkt.kd_loss(s + 2.0, s, 3.0).abs().item() < 1e-6


def test_kd_loss_matches_a_slow_reference() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    temperature = 2.5
    total = 0.0
    for row in range(4):
        p = [float(v) for v in F.softmax(t[row] / temperature, 0)]
        q = [float(v) for v in F.softmax(s[row] / temperature, 0)]
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
    expected = temperature**2 * total / 4
    assert fedgkt.kd_loss(s, t, temperature).item() == pytest.approx(expected, rel=1e-9)


def test_distill_loss_is_ce_without_a_teacher_and_ce_plus_alpha_kd_with_one() -> None:
    g = torch.Generator().manual_seed(2)
    out, teacher, y = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.tensor([0, 1, 2, 3, 0])
    loss, ce, kd = fedgkt.distill_loss(out, y, None, 3.0, 0.5)
    assert torch.equal(loss, F.cross_entropy(out, y)) and kd.item() == 0.0
    loss, ce, kd = fedgkt.distill_loss(out, y, teacher, 3.0, 0.25)
    torch.testing.assert_close(loss, ce + 0.25 * fedgkt.kd_loss(out, teacher, 3.0))


# ---------------------------------------------------------------------------------------------- sample keys
def _identity(classes: int) -> nn.Linear:
    layer = nn.Linear(classes, classes)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(classes))
        layer.bias.zero_()
    return layer


def test_client_teacher_logits_follow_their_samples_when_the_loader_shuffles() -> None:
    """A student that outputs 5·onehot(label) and a teacher of 5·onehot(label) per sample: KD is 0 on
    every shuffled batch only if each sample meets its own teacher row. Keying the teacher by batch
    index (FedML) would pair the shuffled batches with other samples' rows, here of other labels."""
    classes, n, batch = 4, 12, 4
    y = torch.arange(classes).repeat_interleave(n // classes)  # sorted: rows of a batch index share a label
    x = 5.0 * F.one_hot(y, classes).float()
    teacher = x.clone()
    student = _identity(classes)
    stats = fedgkt.train_client(
        student, TensorDataset(x, y), teacher, epochs=2, batch_size=batch, lr=0.0, momentum=0.9, weight_decay=5e-4,
        clip_norm=5.0, temperature=3.0, alpha=0.5, generator=torch.Generator().manual_seed(7))
    assert stats.samples == 2 * n
    assert stats.kd == 0.0 and stats.ce > 0

    # the same shuffle, keyed by batch index instead: the case discriminates
    order = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch, shuffle=True,
                       generator=torch.Generator().manual_seed(7))
    batches = [idx for (idx,) in order]
    assert torch.cat(batches).tolist() != list(range(n))
    wrong = [fedgkt.kd_loss(x[idx], teacher[b * batch:(b + 1) * batch], 3.0) for b, idx in enumerate(batches)]
    assert max(float(v) for v in wrong) > 1.0


def test_server_distils_each_sample_against_its_own_client_logits() -> None:
    """Server side of the same law: shuffled batches across two clients' cached uploads pair each
    feature row with its own client logits and label, and the reply lists logits in sample order."""
    classes = 3
    cache = fedgkt.FeatureCache()
    labels = {0: torch.tensor([2, 2, 0, 1, 1]), 1: torch.tensor([0, 0, 1, 2])}
    for cid, y in labels.items():
        code = 5.0 * F.one_hot(y, classes).float()
        cache.put(cid, fedgkt.Upload(code, code.clone(), y))
    stats = fedgkt.train_server(
        _identity(classes), cache, epochs=3, batch_size=2, lr=0.0, momentum=0.9, weight_decay=5e-4, clip_norm=5.0,
        temperature=3.0, alpha=1.0, generator=torch.Generator().manual_seed(0))
    assert stats.samples == 27 and stats.kd == 0.0
    reply = fedgkt.server_logits(_identity(classes), cache.uploads[0].features)
    assert reply.argmax(1).tolist() == labels[0].tolist()


def test_feature_cache_gather_matches_concatenation() -> None:
    g = torch.Generator().manual_seed(4)
    cache = fedgkt.FeatureCache()
    for cid, n in ((5, 3), (1, 4), (3, 2)):  # inserted out of id order
        cache.put(cid, fedgkt.Upload(torch.randn(n, 2, 2, 2, generator=g), torch.randn(n, 3, generator=g),
                                     torch.randint(0, 3, (n,), generator=g)))
    reference = [torch.cat([cache.uploads[c].tensors()[i] for c in sorted(cache.uploads)]) for i in range(3)]
    positions = torch.randperm(len(cache), generator=g)
    got = cache.gather(positions)
    assert len(cache) == 9
    for mine, ref in zip(got.tensors(), reference, strict=True):
        assert torch.equal(mine, ref[positions])


# ---------------------------------------------------------------------------------------------- runs
def _settings(out: str, rounds: int) -> RunSettings:
    return RunSettings(comm_round=rounds, client_num_in_total=4, client_num_per_round=2, epochs=1, batch_size=32,
                       learning_rate=0.05, output_dir=out)


def test_run_on_digits_writes_metrics_counts_bytes_and_beats_chance(tmp_path, digits) -> None:
    out = str(tmp_path / "run")
    result = fedgkt.run(_digits_cnn(), digits, _settings(out, 3), {"server_epochs": 2}, seed=0, device="cpu")
    with open(f"{out}/metrics.json") as f:
        rows = json.load(f)
    assert len(rows) == 3 and [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["strategy"] == "fedgkt" and 0 <= r["client_acc"] <= 1 for r in rows)
    assert rows[-1]["test_acc"] > 0.5  # 10 classes: chance is 0.1
    # bytes: features (16×4×4 float32) + logits (10 float32) + labels (int64) up, server logits down
    for r, row in enumerate(rows):
        n = sum(len(digits.client_indices[c]) for c in select_clients(0, r, 4, 2))
        assert row["bytes_up"] == n * (16 * 4 * 4 * 4 + 10 * 4 + 8)
        assert row["bytes_down"] == n * 10 * 4
    summary = result.summary
    assert summary["setting"] == base.SHARES_ACTIVATIONS == fedgkt.SETTING
    assert summary["final_acc"] == rows[-1]["test_acc"]
    assert summary["client_params"] + summary["server_params"] > summary["dense_params"]  # the extra head
    assert summary["client_params"] < summary["server_params"]
    assert summary["client_macs"] > 0 and summary["peak_train_mb"] > 0
    assert summary["feature_shape"] == [16, 4, 4]
    assert summary["bytes_per_round"] == sum(r["bytes_up"] + r["bytes_down"] for r in rows) / 3
    # server_data: seen (default) trains on every client seen so far; round on this round's uploads only
    seen = set()
    for r, row in enumerate(rows):
        seen |= set(select_clients(0, r, 4, 2))
        assert row["server_samples"] == row["cached_samples"] == sum(len(digits.client_indices[c]) for c in seen)


def test_server_data_round_trains_on_this_rounds_uploads_only(tmp_path, digits) -> None:
    out = str(tmp_path / "round")
    fedgkt.run(_digits_cnn(), digits, _settings(out, 3), {"server_data": "round"}, seed=0, device="cpu")
    with open(f"{out}/metrics.json") as f:
        rows = json.load(f)
    for r, row in enumerate(rows):
        assert row["server_samples"] == sum(len(digits.client_indices[c]) for c in select_clients(0, r, 4, 2))
    assert rows[-1]["cached_samples"] > rows[-1]["server_samples"]


def test_resume_reproduces_an_uninterrupted_run(tmp_path, small_digits, monkeypatch) -> None:
    """4 rounds straight = 2 rounds, then 2 more resumed from the checkpoint: server and every client's
    weights, momentum and last server logits bit for bit, and the same metrics."""
    digits = small_digits
    monkeypatch.setattr(fedgkt.base, "peak_train_memory_mb", lambda build: 0.0)  # not under test here
    opts = {"alpha": 0.7, "temperature": 2.0}
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    full = fedgkt.run(_digits_cnn(), digits, _settings(straight, 4), opts, seed=5, device="cpu")
    fedgkt.run(_digits_cnn(), digits, _settings(split, 2), opts, seed=5, device="cpu")
    resumed = fedgkt.run(_digits_cnn(), digits, _settings(split, 4), opts, seed=5, resume=True, device="cpu")

    a, b = read_checkpoint(straight, "fedgkt", None), read_checkpoint(split, "fedgkt", None)
    assert a["round"] == b["round"] == 4 and a["method"] == "fedgkt"
    assert a["server"].keys() == b["server"].keys()
    assert all(torch.equal(a["server"][k], b["server"][k]) for k in a["server"])
    assert all(torch.equal(a["server_momentum"][k], b["server_momentum"][k]) for k in a["server_momentum"])
    assert sorted(a["clients"]) == sorted(b["clients"]) and len(a["clients"]) >= 3
    for cid, state in a["clients"].items():
        other = b["clients"][cid]
        assert all(torch.equal(state["model"][k], other["model"][k]) for k in state["model"])
        assert all(torch.equal(state["momentum"][k], other["momentum"][k]) for k in state["momentum"])
        assert torch.equal(state["teacher"], other["teacher"])
    keys = ("test_acc", "test_loss", "train_loss", "client_acc", "server_loss", "bytes_up", "bytes_down")
    assert [[r[k] for k in keys] for r in full.metrics] == [[r[k] for k in keys] for r in resumed.metrics]

    with pytest.raises(ValueError, match="alpha"):
        fedgkt.run(_digits_cnn(), digits, _settings(split, 5), {**opts, "alpha": 0.1}, seed=5, resume=True, device="cpu")


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("key,value", [
    ("temperature", 0), ("temperature", -1.0), ("temperature", float("nan")), ("alpha", 1.5), ("alpha", -0.1),
    ("server_epochs", 0), ("server_epochs", 1.5), ("server_lr", 0.0), ("server_lr", "fast"), ("client_blocks", -1),
    ("client_blocks", True), ("server_data", "all"), ("nonsense", 1),
])
def test_bad_options_raise_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        base.options_from(fedgkt.Options, {key: value})


def test_default_options_and_bad_split_option_in_a_run(tmp_path, digits) -> None:
    opts = base.options_from(fedgkt.Options, {})
    assert (opts.temperature, opts.alpha, opts.server_epochs, opts.server_lr, opts.client_blocks) == (3.0, 0.5, 1, None, 0)
    with pytest.raises(ValueError, match="client_blocks"):
        fedgkt.run(_digits_cnn(), digits, _settings(str(tmp_path), 1), {"client_blocks": 1}, seed=0, device="cpu")


@pytest.mark.parametrize("options, server_alpha", [({}, 0.0), ({"server_kd": True, "alpha": 0.3}, 0.3),
                                                   ({"server_kd": False, "alpha": 0.3}, 0.0)])
def test_the_server_distils_only_with_server_kd(tmp_path, digits, monkeypatch, options, server_alpha) -> None:
    """FedML's published runs train the server on cross-entropy alone (``whether_distill_on_the_server:
    0``), the default here; ``server_kd: true`` adds the paper's ``alpha * KD``. Clients distil either way."""
    calls: dict[str, list[float]] = {"server": [], "client": []}
    real_server, real_client = fedgkt.train_server, fedgkt.train_client

    def server(*args, **kwargs):
        calls["server"].append(kwargs["alpha"])
        return real_server(*args, **kwargs)

    def client(*args, **kwargs):
        calls["client"].append(kwargs["alpha"])
        return real_client(*args, **kwargs)

    monkeypatch.setattr(fedgkt, "train_server", server)
    monkeypatch.setattr(fedgkt, "train_client", client)
    fedgkt.run(_digits_cnn(), digits, _settings(str(tmp_path), 2), options, seed=0, device="cpu")
    assert calls["server"] == [server_alpha] * 2
    assert calls["client"] == [options.get("alpha", 0.5)] * 4


def test_server_cross_entropy_alone_ignores_the_clients_logits() -> None:
    torch.manual_seed(0)
    server = nn.Linear(6, 3)
    cache = fedgkt.FeatureCache()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    weights = []
    for logits in (torch.zeros(8, 3), torch.randn(8, 3) * 5):
        cache.put(0, fedgkt.Upload(x, logits, y))
        net = copy.deepcopy(server)
        fedgkt.train_server(net, cache, epochs=1, batch_size=4, lr=0.1, momentum=0.0, weight_decay=0.0, clip_norm=None,
                            temperature=3.0, alpha=0.0, generator=torch.Generator().manual_seed(0), device="cpu")
        weights.append(net.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
