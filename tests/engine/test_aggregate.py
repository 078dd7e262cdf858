"""Aggregation laws: Eq. 3 vs a slow reference, untouched components, element-wise baselines,
rejection of bad updates, SVD failure during refresh."""

from __future__ import annotations

import pytest
import torch

from fedml_prism import ClientUpdate, PrincipalModel, PrismConfig
from fedml_prism.engine.aggregate import Contribution, aggregate_components, average_elements
from fedml_prism.workloads.models import resnet_tiny


def _perturbed(sub, scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    payload = sub.to_payload("up")
    return {
        k: (v + scale * torch.randn(v.shape, generator=g)) if v.is_floating_point() and not k.startswith("prism::") else v
        for k, v in payload.items()
    }


def _slow_eq3(factors, contributions):
    """Per component, per client: the literal Eq. 3."""
    out = {}
    for name, f in factors.items():
        u, v = f.u.clone().double(), f.v.clone().double()
        for i in range(len(f.sigma)):
            holders = [(c, (c.components[name] == i).nonzero().item()) for c in contributions if i in c.components[name].tolist()]
            if not holders:
                continue
            total = sum(c.weight for c, _ in holders)
            u[:, i] = sum(c.weight / total * c.payload[name + ".u"][:, j].double() for c, j in holders)
            v[i] = sum(c.weight / total * c.payload[name + ".v"][j].double() for c, j in holders)
        out[name] = (u.float(), v.float())
    return out


@pytest.fixture
def pm() -> PrincipalModel:
    """The paper's form (σ frozen): payload factors are the server's factors at the sampled indices,
    so ``aggregate_components`` applies to them directly (the √σ form is tested in
    test_training_details)."""
    torch.manual_seed(0)
    return PrincipalModel(resnet_tiny(width=0.5), PrismConfig(keep_ratio=0.3, seed=1, factor_scale="frozen"))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (10.0, 3.0, 250.0)])
def test_fast_aggregation_equals_slow_reference(pm, weights) -> None:
    subs = [pm.sample_submodel(c, 0) for c in range(3)]
    contributions = [
        Contribution(_perturbed(s, 0.1, c), w, s.components) for c, (s, w) in enumerate(zip(subs, weights, strict=True))
    ]
    fast = aggregate_components(pm.factors, contributions)
    slow = _slow_eq3(pm.factors, contributions)
    for name in pm.layers:
        assert torch.allclose(fast[name].u, slow[name][0], atol=1e-6)
        assert torch.allclose(fast[name].v, slow[name][1], atol=1e-6)
        assert torch.equal(fast[name].sigma, pm.factors[name].sigma)


def test_untouched_components_stay_bit_identical(pm) -> None:
    subs = [pm.sample_submodel(c, 0) for c in range(2)]
    contributions = [Contribution(_perturbed(s, 0.5, c), 1.0, s.components) for c, s in enumerate(subs)]
    new = aggregate_components(pm.factors, contributions)
    for name in pm.layers:
        trained = torch.zeros(len(pm.factors[name].sigma), dtype=torch.bool)
        for s in subs:
            trained[s.components[name]] = True
        assert (~trained).any() and trained.any()
        assert torch.equal(new[name].u[:, ~trained], pm.factors[name].u[:, ~trained])
        assert torch.equal(new[name].v[~trained], pm.factors[name].v[~trained])
        assert not torch.equal(new[name].u[:, trained], pm.factors[name].u[:, trained])


@pytest.mark.parametrize("scale", ["frozen", "sqrt"])
@pytest.mark.parametrize("strategy", ["prism", "orthdrop", "origdrop", "rolex", "full"])
def test_aggregating_untrained_submodels_changes_no_weight(strategy, scale) -> None:
    """Sub-models sent back untrained change nothing: dense entries (every entry for the channel
    baselines and full, whose sub-models are cuts of them) stay bit for bit, factorized layers'
    pre-refresh factors bit for bit (σ frozen) and their dense weights after the refresh up to
    float error. Each comparison is asserted to cover non-empty state."""
    torch.manual_seed(0)
    pm = PrincipalModel(resnet_tiny(width=0.5), PrismConfig(strategy=strategy, keep_ratio=0.4, weighting="samples",
                                                            factor_scale=scale))
    before = {k: v.clone() for k, v in pm.dense_state_dict().items()}
    dense_before = {k: v.clone() for k, v in pm.dense.items()}
    factors_before = {n: f.clone() for n, f in pm.factors.items()}
    subs = [pm.sample_submodel(c, 0) for c in range(3)]
    assert dense_before, "no dense entries to compare"
    if pm.config.principal:
        assert factors_before, "no factorized layers to compare"
    if strategy in ("origdrop", "rolex"):  # the sub-models really are cuts of the dense entries
        assert all(s.rows and s.cols for s in subs)
        assert sum(p.numel() for p in subs[0].module.parameters()) < 0.5 * sum(v.numel() for v in dense_before.values())
    if scale == "frozen" and factors_before:
        pre_refresh = aggregate_components(pm.factors, [Contribution(s.to_payload("up"), 1.0, s.components) for s in subs])
        for name, f in factors_before.items():
            assert torch.equal(pre_refresh[name].u, f.u) and torch.equal(pre_refresh[name].v, f.v), name
    report = pm.aggregate([(s, 10 * (i + 1)) for i, s in enumerate(subs)])
    assert report.accepted == [0, 1, 2] and not report.rejected
    assert pm.dense.keys() == dense_before.keys()
    for key, value in dense_before.items():
        assert torch.equal(pm.dense[key], value), key
    after = pm.dense_state_dict()
    for key, value in before.items():
        assert torch.allclose(after[key], value, atol=2e-5), key


@pytest.mark.parametrize("strategy", ["prism", "full"])
def test_weighting_samples_gives_the_sample_weighted_average(strategy) -> None:
    """``weighting: samples``: trained (perturbed) updates are averaged with weights ∝ num_samples,
    per component for factors (Eq. 3 with α ∝ n_c) and per entry for dense entries; ``uniform``
    weighting gives a different model from the same updates."""
    nums = (5, 20, 75)
    results = {}
    for weighting in ("samples", "uniform"):
        torch.manual_seed(0)
        pm = PrincipalModel(resnet_tiny(width=0.5), PrismConfig(strategy=strategy, keep_ratio=0.4, weighting=weighting,
                                                                factor_scale="frozen", seed=2))
        subs = [pm.sample_submodel(c, 0) for c in range(3)]
        payloads = [_perturbed(s, 0.3, c) for c, s in enumerate(subs)]
        weights = nums if weighting == "samples" else (1, 1, 1)
        contributions = [Contribution(p, float(w), s.components) for p, w, s in zip(payloads, weights, subs, strict=True)]
        expected_factors = _slow_eq3(pm.factors, contributions)
        sigma = {n: f.sigma.clone() for n, f in pm.factors.items()}  # σ frozen: Eq. 3 moves u and v only
        expected_dense = {k: sum(w * p[k].double() for w, p in zip(weights, payloads, strict=True)) / sum(weights)
                          for k, v in pm.dense.items() if v.is_floating_point()}
        pm.aggregate([ClientUpdate(s.client_id, p, n) for s, p, n in zip(subs, payloads, nums, strict=True)])
        assert expected_dense and (strategy == "full" or pm.layers)
        for key, want in expected_dense.items():
            assert torch.allclose(pm.dense[key].double(), want, atol=1e-6), key
        state = pm.dense_state_dict()
        for name, (u, v) in expected_factors.items():
            w_expected = (u * sigma[name]) @ v.flatten(1)
            assert torch.allclose(state[name + ".weight"].flatten(1), w_expected, atol=1e-4), name
        results[weighting] = state
    assert any(not torch.allclose(results["samples"][k], results["uniform"][k], atol=1e-4) for k in results["samples"])


def test_aggregate_changes_trained_model_and_refreshes_orthogonality(pm) -> None:
    before = pm.dense_state_dict()
    subs = [pm.sample_submodel(c, 0) for c in range(3)]
    report = pm.aggregate([ClientUpdate(s.client_id, _perturbed(s, 0.05, s.client_id), 5) for s in subs])
    assert report.accepted == [0, 1, 2] and 0 < report.coverage < 1
    after = pm.dense_state_dict()
    assert any(not torch.allclose(after[k], before[k]) for k in before)
    for f in pm.factors.values():  # orthogonal refresh: U has orthonormal columns again
        eye = torch.eye(f.u.shape[1])
        assert torch.allclose(f.u.t() @ f.u, eye, atol=1e-4)
        assert torch.all(f.sigma[:-1] >= f.sigma[1:])


def test_element_wise_average_over_holders_hand_computed() -> None:
    state = {"fc.weight": torch.zeros(4, 2), "fc.bias": torch.full((4,), 7.0)}
    a = Contribution({"fc.weight": torch.ones(2, 2), "fc.bias": torch.ones(2)}, 1.0, rows={"fc": torch.tensor([0, 1])})
    b = Contribution({"fc.weight": torch.full((2, 1), 3.0), "fc.bias": torch.full((2,), 3.0)}, 1.0,
                     rows={"fc": torch.tensor([1, 2])}, cols={"fc": torch.tensor([1])})
    out = average_elements(state, [a, b])
    assert out["fc.weight"].tolist() == [[1, 1], [1, 2], [0, 3], [0, 0]]
    assert out["fc.bias"].tolist() == [1, 2, 3, 7]


def test_bad_updates_are_rejected_and_the_round_goes_on(pm, caplog) -> None:
    subs = [pm.sample_submodel(c, 0) for c in range(6)]
    good = subs[0].to_payload("up")
    bad_shape = subs[1].to_payload("up")
    key = next(k for k in bad_shape if k.endswith(".u"))
    bad_shape[key] = bad_shape[key][:, :-1]
    bad_index = subs[2].to_payload("up")
    idx_key = next(k for k in bad_index if k.startswith("prism::index::"))
    bad_index[idx_key] = bad_index[idx_key].flip(0) + 1
    missing = subs[3].to_payload("up")
    missing.pop("conv1.weight")
    extra = dict(subs[4].to_payload("up"), **{"evil.weight": torch.zeros(1)})
    nan = subs[5].to_payload("up")
    nan[key] = torch.full_like(nan[key], float("nan"))
    updates = [
        ClientUpdate(0, good, 3), ClientUpdate(1, bad_shape, 3), ClientUpdate(2, bad_index, 3),
        ClientUpdate(3, missing, 3), ClientUpdate(4, extra, 3), ClientUpdate(5, nan, 3),
        ClientUpdate(77, good, 3), ClientUpdate(0, good, 3),
    ]
    report = pm.aggregate(updates)
    assert report.accepted == [0]
    assert "shape" in report.rejected[1] and "differs from what the server sent" in report.rejected[2]
    assert "missing keys" in report.rejected[3] and "unexpected keys" in report.rejected[4]
    assert "non-finite" in report.rejected[5] and "no sub-model was sent" in report.rejected[77]
    assert "second update" in report.rejected[0]
    assert "rejected update of client 5" in caplog.text


def test_non_positive_sample_count_is_rejected(pm) -> None:
    sub = pm.sample_submodel(0, 0)
    report = pm.aggregate([ClientUpdate(0, sub.to_payload("up"), 0)])
    assert report.accepted == [] and "num_samples=0" in report.rejected[0]


def test_refresh_failure_keeps_factors_and_continues(pm, monkeypatch) -> None:
    def broken(*a, **k):
        raise torch.linalg.LinAlgError("did not converge")

    sub = pm.sample_submodel(0, 0)
    monkeypatch.setattr(torch.linalg, "svd", broken)
    report = pm.aggregate([ClientUpdate(0, _perturbed(sub, 0.01, 0), 4)])
    assert report.accepted == [0] and sorted(report.refresh_failed) == sorted(pm.layers)
    monkeypatch.undo()
    nxt = pm.sample_submodel(1, 1)
    assert torch.isfinite(nxt.module(torch.randn(2, 3, 8, 8))).all()
