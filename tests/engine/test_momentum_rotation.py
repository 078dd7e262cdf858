"""Momentum follows the orthogonal refresh (issue 23, item 2): after a round with ``refresh: true``, the
factor momentum is the round's aggregated buffers rotated into the new factors, ``M_u (U_oldᵀ U_new)`` and
``(V_old V_newᵀ)ᵀ M_v``, so the buffers' dense-space form ``M_u U_newᵀ`` / ``V_newᵀ M_v`` is what it was in
the old basis.

The aggregated buffers come from a twin model with ``refresh: false`` that gets the same updates (the
aggregation does not depend on the refresh). The round reorders the components (a client's smallest
kept component grows 4×) and mixes them, so the basis changes a lot even where no sign flips. Whether a
component flips sign between the two SVDs is then set on purpose: the refresh that decomposes the dense
weight gives factors that depend on the aggregated weight only, and the clients' edits are odd in each
component, so negating old components (same weight) before the round flips exactly those components of
``U_oldᵀ U_new`` and nothing else. A probe round on a copy shows the signs the SVD picks; the old
components are then negated so that no component flips, or so that chosen ones do. A third case runs the
block refresh (the default), with the signs it happens to pick."""

from __future__ import annotations

import copy

import pytest
import torch
from spectrum_utils import linear_with_spectrum
from torch import Tensor

from fedml_prism import ClientUpdate, PrincipalModel, PrismConfig
from fedml_prism.engine.decompose import Factors
from fedml_prism.engine.submodel import MOMENTUM

SIGMA = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])  # well separated: the SVD is unique up to signs
CLIENTS = 3
FLIPS = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0])  # -1: that old component flips sign in the refresh


def _edit(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """A client's training, odd in each component (negating ``u_i`` and ``v_i`` negates the result): the
    kept components bend (elementwise cube, so they mix in the refresh) and the smallest grows 4×."""
    u, v = u + 0.3 * u**3, v + 0.3 * v**3
    u[:, -1] *= 4.0
    return u, v


def _round(pm: PrincipalModel) -> None:
    """One round: every client edits its factors and returns random momentum buffers."""
    updates = []
    for client in range(CLIENTS):
        up = dict(pm.sample_submodel(client, pm.rounds_done).to_payload("up"))
        up["0.u"], up["0.v"] = _edit(up["0.u"].clone(), up["0.v"].clone())
        g = torch.Generator().manual_seed(100 + client)
        for key in ("0.u", "0.v"):
            up[MOMENTUM + key] = torch.randn(up[MOMENTUM + key].shape, generator=g)
        updates.append(ClientUpdate(client, up, 10))
    report = pm.aggregate(updates)
    assert report.accepted == list(range(CLIENTS)) and not report.refresh_failed


def _matched_signs(old: Factors, new: Factors) -> Tensor:
    """Per old component: the sign of its overlap with the new component it became (largest ``|q_u|``)."""
    q_u = old.u.t() @ new.u
    return torch.sign(q_u.gather(1, q_u.abs().argmax(1, keepdim=True)).squeeze(1))


def _negate_components(pm: PrincipalModel, signs: Tensor) -> None:
    """Multiply old component ``i`` by ``signs[i]`` in ``u``, ``v`` and their momentum (the same weight)."""
    f = pm.factors["0"]
    pm.factors["0"] = Factors(f.u * signs, f.sigma, f.v * signs[:, None])
    pm.momentum["0.u"], pm.momentum["0.v"] = pm.momentum["0.u"] * signs, pm.momentum["0.v"] * signs[:, None]


def _start_momentum(*models: PrincipalModel) -> None:
    """The same non-zero factor momentum in every model, so components no client trains this round carry
    buffers through the rotation too."""
    g = torch.Generator().manual_seed(7)
    u, v = torch.randn(6, 6, generator=g), torch.randn(6, 6, generator=g)
    for pm in models:
        pm.momentum["0.u"], pm.momentum["0.v"] = u.clone(), v.clone()


def _dense_refresh(pm: PrincipalModel) -> None:
    """Make the refresh decompose the dense weight: a checkpoint that does not say which layers are an
    exact SVD (as written before the block refresh) leaves the block form unused."""
    state = pm.state_dict()
    del state["exact_svd"]
    pm.load_state_dict(state)


@pytest.mark.parametrize("factor_scale", ["frozen", "sqrt"])
@pytest.mark.parametrize("case", ["no_sign_flip", "sign_flips", "block_refresh"])
def test_refresh_rotates_the_aggregated_momentum_into_the_new_factors(case: str, factor_scale: str) -> None:
    cfg = dict(keep_ratio=0.5, seed=1, factor_scale=factor_scale, optimizer_state="aggregate", factorize_include=("0",))
    pm = PrincipalModel(linear_with_spectrum(SIGMA), PrismConfig(refresh=True, **cfg))
    twin = PrincipalModel(linear_with_spectrum(SIGMA), PrismConfig(refresh=False, **cfg))
    assert pm.layers == twin.layers == ["0"]
    _start_momentum(pm, twin)
    if case != "block_refresh":  # the block refresh's signs also depend on the old basis: only the law is checked
        _dense_refresh(pm)
        probe = copy.deepcopy(pm)
        _round(probe)
        wanted = torch.ones(6) if case == "no_sign_flip" else FLIPS
        signs = _matched_signs(pm.factors["0"], probe.factors["0"]) * wanted
        _negate_components(pm, signs)
        _negate_components(twin, signs)
    old = pm.factors["0"].clone()
    _round(pm)
    _round(twin)
    new = pm.factors["0"]
    m_u, m_v = twin.momentum["0.u"], twin.momentum["0.v"]  # the aggregated buffers, in the old basis
    q_u, q_v = old.u.t() @ new.u, old.v @ new.v.t()
    # the basis changed a lot, and the sign flips are the ones constructed
    assert (q_u - torch.eye(6)).abs().max() > 0.9 and (q_v - torch.eye(6)).abs().max() > 0.9
    if case != "block_refresh":
        assert torch.equal(_matched_signs(old, new), wanted)
    # the momentum is the aggregated buffers rotated into the new factors ...
    assert torch.allclose(pm.momentum["0.u"], m_u @ q_u, atol=1e-5)
    assert torch.allclose(pm.momentum["0.v"], q_v.t() @ m_v, atol=1e-5)
    # ... so their dense-space form did not change with the basis
    assert torch.allclose(pm.momentum["0.u"] @ new.u.t(), m_u @ old.u.t(), atol=1e-5)
    assert torch.allclose(new.v.t() @ pm.momentum["0.v"], old.v.t() @ m_v, atol=1e-5)
