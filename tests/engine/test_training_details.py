"""The training details of the authors' code: aggregated momentum, √σ factors, top-k warm-up, and the
per-round diagnostics. Each checked against a slow reference or a hand computation."""

from __future__ import annotations

import json

import pytest
import torch
from engine_utils import client_data, small_model
from torch import nn

from fedml_prism import PrincipalModel, PrismConfig
from fedml_prism.engine.aggregate import rotate_momentum
from fedml_prism.engine.decompose import Factors
from fedml_prism.engine.principal import ClientUpdate
from fedml_prism.engine.sampling import top_components
from fedml_prism.engine.server import PrismClient, PrismServer, RunSettings
from fedml_prism.engine.submodel import MOMENTUM
from fedml_prism.engine.train import local_train
from fedml_prism.tools.cli import main
from fedml_prism.workloads.models import resnet_tiny

_model, _client_data = small_model, client_data


def _round(pm: PrincipalModel, client: PrismClient, round_idx: int, clients: list[int]) -> list[ClientUpdate]:
    updates = []
    for c in clients:
        up, num, loss, start = client.train(pm.sample_submodel(c, round_idx).to_payload("down"))
        updates.append(ClientUpdate(c, up, num, loss, start))
    return updates


# ------------------------------------------------------------------ momentum
def test_local_train_continues_the_given_momentum() -> None:
    """One SGD step from buffer b: p ← p − lr·(μ·b + g); the returned buffer is μ·b + g."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    before = {k: v.detach().clone() for k, v in layer.named_parameters()}
    buf = {k: torch.full_like(v, 0.5) for k, v in before.items()}
    probe = nn.Linear(3, 2)
    probe.load_state_dict(layer.state_dict())
    torch.nn.functional.cross_entropy(probe(x), y).backward()
    grads = {k: p.grad for k, p in probe.named_parameters()}
    stats = local_train(layer, [(x, y)], lr=0.1, momentum=0.9, weight_decay=0.0, reg_lambda=0.0, clip_norm=None,
                        momentum_buffers=buf)
    for k, p in layer.named_parameters():
        expected_buf = 0.9 * 0.5 + grads[k]
        assert torch.allclose(stats.momentum[k], expected_buf, atol=1e-6)
        assert torch.allclose(p.detach(), before[k] - 0.1 * expected_buf, atol=1e-6)


@pytest.mark.parametrize("factor_scale", ["frozen", "sqrt"])
def test_momentum_aggregation_equals_slow_per_component_reference(factor_scale: str) -> None:
    """Factor buffers: per component i, the mean over the clients that trained i (untrained ones keep
    their buffer); dense buffers: the mean over all clients. ``refresh: false`` so no rotation."""
    model = _model()
    cfg = PrismConfig(strategy="prism", keep_ratio=0.3, optimizer_state="aggregate", refresh=False,
                      factor_scale=factor_scale, seed=1)
    pm = PrincipalModel(model, cfg)
    client = PrismClient(model, cfg, RunSettings(batch_size=4), _client_data(3))
    _ = pm.aggregate(_round(pm, client, 0, [0, 1, 2]))  # round 0 makes the buffers non-zero
    before = {k: v.clone() for k, v in pm.momentum.items()}
    subs = {c: pm.sample_submodel(c, 1) for c in range(3)}
    updates = []
    for c, sub in subs.items():
        up, num, loss, start = client.train(sub.to_payload("down"))
        updates.append(ClientUpdate(c, up, num, loss, start))
    pm.aggregate(updates)
    assert pm.layers, "the test model must have factorized layers"
    for name in pm.layers:
        for part, dim in (("u", 1), ("v", 0)):
            key = f"{name}.{part}"
            ref = before[key].clone()
            for i in range(ref.shape[dim]):
                got = []
                for u in updates:
                    idx = subs[u.client_id].components[name].tolist()
                    if i in idx:
                        buf = u.payload[MOMENTUM + key]
                        got.append(buf.select(dim, idx.index(i)))
                if got:
                    ref.select(dim, i).copy_(torch.stack(got).mean(0))
            assert torch.allclose(pm.momentum[key], ref, atol=1e-6), key
            untouched = [i for i in range(ref.shape[dim])
                         if all(i not in subs[c].components[name].tolist() for c in subs)]
            for i in untouched:
                assert torch.equal(pm.momentum[key].select(dim, i), before[key].select(dim, i))
    for key in pm.dense:
        if key in pm.momentum:
            ref = torch.stack([u.payload[MOMENTUM + key] for u in updates]).mean(0)
            assert torch.allclose(pm.momentum[key], ref, atol=1e-6), key


def test_rotate_momentum_follows_sign_flips_and_permutations() -> None:
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 3, generator=g))
    v, _ = torch.linalg.qr(torch.randn(5, 3, generator=g))
    before = Factors(u, torch.tensor([3.0, 2.0, 1.0]), v.t().contiguous())
    perm, signs = torch.tensor([1, 0, 2]), torch.tensor([1.0, -1.0, -1.0])
    after = Factors(u[:, perm] * signs, before.sigma[perm], (v.t()[perm] * signs[:, None]).contiguous())
    m = Factors(torch.randn(6, 3, generator=g), before.sigma, torch.randn(3, 5, generator=g))
    out = rotate_momentum(m, before, after)
    assert torch.allclose(out.u, m.u[:, perm] * signs, atol=1e-6)
    assert torch.allclose(out.v, m.v[perm] * signs[:, None], atol=1e-6)


def test_momentum_travels_in_payloads_and_bad_buffers_are_rejected() -> None:
    model = _model()
    cfg = PrismConfig(strategy="origdrop", keep_ratio=0.5, optimizer_state="aggregate")
    pm = PrincipalModel(model, cfg)
    client = PrismClient(model, cfg, RunSettings(batch_size=4), _client_data(2))
    down = pm.sample_submodel(0, 0).to_payload("down")
    params = dict(pm.sample_submodel(0, 0, record=False).module.named_parameters())
    assert {k[len(MOMENTUM):] for k in down if k.startswith(MOMENTUM)} == set(params)
    up, num, _, _ = client.train(down)
    assert any(float(up[MOMENTUM + k].abs().sum()) > 0 for k in params)
    missing = {k: v for k, v in up.items() if not k.startswith(MOMENTUM)}
    up2, num2, _, _ = client.train(pm.sample_submodel(1, 0).to_payload("down"))
    up2[MOMENTUM + "fc.bias"] = torch.full_like(up2[MOMENTUM + "fc.bias"], float("nan"))
    report = pm.aggregate([ClientUpdate(0, missing, num), ClientUpdate(1, up2, num2)])
    assert report.accepted == []
    assert "missing keys" in report.rejected[0] and "non-finite" in report.rejected[1]


def test_momentum_is_checkpointed() -> None:
    model = _model()
    cfg = PrismConfig(strategy="prism", keep_ratio=0.3, optimizer_state="aggregate")
    pm = PrincipalModel(model, cfg)
    client = PrismClient(model, cfg, RunSettings(batch_size=4), _client_data(2))
    pm.aggregate(_round(pm, client, 0, [0, 1]))
    restored = PrincipalModel(model, cfg)
    restored.load_state_dict(pm.state_dict())
    assert restored.momentum.keys() == pm.momentum.keys()
    assert all(torch.equal(restored.momentum[k], pm.momentum[k]) for k in pm.momentum)
    with pytest.raises(ValueError, match="momentum"):
        PrincipalModel(model, PrismConfig(strategy="prism", keep_ratio=0.3, optimizer_state="reset")).load_state_dict(
            pm.state_dict())


# ------------------------------------------------------------------ √σ factors
def test_sqrt_factors_compute_the_same_sub_model() -> None:
    model = _model()
    x = torch.randn(5, 1, 8, 8)
    outs = []
    for scale in ("frozen", "sqrt"):
        pm = PrincipalModel(model, PrismConfig(keep_ratio=0.4, factor_scale=scale, seed=2))
        sub = pm.sample_submodel(3, 0, record=False)
        outs.append(sub.module.eval()(x))
        if scale == "sqrt":
            assert all(torch.equal(b, torch.ones_like(b)) for k, b in sub.module.state_dict().items()
                       if k.endswith(".sigma"))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_sqrt_aggregation_is_the_product_of_averaged_factors() -> None:
    """``factor_scale: sqrt``: W_i = (Σ_c ũ_i^c / C_i)(Σ_c ṽ_i^c / C_i)ᵀ for trained components,
    untrained components bit-identical."""
    model = _model()
    cfg = PrismConfig(keep_ratio=0.3, factor_scale="sqrt", refresh=False, seed=4)
    pm = PrincipalModel(model, cfg)
    client = PrismClient(model, cfg, RunSettings(batch_size=4), _client_data(3))
    old = {n: f.clone() for n, f in pm.factors.items()}
    subs = {c: pm.sample_submodel(c, 0) for c in range(3)}
    updates = [ClientUpdate(c, *client.train(s.to_payload("down"))[:2]) for c, s in subs.items()]
    pm.aggregate(updates)
    for name, f in pm.factors.items():
        for i in range(len(f.sigma)):
            holders = [(u, subs[u.client_id].components[name].tolist()) for u in updates]
            us = [u.payload[name + ".u"][:, idx.index(i)] for u, idx in holders if i in idx]
            vs = [u.payload[name + ".v"][idx.index(i)] for u, idx in holders if i in idx]
            got = f.sigma[i] * torch.outer(f.u[:, i], f.v[i].flatten())
            if us:
                want = torch.outer(torch.stack(us).mean(0), torch.stack(vs).mean(0).flatten())
                assert torch.allclose(got, want, atol=1e-5)
            else:
                assert torch.equal(f.u[:, i], old[name].u[:, i]) and torch.equal(f.sigma[i], old[name].sigma[i])


# ------------------------------------------------------------------ warm-up
def test_warmup_sends_top_k_for_exactly_n_rounds() -> None:
    model = resnet_tiny(num_classes=4, width=0.25)
    pm = PrincipalModel(model, PrismConfig(strategy="prism", keep_ratio=0.25, warmup_rounds=3, seed=0))
    for r in range(6):
        subs = [pm.sample_submodel(c, r, record=False) for c in range(6)]
        topk = all(torch.equal(s.components[n], top_components(len(pm.factors[n].sigma), len(s.components[n])))
                   for s in subs for n in pm.layers)
        assert topk == (r < 3), f"round {r}"


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("field", "value"),
    [("factor_scale", "half"), ("optimizer_state", "keep"), ("warmup_rounds", -1), ("warmup_rounds", 2.5),
     ("refresh", "yes")],
)
def test_new_options_are_validated(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"PrismConfig.{field}="):
        PrismConfig(**{field: value})


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [("prism_args", {"warmup_rounds": -2}, "warmup_rounds=-2"),
     ("prism_args", {"optimizer_state": "persist"}, "optimizer_state='persist'"),
     ("train_args", {"diagnostics": "on"}, "diagnostics='on'")],
)
def test_bad_option_in_config_exits_2_before_work(tmp_path, capsys, section, values, message) -> None:
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({section: values}))
    assert main(["run", "--cf", str(cfg), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


# ------------------------------------------------------------------ diagnostics
def test_diagnostics_are_logged_per_round_and_layer(tmp_path) -> None:
    model = _model()
    data = _client_data(4)
    cfg = PrismConfig(strategy="orthdrop", keep_ratio=0.3)
    settings = RunSettings(comm_round=2, client_num_in_total=4, client_num_per_round=2, batch_size=4,
                           diagnostics=True, output_dir=str(tmp_path))
    server = PrismServer(model, cfg, settings, test_data=[(torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,)))])
    client = PrismClient(model, cfg, settings, data)
    sigma = {n: f.sigma.clone() for n, f in server.pm.factors.items()}
    server.open_round()
    payloads = {c: server.payload_for(c) for c in server.selected}
    server.record_dense_client_loss(1.25)
    ups = []
    for c, p in payloads.items():
        up, num, loss, start = client.train(p)
        ups.append(ClientUpdate(c, up, num, loss, start))
    row = server.close_round(ups)
    assert row["dense_client_loss"] == 1.25 and row["start_loss"] == row["start_loss"]
    for name, layer in row["layers"].items():
        s2 = sigma[name].double() ** 2
        idx = payloads[server.selected[0]]["prism::index::" + name]
        assert layer["energy_kept"] == pytest.approx(float(s2[idx].sum() / s2.sum()))
        assert layer["coverage"] == pytest.approx(len(idx) / layer["rank"])
        assert 1 <= layer["effective_rank"] <= layer["rank"]
        assert layer["delta_rest"] == 0.0 and layer["delta_top"] > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved[0]["layers"].keys() == row["layers"].keys()
    assert "layers" not in (tmp_path / "metrics.csv").read_text().splitlines()[0]


def test_frobenius_inner_equals_the_dense_inner_product() -> None:
    from fedml_prism.engine.aggregate import frobenius_inner
    from fedml_prism.engine.decompose import svd_factors

    g = torch.Generator().manual_seed(3)
    a = svd_factors(torch.randn(12, 5, 3, 3, generator=g))
    b = Factors(a.u + 0.1 * torch.randn(a.u.shape, generator=g), a.sigma * 2, a.v + 0.1 * torch.randn(a.v.shape, generator=g))
    assert frobenius_inner(a, b) == pytest.approx(float((a.dense().double() * b.dense().double()).sum()), rel=1e-5)
