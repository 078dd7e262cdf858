"""Issue 21's variants: hybrid sampling (``top_share``), the coverage-aware step (``history_mix``) and the
server optimizer (FedAvgM / FedAdam). Each checked against a hand computation or the plain path."""

from __future__ import annotations

import pytest
import torch
from engine_utils import client_data as _client_data
from engine_utils import small_model as _model

from fedml_prism import PrincipalModel, PrismConfig
from fedml_prism.engine.aggregate import Contribution, aggregate_components, mix_history
from fedml_prism.engine.decompose import Factors
from fedml_prism.engine.principal import ClientUpdate
from fedml_prism.engine.sampling import hybrid_components, make_generator, sample_components
from fedml_prism.engine.server import PrismClient, RunSettings
from fedml_prism.engine.server_opt import ServerOptimizer


def _play(cfg: PrismConfig, rounds: int, clients: int = 3) -> PrincipalModel:
    pm = PrincipalModel(_model(), cfg)
    client = PrismClient(_model(), cfg, RunSettings(batch_size=4), _client_data(clients))
    for r in range(rounds):
        updates = []
        for c in range(clients):
            up, num, loss, start = client.train(pm.sample_submodel(c, r).to_payload("down"))
            updates.append(ClientUpdate(c, up, num, loss, start))
        report = pm.aggregate(updates)
        assert report.accepted == list(range(clients))
    return pm


def _close(a: PrincipalModel, b: PrincipalModel, atol: float) -> None:
    sa, sb = a.dense_state_dict(), b.dense_state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=atol), k


# ------------------------------------------------------------------ hybrid sampling
def test_hybrid_sends_the_top_components_and_samples_the_rest_from_the_tail() -> None:
    sigma = torch.linspace(10, 1, 20)
    for seed in range(30):
        idx = hybrid_components(sigma, keep=8, top=5, kappa=4.0, generator=make_generator(seed, "h"))
        assert len(idx) == 8 and len(set(idx.tolist())) == 8
        assert idx[:5].tolist() == [0, 1, 2, 3, 4]
        assert bool((idx[5:] >= 5).all())
        assert idx.tolist() == sorted(idx.tolist())


def test_hybrid_tail_follows_the_importance_law_of_the_tail() -> None:
    """The one sampled tail component is drawn ∝ σ^κ over the tail alone."""
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0])
    counts = torch.zeros(4)
    n = 4000
    for seed in range(n):
        idx = hybrid_components(sigma, keep=2, top=1, kappa=1.0, generator=make_generator(seed, "law"))
        counts[idx] += 1
    assert counts[0] == n
    expected = torch.tensor([3.0, 2.0, 1.0]) / 6
    assert torch.allclose(counts[1:] / n, expected, atol=0.03)


def test_top_share_zero_draws_exactly_the_papers_sample_and_one_gives_orthdrop() -> None:
    sigma = torch.rand(16, generator=torch.Generator().manual_seed(1)).sort(descending=True).values
    a = hybrid_components(sigma, 5, 0, 4.0, make_generator(3, "x"))
    b = sample_components(sigma, 5, 4.0, make_generator(3, "x"))
    assert torch.equal(a, b)
    assert hybrid_components(sigma, 5, 5, 4.0, make_generator(3, "x")).tolist() == [0, 1, 2, 3, 4]
    hybrid = PrincipalModel(_model(), PrismConfig(strategy="prism", top_share=1.0))
    top = PrincipalModel(_model(), PrismConfig(strategy="orthdrop"))
    for c in range(3):
        assert {k: v.tolist() for k, v in hybrid.sample_submodel(c, 0).components.items()} == \
               {k: v.tolist() for k, v in top.sample_submodel(c, 0).components.items()}


def test_top_share_in_the_model_keeps_round_of_share_times_k_top_components() -> None:
    pm = PrincipalModel(_model(), PrismConfig(strategy="prism", keep_ratio=0.5, top_share=0.5))
    for c in range(5):
        sub = pm.sample_submodel(c, 0)
        for name, idx in sub.components.items():
            keep = len(idx)
            top = round(0.5 * keep)
            assert idx[:top].tolist() == list(range(top)), name


# ------------------------------------------------------------------ coverage-aware step
def test_mix_history_moves_each_component_c_over_c_plus_tau_of_the_way() -> None:
    g = torch.Generator().manual_seed(0)
    old = Factors(torch.randn(6, 4, generator=g), torch.ones(4), torch.randn(4, 5, generator=g))
    # component 0 trained by 1 client, 1 by 3, 2 by none, 3 by 2
    picks = [torch.tensor([0, 1]), torch.tensor([1, 3]), torch.tensor([1, 3])]
    contributions = [Contribution({"l.u": torch.randn(6, 2, generator=g), "l.v": torch.randn(2, 5, generator=g)},
                                  1.0, {"l": p}) for p in picks]
    agg = aggregate_components({"l": old}, contributions)["l"]
    hits = torch.tensor([1, 3, 0, 2])
    mixed = mix_history(agg, old, hits, tau=2.0)
    for i, c in enumerate(hits.tolist()):
        s = c / (c + 2.0)
        assert torch.allclose(mixed.u[:, i], old.u[:, i] + s * (agg.u[:, i] - old.u[:, i]), atol=1e-6)
        assert torch.allclose(mixed.v[i], old.v[i] + s * (agg.v[i] - old.v[i]), atol=1e-6)
    assert torch.equal(mixed.u[:, 2], old.u[:, 2]) and torch.equal(mixed.v[2], old.v[2])
    assert mix_history(agg, old, hits, tau=0.0) is agg


def test_history_mix_shrinks_the_rounds_change_toward_the_previous_model() -> None:
    plain = _play(PrismConfig(strategy="prism", keep_ratio=0.5), 1)
    mixed = _play(PrismConfig(strategy="prism", keep_ratio=0.5, history_mix=3.0), 1)
    start = PrincipalModel(_model(), PrismConfig(strategy="prism", keep_ratio=0.5))
    for name in start.layers:
        w0 = start.factors[name].dense()
        moved_plain = (plain.factors[name].dense() - w0).norm()
        moved_mixed = (mixed.factors[name].dense() - w0).norm()
        assert 0 < moved_mixed < 0.8 * moved_plain, name


# ------------------------------------------------------------------ server optimizer
def test_avgm_with_unit_lr_and_no_momentum_is_fedavg() -> None:
    plain = _play(PrismConfig(strategy="prism", keep_ratio=0.5), 2)
    avgm = _play(PrismConfig(strategy="prism", keep_ratio=0.5, server_optimizer="avgm", server_lr=1.0,
                             server_momentum=0.0), 2)
    _close(plain, avgm, atol=1e-5)


def test_avgm_and_adam_steps_match_their_formulas() -> None:
    old, agg = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.0])
    opt = ServerOptimizer(PrismConfig(server_optimizer="avgm", server_lr=0.5, server_momentum=0.9))
    w1 = opt.step("w", old, agg)  # m = Δ
    assert torch.allclose(w1, old + 0.5 * (agg - old))
    w2 = opt.step("w", w1, w1 + 1.0)  # m = 0.9·Δ1 + 1
    assert torch.allclose(w2, w1 + 0.5 * (0.9 * (agg - old) + 1.0))
    opt = ServerOptimizer(PrismConfig(server_optimizer="adam", server_lr=0.1, server_momentum=0.9,
                                      server_beta2=0.99, server_eps=1e-3))
    d = agg - old
    m, v = 0.1 * d, 0.01 * d * d
    assert torch.allclose(opt.step("w", old, agg), old + 0.1 * m / (v.sqrt() + 1e-3))


@pytest.mark.parametrize("strategy", ["prism", "orthdrop", "origdrop", "full"])
def test_server_momentum_changes_the_model_every_strategy(strategy: str) -> None:
    plain = _play(PrismConfig(strategy=strategy, keep_ratio=0.5), 2)
    avgm = _play(PrismConfig(strategy=strategy, keep_ratio=0.5, server_optimizer="avgm", server_lr=1.0,
                             server_momentum=0.9), 2)
    sa, sb = plain.dense_state_dict(), avgm.dense_state_dict()
    assert any(not torch.allclose(sa[k], sb[k], atol=1e-4) for k in sa)
    assert all(torch.isfinite(v).all() for v in sb.values() if v.is_floating_point())
    # the factors are a fresh SVD of the stepped weight: orthonormal columns
    for f in avgm.factors.values():
        assert torch.allclose(f.u.t() @ f.u, torch.eye(f.u.shape[1]), atol=1e-4)


def test_server_optimizer_state_is_checkpointed_and_resumes_identically() -> None:
    cfg = PrismConfig(strategy="prism", keep_ratio=0.5, server_optimizer="adam", server_lr=0.01)
    straight = _play(cfg, 3)
    first = _play(cfg, 2)
    state = first.state_dict()
    assert any(k.startswith("v::") for k in state["server_optimizer"])
    resumed = PrincipalModel(_model(), cfg)
    resumed.load_state_dict(state)
    client = PrismClient(_model(), cfg, RunSettings(batch_size=4), _client_data(3))
    updates = []
    for c in range(3):
        up, num, loss, start = client.train(resumed.sample_submodel(c, 2).to_payload("down"))
        updates.append(ClientUpdate(c, up, num, loss, start))
    resumed.aggregate(updates)
    _close(straight, resumed, atol=0.0)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("kwargs, field", [
    ({"top_share": 1.5}, "top_share"),
    ({"top_share": 0.5, "strategy": "orthdrop"}, "top_share"),
    ({"history_mix": -1.0}, "history_mix"),
    ({"history_mix": 1.0, "strategy": "full"}, "history_mix"),
    ({"server_optimizer": "sgd"}, "server_optimizer"),
    ({"server_optimizer": "avgm", "refresh": False}, "server_optimizer"),
    ({"server_lr": 0.0}, "server_lr"),
    ({"server_momentum": 1.0}, "server_momentum"),
    ({"server_beta2": -0.1}, "server_beta2"),
    ({"server_eps": 0}, "server_eps"),
])
def test_bad_variant_settings_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"PrismConfig.{field}="):
        PrismConfig(**kwargs)
