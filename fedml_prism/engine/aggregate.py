"""Aggregation as pure functions: ``(server state, accepted client updates) -> new server state``.

- :func:`aggregate_components`: paper Eq. 3, per principal component ``i``:
  ``u_i ← Σ_c α_i^c u_i^c``, ``v_i ← Σ_c α_i^c v_i^c`` with ``α_i^c = w_c / Σ_{c' ∈ C_i} w_{c'}``
  over the clients ``C_i`` that trained ``i`` (``w_c = 1`` gives the paper's ``1/C_i``). σ is frozen.
  Components no client trained are copied bit for bit.
- :func:`average_elements`: FedAvg of dense entries; for the channel baselines (HeteroFL, FedRolex)
  every element is averaged over the clients that hold it, and elements nobody held stay as they were.
- :func:`mix_history`: the coverage-aware step (``history_mix: τ``): component ``i`` moves
  ``C_i / (C_i + τ)`` of the way from its previous value to Eq. 3's average.
- :func:`check_update`: why an update must be left out (wrong keys, shapes, indices, non-finite).
- Momentum (``optimizer_state: aggregate``): the clients' SGD buffers go through the same two
  functions (:func:`momentum_view`), so factor buffers get Eq. 3's ``α_i^c`` and dense buffers the
  dense average; after the orthogonal refresh :func:`rotate_momentum` carries the factor buffers
  into the new basis.

Sums run in float64 and are cast back, so averaging identical updates reproduces them exactly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .decompose import Factors
from .submodel import META, MOMENTUM


@dataclass(frozen=True)
class Contribution:
    """An accepted client update in server terms: its ``up`` payload, its weight ``w_c``, and the
    selection the *server* recorded when it sent the sub-model."""

    payload: Mapping[str, Tensor]
    weight: float = 1.0
    components: Mapping[str, Tensor] = field(default_factory=dict)
    rows: Mapping[str, Tensor] = field(default_factory=dict)
    cols: Mapping[str, Tensor] = field(default_factory=dict)


def aggregate_components(
    factors: Mapping[str, Factors], contributions: Sequence[Contribution]
) -> dict[str, Factors]:
    """Eq. 3 for every factorized layer (see module docstring). Returns new ``Factors``."""
    out: dict[str, Factors] = {}
    for name, f in factors.items():
        sum_u = torch.zeros(f.u.shape, dtype=torch.float64)
        sum_v = torch.zeros(f.v.shape, dtype=torch.float64)
        weight = torch.zeros(len(f.sigma), dtype=torch.float64)
        for c in contributions:
            idx = c.components.get(name)
            if idx is None:
                continue
            sum_u.index_add_(1, idx, c.payload[name + ".u"].to(torch.float64) * c.weight)
            sum_v.index_add_(0, idx, c.payload[name + ".v"].to(torch.float64) * c.weight)
            weight.index_add_(0, idx, torch.full((len(idx),), float(c.weight), dtype=torch.float64))
        hit = weight > 0
        u, v = f.u.clone(), f.v.clone()
        if hit.any():
            w = weight[hit]
            u[:, hit] = (sum_u[:, hit] / w).to(u.dtype)
            v[hit] = (sum_v[hit] / w.view(-1, *([1] * (v.dim() - 1)))).to(v.dtype)
        out[name] = Factors(u, f.sigma.clone(), v)
    return out


def mix_history(agg: Factors, old: Factors, hits: Tensor, tau: float) -> Factors:
    """Per component ``i``: ``old_i + s_i·(agg_i − old_i)`` with ``s_i = C_i / (C_i + τ)``, ``C_i = hits[i]``
    the number of clients that trained it (FedHM's blend with the previous model where few clients
    trained; ``τ = 0`` returns ``agg``). σ is taken from ``agg`` (it is frozen in Eq. 3). Untrained
    components (``C_i = 0``) stay ``old``'s bit for bit."""
    if tau == 0:
        return agg
    step = hits.to(torch.float64) / (hits.to(torch.float64) + tau)
    u = old.u.to(torch.float64) + (agg.u.to(torch.float64) - old.u.to(torch.float64)) * step
    shape = (-1, *([1] * (old.v.dim() - 1)))
    v = old.v.to(torch.float64) + (agg.v.to(torch.float64) - old.v.to(torch.float64)) * step.view(shape)
    trained = hits > 0
    u = torch.where(trained, u.to(old.u.dtype), old.u)
    v = torch.where(trained.view(shape), v.to(old.v.dtype), old.v)
    return Factors(u, agg.sigma, v)


def _scatter(value: Tensor, shape: torch.Size, rows: Tensor | None, cols: Tensor | None) -> tuple[Tensor, Tensor]:
    """Place a cut tensor into a zero tensor of the full ``shape``; also return its 0/1 mask."""
    mask = torch.ones_like(value)
    if cols is not None:
        wide = (value.shape[0], shape[1], *value.shape[2:])
        value = torch.zeros(wide, dtype=value.dtype).index_copy_(1, cols, value)
        mask = torch.zeros(wide, dtype=value.dtype).index_copy_(1, cols, mask)
    if rows is not None:
        value = torch.zeros(shape, dtype=value.dtype).index_copy_(0, rows, value)
        mask = torch.zeros(shape, dtype=value.dtype).index_copy_(0, rows, mask)
    return value, mask


def average_elements(
    state: Mapping[str, Tensor], contributions: Sequence[Contribution]
) -> OrderedDict[str, Tensor]:
    """Weighted element-wise average of every entry of ``state`` over the clients holding it."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, old in state.items():
        module = key.rpartition(".")[0]
        acc = torch.zeros(old.shape, dtype=torch.float64)
        cnt = torch.zeros(old.shape, dtype=torch.float64)
        for c in contributions:
            value = c.payload[key].to(torch.float64)
            rows = c.rows.get(module) if old.dim() >= 1 else None
            cols = c.cols.get(module) if old.dim() >= 2 else None
            if rows is None and cols is None:
                acc += value * c.weight
                cnt += c.weight
            else:
                value, mask = _scatter(value, old.shape, rows, cols)
                acc += value * c.weight
                cnt += mask * c.weight
        mean = acc / cnt.clamp_min(1e-300)
        if not old.is_floating_point():
            mean = mean.round()
        out[key] = torch.where(cnt > 0, mean.to(old.dtype), old)
    return out


def check_update(
    payload: object,
    expected: Mapping[str, torch.Size],
    indices: Mapping[str, Tensor],
    dtypes: Mapping[str, torch.dtype] | None = None,
    meta: Tensor | None = None,
) -> str | None:
    """``None`` if ``payload`` is a well-formed ``up`` payload for the recorded sub-model, else the
    reason to reject it. ``expected`` maps every trainable entry to its shape, ``dtypes`` to its
    dtype; ``indices`` holds the ``prism::…`` selection entries the server sent and ``meta`` its
    ``prism::meta`` entry (strategy, client, round, keep ratio): a client cannot change them, so an
    update of another client or of an earlier round is refused. Every tensor must be a dense,
    strided tensor with real storage (no meta or sparse tensors); floating ones must be finite."""
    if not isinstance(payload, Mapping):
        return f"payload is a {type(payload).__name__}, not a mapping of tensors"
    for key, value in payload.items():
        if not isinstance(key, str):
            return f"key {key!r} is not a string"
        if not isinstance(value, Tensor):
            return f"{key!r} is a {type(value).__name__}, not a tensor"
        if value.is_meta or value.layout != torch.strided or value.is_quantized:
            return f"{key!r} is not a dense tensor with data (device {value.device}, layout {value.layout})"
    if meta is not None:
        sent = payload.get(META)
        if sent is None:
            return f"missing {META!r} entry"
        if sent.shape != meta.shape or sent.dtype != meta.dtype or not torch.equal(sent.cpu(), meta):
            return f"{META!r} entry differs from what the server sent (another client's or an earlier round's update)"
    keys = set(payload) - {META}
    missing = sorted(set(expected) - keys)
    extra = sorted(keys - set(expected) - set(indices))
    if missing:
        return f"missing keys {missing[:5]}{'…' if len(missing) > 5 else ''}"
    if extra:
        return f"unexpected keys {extra[:5]}{'…' if len(extra) > 5 else ''}"
    for key, idx in indices.items():
        sent = payload.get(key)
        if sent is None:
            return f"missing index entry {key!r}"
        if not isinstance(sent, Tensor) or sent.shape != idx.shape or not torch.equal(sent.cpu().long(), idx):
            return f"index entry {key!r} differs from what the server sent"
    for key, shape in expected.items():
        value = payload[key]
        if not isinstance(value, Tensor):
            return f"{key!r} is a {type(value).__name__}, not a tensor"
        if value.shape != shape:
            return f"{key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}"
        if dtypes is not None and key in dtypes and value.dtype != dtypes[key]:
            return f"{key!r} has dtype {value.dtype}, expected {dtypes[key]}"
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"{key!r} has non-finite values"
    return None


def momentum_view(c: Contribution) -> Contribution:
    """The contribution's momentum buffers in place of its weights (same weight and selection), so
    :func:`aggregate_components` and :func:`average_elements` aggregate them like the weights."""
    payload = {k[len(MOMENTUM):]: v for k, v in c.payload.items() if k.startswith(MOMENTUM)}
    return Contribution(payload, c.weight, c.components, c.rows, c.cols)


def unscale_sqrt(agg: Factors, old: Factors, trained: Tensor) -> Factors:
    """Back from the ``factor_scale: sqrt`` form: ``agg`` holds ``(ũ, 1, ṽ)`` with ``ũ = u√σ``; the
    result has unit factors and ``σ_i = ‖ũ_i‖‖ṽ_i‖`` (the same product ``ũ_i ṽ_iᵀ``). Components not
    in the boolean mask ``trained`` (nobody trained them) are copied from ``old`` bit for bit."""
    u, v = agg.u.to(torch.float64), agg.v.flatten(1).to(torch.float64)
    nu, nv = u.norm(dim=0), v.norm(dim=1)
    ok = (nu > 0) & (nv > 0)
    sigma = torch.where(ok, nu * nv, torch.zeros_like(nu))
    u = torch.where(ok, u / nu.clamp_min(1e-300), u)
    v = torch.where(ok[:, None], v / nv.clamp_min(1e-300)[:, None], v)
    out_u = torch.where(trained, u.to(old.u.dtype), old.u)
    out_v = torch.where(trained[:, None], v.to(old.v.dtype), old.v.flatten(1)).view_as(old.v)
    return Factors(out_u, torch.where(trained, sigma.to(old.sigma.dtype), old.sigma), out_v)


def frobenius_inner(a: Factors, b: Factors) -> float:
    """``⟨U_a diag(σ_a) V_aᵀ, U_b diag(σ_b) V_bᵀ⟩_F`` from r×r Gram matrices (no dense product)."""
    su = (a.u * a.sigma).t().to(torch.float64) @ (b.u * b.sigma).to(torch.float64)
    return float((su * (a.v.flatten(1).to(torch.float64) @ b.v.flatten(1).t().to(torch.float64))).sum())


def component_change(old: Factors, new: Factors) -> Tensor:
    """Per component ``i``: ``‖σ'_i u'_i v'_iᵀ − σ_i u_i v_iᵀ‖_F / ‖σ_i u_i v_iᵀ‖_F`` (same index ``i``
    before the refresh; Gram form, no dense product)."""
    a, b = old.u.to(torch.float64), old.v.flatten(1).to(torch.float64)
    a2, b2 = new.u.to(torch.float64), new.v.flatten(1).to(torch.float64)
    s, s2 = old.sigma.to(torch.float64), new.sigma.to(torch.float64)
    na, nb, na2, nb2 = (a * a).sum(0), (b * b).sum(1), (a2 * a2).sum(0), (b2 * b2).sum(1)
    sq = s2 ** 2 * na2 * nb2 - 2 * s * s2 * (a * a2).sum(0) * (b * b2).sum(1) + s ** 2 * na * nb
    return sq.clamp_min(0).sqrt() / (s * (na * nb).sqrt()).clamp_min(1e-12)


def rotate_momentum(momentum: Factors, before: Factors, after: Factors) -> Factors:
    """Carry factor momentum from the basis it was built in (``before``: the round's orthonormal
    factors) into the refreshed one (``after``): ``M_u ← M_u (U_beforeᵀ U_after)``,
    ``M_v ← (V_before V_afterᵀ)ᵀ M_v``. A component whose SVD sign flipped gets its buffer flipped;
    components that mix get the mix of their buffers."""
    q_u = before.u.t() @ after.u
    q_v = before.v.flatten(1) @ after.v.flatten(1).t()
    return rotate_momentum_by(momentum, q_u, q_v, after.sigma)


def rotate_momentum_by(momentum: Factors, q_u: Tensor, q_v: Tensor, sigma: Tensor) -> Factors:
    """:func:`rotate_momentum` with the basis change given: ``q_u = U_beforeᵀ U_after`` and
    ``q_v = V_before V_afterᵀ`` (the block refresh gets them from its projections)."""
    m_u = momentum.u @ q_u.to(momentum.u.dtype)
    m_v = (q_v.t().to(momentum.v.dtype) @ momentum.v.flatten(1)).view_as(momentum.v)
    return Factors(m_u, sigma, m_v)
