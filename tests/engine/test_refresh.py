"""The orthogonal refresh in block form equals the dense decomposition; where it cannot apply, the
dense path (with its float64 fallback) takes over; the QR-first decomposition of rectangular layers."""

from __future__ import annotations

import pytest
import torch

from fedml_prism import ClientUpdate, PrincipalModel, PrismConfig
from fedml_prism.engine.decompose import Factors, svd_factors
from fedml_prism.engine.refresh import block_refresh, decompose_qr, dense_refresh
from fedml_prism.workloads.models import resnet_tiny


def _moved(old: Factors, trained: torch.Tensor, seed: int) -> Factors:
    """``old`` with the ``trained`` components moved (as an aggregation moves them), the others
    bit-identical."""
    g = torch.Generator().manual_seed(seed)
    u, v, s = old.u.clone(), old.v.clone(), old.sigma.clone()
    k = int(trained.sum())
    u[:, trained] += 0.05 * torch.randn(u.shape[0], k, generator=g)
    v[trained] += 0.05 * torch.randn(k, *v.shape[1:], generator=g)
    s[trained] *= 1.0 + 0.1 * torch.rand(k, generator=g)
    return Factors(u, s, v)


def _signs_aligned(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``b``'s columns with the signs that best match ``a``'s (an SVD fixes vectors up to sign)."""
    return b * torch.sign((a * b).sum(0, keepdim=True))


@pytest.mark.parametrize("shape,dtype", [((24, 90), "float32"), ((90, 24), "float64"), ((16, 8, 3, 3), "float32"),
                                         ((40, 40), "float32")])
@pytest.mark.parametrize("share", [0.1, 0.6, 1.0])
def test_block_refresh_is_the_svd_of_the_aggregated_layer(shape, dtype, share) -> None:
    torch.manual_seed(0)
    old = svd_factors(torch.randn(shape), dtype)
    r = len(old.sigma)
    trained = torch.zeros(r, dtype=torch.bool)
    trained[torch.randperm(r)[: max(1, int(share * r))]] = True
    new = _moved(old, trained, seed=1)
    got = block_refresh(old, new, trained, dtype)
    ref = dense_refresh(old, new, "float64")
    f = got.factors
    assert got.method == "block"
    assert torch.allclose(f.dense(), new.dense(), atol=2e-5)
    eye = torch.eye(r)
    assert torch.allclose(f.u.t() @ f.u, eye, atol=2e-5)
    assert torch.allclose(f.v.flatten(1) @ f.v.flatten(1).t(), eye, atol=2e-5)
    assert torch.all(f.sigma[:-1] >= f.sigma[1:])
    assert torch.allclose(f.sigma, ref.factors.sigma, rtol=1e-4, atol=1e-5)
    assert torch.allclose(f.u, _signs_aligned(f.u, ref.factors.u), atol=2e-3)
    # the basis change and the inner product agree with the products over the whole layer
    assert torch.allclose(got.q_u.double(), old.u.t().double() @ f.u.double(), atol=1e-5)
    assert torch.allclose(got.q_v.double(), old.v.flatten(1).double() @ f.v.flatten(1).t().double(), atol=1e-5)
    assert got.inner_old == pytest.approx(float((new.dense().double() * old.dense().double()).sum()), rel=1e-5)
    assert got.norm_old == pytest.approx(float((old.dense().double() ** 2).sum()), rel=1e-5)


def test_untouched_layer_is_returned_as_is() -> None:
    old = svd_factors(torch.randn(12, 20))
    got = block_refresh(old, old.clone(), torch.zeros(12, dtype=torch.bool))
    assert got.method == "untouched"
    assert torch.equal(got.factors.u, old.u) and torch.equal(got.factors.v, old.v)
    assert torch.equal(got.q_u, torch.eye(12, dtype=torch.float64))


def test_rank_deficient_trained_block_raises_for_the_dense_fallback() -> None:
    old = svd_factors(torch.randn(10, 30))
    trained = torch.zeros(10, dtype=torch.bool)
    trained[[2, 5]] = True
    u = old.u.clone()
    u[:, 5] = u[:, 2]  # two trained components collapsed onto one direction
    with pytest.raises(torch.linalg.LinAlgError):
        block_refresh(old, Factors(u, old.sigma.clone(), old.v.clone()), trained)


@pytest.mark.parametrize("shape", [(64, 2100), (2100, 64), (300, 1100)])
def test_qr_first_decomposition_matches_the_dense_svd(shape) -> None:
    torch.manual_seed(3)
    w = torch.randn(shape)
    f, ref = decompose_qr(w), svd_factors(w)
    r = min(shape)
    assert torch.allclose(f.dense(), w, atol=5e-5)
    assert torch.allclose(f.sigma, ref.sigma, rtol=1e-4)
    assert torch.allclose(f.u.t() @ f.u, torch.eye(r), atol=5e-5)
    assert torch.allclose(f.v @ f.v.t(), torch.eye(r), atol=5e-5)


def _round(pm: PrincipalModel, seed: int, clients: int = 4) -> None:
    g = torch.Generator().manual_seed(seed)
    subs = [pm.sample_submodel(c, pm.rounds_done) for c in range(clients)]
    updates = []
    for s in subs:
        up = s.to_payload("up")
        updates.append(ClientUpdate(s.client_id, {
            k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() and "::index" not in k and "::meta" not in k
            else v for k, v in up.items()}, 10))
    report = pm.aggregate(updates)
    assert len(report.accepted) == clients and not report.refresh_failed


def test_principal_model_block_refresh_equals_dense_refresh_with_momentum() -> None:
    """A round refreshed in block form and the same round refreshed by the dense decomposition:
    the same global model, the same σ, and the same momentum buffers up to each component's sign
    (the only freedom of an SVD with distinct singular values)."""
    model = resnet_tiny(num_classes=4, width=0.5)
    cfg = PrismConfig(keep_ratio=0.3, seed=2, optimizer_state="aggregate")
    block, dense = PrincipalModel(model, cfg), PrincipalModel(model, cfg)
    dense._exact.clear()  # forces the dense decomposition
    _round(block, 0)
    _round(dense, 0)
    a, b = block.dense_state_dict(), dense.dense_state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4), key
    for name in block.layers:
        fa, fb = block.factors[name], dense.factors[name]
        assert torch.allclose(fa.sigma, fb.sigma, rtol=1e-3, atol=1e-5)
        sign = torch.sign((fa.u * fb.u).sum(0))
        top = fa.sigma > 1e-3 * fa.sigma[0]  # well-separated components: sign is the only freedom
        mu_a, mu_b = block.momentum[name + ".u"], dense.momentum[name + ".u"] * sign
        assert torch.allclose(mu_a[:, top], mu_b[:, top], atol=1e-3), name
    assert block._exact == set(block.layers)


def test_block_refresh_is_used_and_a_failed_block_falls_back(monkeypatch) -> None:
    import fedml_prism.engine.principal as principal

    pm = PrincipalModel(resnet_tiny(num_classes=4, width=0.5), PrismConfig(keep_ratio=0.3, seed=0))
    calls = {"block": 0, "dense": 0}
    real_block, real_dense = principal.block_refresh, principal.weight_refresh

    def failing_block(*args, **kwargs):
        calls["block"] += 1
        if calls["block"] == 1:
            raise torch.linalg.LinAlgError("rank deficient")
        return real_block(*args, **kwargs)

    def counting_dense(*args, **kwargs):
        calls["dense"] += 1
        return real_dense(*args, **kwargs)

    monkeypatch.setattr(principal, "block_refresh", failing_block)
    monkeypatch.setattr(principal, "weight_refresh", counting_dense)
    _round(pm, 0)
    assert calls == {"block": len(pm.layers), "dense": 1}
    for f in pm.factors.values():
        assert torch.allclose(f.u.t() @ f.u, torch.eye(f.u.shape[1]), atol=1e-4)


def test_checkpoint_remembers_which_layers_are_an_exact_svd() -> None:
    model = resnet_tiny(num_classes=4, width=0.5)
    pm = PrincipalModel(model, PrismConfig(keep_ratio=0.3, refresh=False))
    _round(pm, 0)
    assert pm._exact == set()  # trained without a refresh: the factors are no SVD any more
    state = pm.state_dict()
    again = PrincipalModel(model, PrismConfig(keep_ratio=0.3, refresh=False))
    again.load_state_dict(state)
    assert again._exact == set()
    legacy = {k: v for k, v in PrincipalModel(model, PrismConfig(keep_ratio=0.3)).state_dict().items() if k != "exact_svd"}
    fresh = PrincipalModel(model, PrismConfig(keep_ratio=0.3))
    fresh.load_state_dict(legacy)
    assert fresh._exact == set()  # unknown: the next refresh decomposes the dense weights


def test_load_dense_state_dict_takes_the_user_models_attention_keys() -> None:
    """A user's state dict with PyTorch's ``in_proj_weight`` loads into the converted model."""
    from torchvision.models import VisionTransformer

    from fedml_prism.engine.attention import restore_attention

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=3)
    pm = PrincipalModel(vit, PrismConfig(keep_ratio=0.5))
    other = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=3)
    assert any(k.endswith("in_proj_weight") for k in other.state_dict())
    pm.load_dense_state_dict(other.state_dict())
    x = torch.randn(2, 3, 16, 16)
    got = restore_attention(pm.dense_model()).eval()(x)
    assert torch.allclose(got, other.eval()(x), atol=1e-5)
