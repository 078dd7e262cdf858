"""The orthogonal refresh, at the cost of the components that moved.

After a round, a factorized layer holds ``W' = U' diag(σ') V'ᵀ`` in which the components nobody
trained (``R``) are still the previous SVD's, bit for bit (orthonormal among themselves), and only
the trained ones (``T``, ``t`` of ``r``) moved. The refresh is the SVD of ``W'``. Instead of
decomposing the dense ``N × M`` matrix (LAPACK ``gesdd``: a BLAS-2 bidiagonalization of the whole
layer), :func:`block_refresh` works in the basis the layer already has:

1. Project the trained factors off the untrained subspace: ``C_u = U_Rᵀ U'_T`` and the Gram
   ``G_u = U'_Tᵀ U'_T − C_uᵀ C_u`` of the remainder ``P_u = U'_T − U_R C_u``; Cholesky ``G_u = R_uᵀ R_u``
   gives ``P_u = Q_u R_u`` without forming ``Q_u`` (the same on the ``V`` side).
2. In the orthonormal basis ``[U_R, Q_u] × [V_R, Q_v]`` the layer is the ``r × r`` core
   ``K = B_u diag(σ') B_vᵀ`` with ``B = [[I, C], [0, R]]``; its SVD ``K = U_K S V_Kᵀ`` is the layer's.
3. ``U_new = [U_R, U'_T] X_u`` with ``X_u`` (r × r) folding ``Q_u = P_u R_u⁻¹`` and ``U_K`` together:
   one ``N × r × r`` product per side.

The work is ``O((N + M)·r·t + r³)`` in GEMMs and a small SVD, against ``gesdd`` of the whole layer;
layers no client trained are not touched at all. The same projections give the rotation of the
momentum buffers into the new basis (``U_oldᵀ U_new``) and the change ``⟨W', W⟩`` for the
diagnostics, at no extra product over the layer. Exact up to rounding: the result is an SVD of the
same ``W'`` (tested against the dense decomposition). Where the block form cannot be used (a
layer whose factors are not an exact SVD, e.g. after a failed refresh, or a rank-deficient trained
block whose Cholesky fails) the dense SVD runs, with its float64 fallback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .decompose import Factors, svd_factors

log = logging.getLogger(__name__)

_F64 = torch.float64


@dataclass
class Refreshed:
    """A refreshed layer, the basis change, and the inner product with the previous layer.

    ``q_u = U_oldᵀ U_new`` and ``q_v = V_old V_newᵀ`` (r × r) carry factor momentum from the
    old basis into the new one; ``inner_old = ⟨W', W_old⟩_F`` and ``norm_old = ‖W_old‖_F²`` give the
    round's relative change of the layer."""

    factors: Factors
    q_u: Tensor
    q_v: Tensor
    inner_old: float
    norm_old: float
    method: str


def decompose_qr(weight: Tensor, dtype: str = "float32", name: str = "") -> Factors:
    """SVD of a dense weight; a strongly rectangular matrix is first reduced by QR to its square
    factor (``A = Q R``, SVD of ``R``), a few times faster than ``gesdd`` on the whole matrix. Falls
    back to :func:`~fedml_prism.engine.decompose.svd_factors` (float32, then float64) on any failure."""
    mat = weight.detach().reshape(weight.shape[0], -1)
    n, m = mat.shape
    if max(n, m) < 2 * min(n, m) or max(n, m) < 1024 or not torch.isfinite(mat).all():
        return svd_factors(weight, dtype, name)
    try:
        work = mat.to(getattr(torch, dtype))
        wide = m > n
        q, r = torch.linalg.qr(work.t() if wide else work)  # tall: (max × min), (min × min)
        ur, s, vhr = torch.linalg.svd(r, full_matrices=False)
        if wide:  # Wᵀ = Q R = Q U_r S V_rᵀ  →  W = V_r S (Q U_r)ᵀ
            u, vh = vhr.t(), (q @ ur).t()
        else:
            u, vh = q @ ur, vhr
        if not (torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(vh).all()):
            raise RuntimeError("non-finite factors")
    except (RuntimeError, torch.linalg.LinAlgError) as err:
        log.warning("layer %r: QR-first SVD failed (%s); using the dense SVD", name, err)
        return svd_factors(weight, dtype, name)
    out = weight.dtype
    return Factors(u.to(out).contiguous(), s.to(out), vh.to(out).reshape(-1, *weight.shape[1:]).contiguous())


#: a Cholesky pivot² below this many machine epsilons of the inputs (times the largest diagonal entry) is a
#: rank-deficient block: the Gram matrix is formed from products in the inputs' dtype, whose rounding can
#: leave an exactly singular block barely positive definite, with a useless, ill-conditioned R
RANK_TOL_EPS = 100.0


def _cholesky_upper(gram: Tensor, eps: float) -> Tensor:
    """Upper ``R`` with ``gram = Rᵀ R``; raises ``LinAlgError`` if ``gram`` is not positive definite, or is
    so only by the rounding of inputs with machine epsilon ``eps``."""
    low, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"trained block is rank deficient (Cholesky failed at column {int(info)})")
    pivots = low.diagonal() ** 2
    floor = RANK_TOL_EPS * eps * float(gram.diagonal().max().clamp_min(torch.finfo(_F64).tiny))
    if pivots.numel() and float(pivots.min()) <= floor:
        raise torch.linalg.LinAlgError(f"trained block is rank deficient (pivot² {float(pivots.min()):.3g} at column "
                                       f"{int(pivots.argmin())}, below {floor:.3g})")
    return low.t()


def _side(base: Tensor, new_t: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One side (columns are components): ``D = B_oldᵀ B'_T`` (r × t; its untrained rows are
    ``C = B_Rᵀ B'_T``) and the upper ``R`` of the remainder ``P = B'_T − B_R C`` (``PᵀP = B'_TᵀB'_T − CᵀC``)."""
    d = (base.t() @ new_t).to(_F64)
    c = d[keep]
    gram = (new_t.t() @ new_t).to(_F64) - c.t() @ c
    return c, _cholesky_upper(gram, torch.finfo(new_t.dtype).eps), d


def block_refresh(old: Factors, new: Factors, trained: Tensor, dtype: str = "float32") -> Refreshed:
    """The SVD of ``new`` (``W' = U' diag(σ') V'ᵀ``), given that ``old`` is an exact SVD (orthonormal
    ``u`` columns and ``v`` rows) and ``new`` equals ``old`` bit for bit outside the boolean mask
    ``trained``. Raises ``torch.linalg.LinAlgError`` / ``RuntimeError`` when the block form fails
    (the caller then decomposes the dense weight)."""
    r = len(old.sigma)
    keep, train = ~trained, trained
    norm_old = float((old.sigma.to(_F64) ** 2).sum())
    if not bool(train.any()):
        eye = torch.eye(r, dtype=_F64)
        return Refreshed(new, eye, eye, norm_old, norm_old, "untouched")
    work = getattr(torch, dtype)
    u_old, v_old = old.u.to(work), old.v.flatten(1).t().to(work)  # both (dim × r): components are columns
    u_t, v_t = new.u[:, train].to(work), new.v.flatten(1)[train].t().to(work)
    c_u, r_u, d_u = _side(u_old, u_t, keep)
    c_v, r_v, d_v = _side(v_old, v_t, keep)
    order = torch.cat([keep.nonzero().flatten(), train.nonzero().flatten()])
    sig = new.sigma.to(work)[order]
    nk = int(keep.sum())
    # the r × r algebra runs in the decomposition's precision; only the Grams' Cholesky is float64
    c_u, r_u, c_v, r_v = (m.to(work) for m in (c_u, r_u, c_v, r_v))

    def b_matrix(c: Tensor, rr: Tensor) -> Tensor:
        b = torch.zeros(r, r, dtype=work)
        b[:nk, :nk] = torch.eye(nk, dtype=work)
        b[:nk, nk:] = c
        b[nk:, nk:] = rr
        return b

    core = b_matrix(c_u, r_u) * sig @ b_matrix(c_v, r_v).t()
    u_k, s_k, vh_k = torch.linalg.svd(core, full_matrices=False)
    v_k = vh_k.t()
    if not (torch.isfinite(u_k).all() and torch.isfinite(s_k).all() and torch.isfinite(v_k).all()):
        raise RuntimeError("non-finite core SVD")

    def fold(c: Tensor, rr: Tensor, k: Tensor) -> Tensor:
        """``X`` with ``[B_R, B'_T] X = [B_R, Q] k`` (rows in the layer's component order)."""
        k_t = torch.linalg.solve_triangular(rr, k[nk:], upper=True)  # R⁻¹ K_T
        x = torch.empty(r, r, dtype=work)
        x[keep] = k[:nk] - c @ k_t
        x[train] = k_t
        return x

    x_u, x_v = fold(c_u, r_u, u_k), fold(c_v, r_v, v_k)
    out = old.u.dtype
    # [U_R, U'_T] X in the layer's order is U' X: the untrained columns of U' are U_R bit for bit
    u_new = (new.u.to(work) @ x_u).to(out)
    v_new = (x_v.t() @ new.v.flatten(1).to(work)).to(out)
    # U_oldᵀ U_new = U_oldᵀ [U_R, U'_T] X = [E_R, D_u] X (E_R: the untrained columns of the identity)
    q_u = _basis_change(d_u, x_u, keep, train)
    q_v = _basis_change(d_v, x_v, keep, train)
    # ⟨W', W_old⟩: untrained components contribute σ_i², trained ones Σ_i σ_i D_u[i,j] D_v[i,j] σ'_j
    s_old = old.sigma.to(_F64)
    inner = float((s_old[keep] ** 2).sum() + (s_old @ (d_u * d_v)) @ new.sigma.to(_F64)[train])
    factors = Factors(u_new.contiguous(), s_k.to(out), v_new.reshape(-1, *old.v.shape[1:]).contiguous())
    return Refreshed(factors, q_u, q_v, inner, norm_old, "block")


def _basis_change(d: Tensor, x: Tensor, keep: Tensor, train: Tensor) -> Tensor:
    """``[E_R, D] X`` with the layer's component order (``E_R`` picks the untrained rows of ``X``):
    ``X``'s untrained rows plus ``D X_T``."""
    q = d.to(x.dtype) @ x[train]
    q[keep] += x[keep]
    return q


def dense_refresh(old: Factors, new: Factors, dtype: str = "float32", name: str = "") -> Refreshed:
    """The refresh by decomposing the dense weight (any factors): ``ValueError`` if no precision works."""
    return weight_refresh(old, new.dense(), dtype, name)


def weight_refresh(old: Factors, weight: Tensor, dtype: str = "float32", name: str = "") -> Refreshed:
    """The new layer decomposed from its dense ``weight`` (e.g. after a server optimizer's step), with the
    basis change from ``old``: ``ValueError`` if no precision works."""
    f = decompose_qr(weight, dtype, name)
    q_u = old.u.t().to(_F64) @ f.u.to(_F64)
    q_v = old.v.flatten(1).to(_F64) @ f.v.flatten(1).t().to(_F64)
    inner = float(((q_u * q_v) * (old.sigma.to(_F64)[:, None] * f.sigma.to(_F64)[None, :])).sum())
    gram_u, gram_v = old.u.t().to(_F64) @ old.u.to(_F64), old.v.flatten(1).to(_F64) @ old.v.flatten(1).t().to(_F64)
    s = old.sigma.to(_F64)
    norm_old = float((gram_u * gram_v * s[:, None] * s[None, :]).sum())
    return Refreshed(f, q_u, q_v, inner, norm_old, "dense")
