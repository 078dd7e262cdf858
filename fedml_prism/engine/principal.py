"""The server-side state of a PriSM job and the one interface every strategy shares.

``PrincipalModel`` holds the global model (principal factors of the factorized layers plus every
dense entry), hands out sub-models, remembers what it sent to whom, and aggregates. The same class
serves the baselines: ``orthdrop`` and ``uniform`` differ only in the sampler; ``origdrop``, ``rolex``
and ``full`` keep the model dense and cut original channels (or nothing).
"""

from __future__ import annotations

import copy
import logging
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .aggregate import (
    Contribution,
    aggregate_components,
    average_elements,
    check_update,
    component_change,
    frobenius_inner,
    mix_history,
    momentum_view,
    rotate_momentum_by,
    unscale_sqrt,
)
from .attention import convert_attention, restore_attention
from .channels import ChannelPlan, channel_plan
from .config import STRATEGIES, PrismConfig
from .decompose import Factors, factorizable_layers
from .layers import convert_static_bn
from .rank import effective_kernels
from .refresh import Refreshed, block_refresh, decompose_qr, weight_refresh
from .sampling import (
    draw_capacity,
    first_channels,
    hybrid_components,
    keep_count,
    make_generator,
    rolling_channels,
    top_components,
)
from .server_opt import ServerOptimizer
from .submodel import META, MOMENTUM, RESERVED, SubModel, build_module, meta_skeleton

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientUpdate:
    """An update as a transport delivers it: the sender's id as the *server* knows it, the ``up``
    payload, and the number of local samples."""

    client_id: int
    payload: Mapping[str, Tensor]
    num_samples: int = 1
    train_loss: float = float("nan")
    start_loss: float = float("nan")


@dataclass
class AggregateReport:
    """What one aggregation did."""

    round_idx: int
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    coverage: float = 0.0
    refresh_failed: list[str] = field(default_factory=list)
    #: per factorized layer: what the round's sub-models carried and how the layer moved
    #: (``energy_kept``, ``coverage``, ``effective_rank``, ``rank``, ``delta_rel``, ``delta_top``,
    #: ``delta_rest``; see :meth:`PrincipalModel.aggregate`)
    layers: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class _Sent:
    """What the server remembers of a sent sub-model (no tensors of the model itself)."""

    keep_ratio: float
    shapes: dict[str, torch.Size]
    indices: dict[str, Tensor]
    components: dict[str, Tensor]
    rows: dict[str, Tensor]
    cols: dict[str, Tensor]
    #: dtype of every trainable entry, and the ``prism::meta`` entry (strategy, client, round, keep)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    meta: Tensor | None = None


class PrincipalModel:
    """Global model in principal form; samples sub-models, aggregates them, rebuilds the model.

    Example::

        pm = PrincipalModel(model, PrismConfig(strategy="prism", keep_ratio=0.2, kappa=2.5))
        sub = pm.sample_submodel(client_id=3, round_idx=0)   # sub.module is small
        pm.aggregate([(sub, 500)])
        dense = pm.dense_model()
    """

    def __init__(self, model: nn.Module, config: PrismConfig | None = None) -> None:
        self.config = config or PrismConfig()
        if self.config.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.config.strategy!r} is invalid for PrincipalModel: allowed "
                             f"{', '.join(STRATEGIES)} ({self.config.strategy} runs its own loop: fedml_prism.strategies)")
        model = copy.deepcopy(model).cpu()
        if self.config.static_bn:
            model = convert_static_bn(model)
        model = convert_attention(model)  # nn.MultiheadAttention's projections as factorizable Linear modules
        self.skeleton = meta_skeleton(model)
        self.layers: list[str] = []
        self.plan: ChannelPlan | None = None
        if self.config.principal:
            self.layers = factorizable_layers(model, self.config)
        elif self.config.strategy != "full":
            self.plan = channel_plan(model)
        weights = {name + ".weight" for name in self.layers}
        state = model.state_dict()
        self.dense: OrderedDict[str, Tensor] = OrderedDict(
            (k, v.detach().clone()) for k, v in state.items() if k not in weights
        )
        self.factors: dict[str, Factors] = {
            name: decompose_qr(state[name + ".weight"], self.config.svd_dtype, name) for name in self.layers
        }
        #: layers whose factors are an exact SVD (orthonormal): the block refresh applies to them
        self._exact: set[str] = set(self.layers)
        #: SGD momentum in the global model's coordinates (``optimizer_state: aggregate``): one buffer
        #: per trainable dense parameter, and ``<layer>.u`` / ``<layer>.v`` per factorized layer
        self.momentum: dict[str, Tensor] = {}
        self._trainable = {k for k, _ in self.skeleton.named_parameters()}
        if self.config.optimizer_state == "aggregate":
            self.momentum = {k: torch.zeros_like(v) for k, v in self.dense.items() if k in self._trainable}
            for name, f in self.factors.items():
                self.momentum[name + ".u"] = torch.zeros_like(f.u)
                self.momentum[name + ".v"] = torch.zeros_like(f.v)
        #: FedAvgM / FedAdam on the round's aggregated change (``server_optimizer``), else None
        self.server_opt = ServerOptimizer(self.config) if self.config.server_optimizer != "none" else None
        self.rounds_done = 0
        self._sent: dict[int, _Sent] = {}
        self._open_round: int | None = None

    # ------------------------------------------------------------------ sampling
    def keep_ratio_for(self, client_id: int) -> float:
        """The client's keep ratio: fixed, or drawn once from ``capacities``."""
        if self.config.capacities:
            return draw_capacity(self.config.capacities, self.config.seed, client_id)
        return self.config.keep_ratio

    def sample_submodel(
        self, client_id: int, round_idx: int, device: torch.device | str = "cpu", record: bool = True
    ) -> SubModel:
        """Build client ``client_id``'s sub-model for round ``round_idx`` and remember what was sent
        (``record=False``: a preview, e.g. for cost reports, that no update can answer)."""
        if not record:
            return self._build(client_id, round_idx, self.keep_ratio_for(client_id), device)
        if self._open_round is not None and round_idx != self._open_round and self._sent:
            log.warning(
                "round %d opened while round %d had %d unaggregated sub-models; dropping them",
                round_idx, self._open_round, len(self._sent),
            )
            self._sent.clear()
        self._open_round = round_idx
        rho = self.keep_ratio_for(client_id)
        sub = self._build(client_id, round_idx, rho, device)
        up = sub.to_payload("up")
        trainable = {k: v for k, v in up.items() if not k.startswith(RESERVED) or k.startswith(MOMENTUM)}
        self._sent[client_id] = _Sent(
            rho,
            {k: v.shape for k, v in trainable.items()},
            sub.index_entries(),
            sub.components,
            sub.rows,
            sub.cols,
            {k: v.dtype for k, v in trainable.items()},
            up[META],
        )
        return sub

    def _build(self, client_id: int, round_idx: int, rho: float, device: Any) -> SubModel:
        if self.config.principal:
            return self._sample_principal(client_id, round_idx, rho, device)
        return self._sample_channels(client_id, round_idx, rho, device)

    def _sample_principal(self, client_id: int, round_idx: int, rho: float, device: Any) -> SubModel:
        g = make_generator(self.config.seed, "sample", round_idx, client_id)
        state: dict[str, Tensor] = dict(self.dense)
        components: dict[str, Tensor] = {}
        top_k = self.config.strategy == "orthdrop" or round_idx < self.config.warmup_rounds
        for name in self.layers:
            f = self.factors[name]
            rank = len(f.sigma)
            keep = keep_count(rho, rank)
            if top_k:
                idx = top_components(rank, keep)
            else:
                top = round(self.config.top_share * keep)
                idx = hybrid_components(f.sigma, keep, top, self.config.kappa, g)
            components[name] = idx
            kept = Factors(f.u[:, idx], f.sigma[idx], f.v[idx])
            if self.config.factor_scale == "sqrt":
                kept = _sqrt_form(kept)
            state[name + ".u"], state[name + ".v"], state[name + ".sigma"] = kept.u, kept.v, kept.sigma
        ranks = {n: len(i) for n, i in components.items()}
        module = build_module(self.skeleton, state, ranks, device=device)
        momentum = {}
        if self.momentum:
            momentum = {k: self.momentum[k] for k in self.dense if k in self.momentum}
            for name, idx in components.items():
                momentum[name + ".u"] = self.momentum[name + ".u"][:, idx]
                momentum[name + ".v"] = self.momentum[name + ".v"][idx]
        return SubModel(module, self.config.strategy, client_id, round_idx, rho, components, momentum=momentum)

    def _sample_channels(self, client_id: int, round_idx: int, rho: float, device: Any) -> SubModel:
        if self.plan is None:  # full FedAvg
            module = build_module(self.skeleton, self.dense, device=device)
            return SubModel(module, "full", client_id, round_idx, rho, momentum=dict(self.momentum))
        kept = {}
        for g in self.plan.free_groups():
            size = self.plan.sizes[g]
            keep = keep_count(rho, size)
            if self.config.strategy == "rolex":
                kept[g] = rolling_channels(size, keep, round_idx)
            else:
                kept[g] = first_channels(size, keep)
        slices = self.plan.slices(kept)
        state = {key: _cut(value, slices.get(key.rpartition(".")[0])) for key, value in self.dense.items()}
        momentum = {key: _cut(value, slices.get(key.rpartition(".")[0])) for key, value in self.momentum.items()}
        cut = {n: (None if r is None else len(r), None if c is None else len(c)) for n, (r, c) in slices.items()}
        module = build_module(self.skeleton, state, cut=cut, device=device)
        rows = {n: r for n, (r, _) in slices.items() if r is not None}
        cols = {n: c for n, (_, c) in slices.items() if c is not None}
        return SubModel(module, self.config.strategy, client_id, round_idx, rho, rows=rows, cols=cols, momentum=momentum)

    def distinct_selections(self) -> int:
        """How many different sub-models (index sets and sizes) were sent in the open round."""
        keys = {
            tuple((k, tuple(v.tolist())) for k, v in sorted(sent.indices.items())) + (sent.keep_ratio,)
            for sent in self._sent.values()
        }
        return len(keys)

    # ------------------------------------------------------------------ aggregation
    def aggregate(self, updates: Iterable[tuple[SubModel, int] | ClientUpdate]) -> AggregateReport:
        """Aggregate the open round: validate each update against what was sent, Eq. 3 on the
        principal components, FedAvg (element-wise for channel baselines) on dense entries, then
        re-decompose (orthogonal refresh). Rejected updates are logged and left out."""
        report = AggregateReport(round_idx=self._open_round if self._open_round is not None else self.rounds_done)
        contributions = []
        for item in updates:
            if isinstance(item, ClientUpdate):
                client_id, payload, num = item.client_id, item.payload, item.num_samples
            else:
                sub, num = item
                client_id, payload = sub.client_id, sub.to_payload("up")
            sent = self._sent.get(client_id)
            if sent is None:
                reason = f"no sub-model was sent to client {client_id} in this round"
            elif client_id in report.accepted:
                reason = f"a second update from client {client_id} in this round"
            elif isinstance(num, bool) or not isinstance(num, (int, float)) or not (num > 0 and math.isfinite(num)):
                reason = f"num_samples={num!r} is not a positive number"
            else:
                reason = check_update(payload, sent.shapes, sent.indices, sent.dtypes, sent.meta)
            if reason is not None:
                log.warning("round %d: rejected update of client %d: %s", report.round_idx + 1, client_id, reason)
                report.rejected[client_id] = reason
                continue
            weight = float(num) if self.config.weighting == "samples" else 1.0
            contributions.append((client_id, Contribution(payload, weight, sent.components, sent.rows, sent.cols)))
            report.accepted.append(client_id)
        # a fixed order (by client id) makes the float sums independent of arrival order
        contributions = [c for _, c in sorted(contributions, key=lambda item: item[0])]
        if contributions:
            before = self.dense
            self.dense = average_elements(self.dense, contributions)
            if self.server_opt is not None:
                for key in self.dense:
                    if key in self._trainable and self.dense[key].is_floating_point():
                        self.dense[key] = self.server_opt.step(key, before[key], self.dense[key])
            if self.momentum:
                views = [momentum_view(c) for c in contributions]
                dense_keys = [k for k in self.momentum if k in self.dense]
                self.momentum.update(average_elements({k: self.momentum[k] for k in dense_keys}, views))
            if self.layers:
                self._aggregate_layers(contributions, report)
        else:
            log.warning("round %d: no update accepted; the global model is unchanged", report.round_idx + 1)
        self._sent.clear()
        self._open_round = None
        self.rounds_done += 1
        return report

    def _aggregate_layers(self, contributions: list[Contribution], report: AggregateReport) -> None:
        """Eq. 3 on every factorized layer, the momentum of the factors with the same coefficients,
        the orthogonal refresh, and the round's per-layer diagnostics."""
        old = self.factors
        sqrt = self.config.factor_scale == "sqrt"
        work = {n: _sqrt_form(f) for n, f in old.items()} if sqrt else old
        factors = aggregate_components(work, contributions)
        hits = {n: _hits(n, len(f.sigma), contributions) for n, f in old.items()}
        if self.config.history_mix > 0:
            factors = {n: mix_history(factors[n], work[n], hits[n], self.config.history_mix) for n in factors}
        if sqrt:
            factors = {n: unscale_sqrt(factors[n], old[n], hits[n] > 0) for n in factors}
        report.coverage = sum(int((h > 0).sum()) for h in hits.values()) / max(1, sum(len(h) for h in hits.values()))
        change = {n: _trained_change(old[n], factors[n], hits[n] > 0) for n in old}
        momentum_factors = {}
        if self.momentum:
            views = [momentum_view(c) for c in contributions]
            momentum_factors = aggregate_components(
                {n: Factors(self.momentum[n + ".u"], old[n].sigma, self.momentum[n + ".v"]) for n in old}, views
            )
        refreshed: dict[str, Refreshed] = {}
        if self.server_opt is not None:
            refreshed = self._server_step(old, factors, report)
        elif self.config.refresh:
            refreshed = self._refresh(old, factors, hits, report)
        else:
            self._exact -= {n for n, h in hits.items() if bool((h > 0).any())}
        factors = {n: refreshed[n].factors if n in refreshed else f for n, f in factors.items()}
        for name, f in factors.items():
            done = refreshed.get(name)
            if name in momentum_factors:
                m = momentum_factors[name]
                if done is not None:  # carry the buffers into the refreshed basis
                    m = rotate_momentum_by(m, done.q_u, done.q_v, f.sigma)
                self.momentum[name + ".u"], self.momentum[name + ".v"] = m.u, m.v
            report.layers[name] = _layer_diagnostics(old[name], f, hits[name], change[name], contributions, name,
                                                     keep_count(self.config.max_keep_ratio, len(f.sigma)), done)
        self.factors = factors

    def _refresh(
        self, old: dict[str, Factors], factors: dict[str, Factors], hits: dict[str, Tensor], report: AggregateReport
    ) -> dict[str, Refreshed]:
        """The orthogonal refresh of every layer (:mod:`fedml_prism.engine.refresh`): in the block form where
        the layer's previous factors are an exact SVD, else (or if the block form fails) by
        decomposing the dense weight. A layer no form can decompose keeps its aggregated factors."""
        out = {}
        for name, f in factors.items():
            if name in self._exact:
                try:
                    out[name] = block_refresh(old[name], f, hits[name] > 0, self.config.svd_dtype)
                    continue
                except (RuntimeError, torch.linalg.LinAlgError) as err:
                    log.info("layer %r: block refresh not applicable (%s); decomposing the dense weight", name, err)
            self._decompose(name, old[name], f.dense(), out, report)
        return out

    def _server_step(self, old: dict[str, Factors], factors: dict[str, Factors], report: AggregateReport) -> dict[str, Refreshed]:
        """The server optimizer's step on every layer's dense product, then its decomposition (the refresh)."""
        out: dict[str, Refreshed] = {}
        for name, f in factors.items():
            self._decompose(name, old[name], self.server_opt.step(name + ".weight", old[name].dense(), f.dense()), out, report)
        return out

    def _decompose(self, name: str, old: Factors, weight: Tensor, out: dict[str, Refreshed], report: AggregateReport) -> None:
        """``out[name]``: the layer decomposed from its dense ``weight``; a layer no precision can decompose
        keeps its aggregated factors (logged, listed in the report)."""
        try:
            out[name] = weight_refresh(old, weight, self.config.svd_dtype, name)
            self._exact.add(name)
        except ValueError as err:
            log.warning("orthogonal refresh skipped for layer %r this round: %s", name, err)
            report.refresh_failed.append(name)
            self._exact.discard(name)

    # ------------------------------------------------------------------ the dense model
    def dense_state_dict(self) -> OrderedDict[str, Tensor]:
        """The rebuilt dense model's ``state_dict`` (``W = U diag(σ) Vᵀ`` for factorized layers)."""
        state = OrderedDict(self.dense)
        for name, f in self.factors.items():
            state[name + ".weight"] = f.dense()
        return state

    def dense_model(self, device: torch.device | str = "cpu") -> nn.Module:
        """An ``nn.Module`` with the rebuilt dense weights."""
        return build_module(self.skeleton, self.dense_state_dict(), device=device)

    def load_dense_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Replace the global model with dense weights (re-decomposes the factorized layers). The keys
        are this model's, or the user model's own (``nn.MultiheadAttention``'s ``in_proj_weight``)."""
        weights = {name + ".weight" for name in self.layers}
        missing = sorted((set(self.dense) | weights) - set(state))
        if missing and any(k.endswith(("in_proj_weight", "q_proj_weight")) for k in state):
            torch_form = restore_attention(self.dense_model())
            torch_form.load_state_dict(state)
            state = convert_attention(torch_form).state_dict()
            missing = sorted((set(self.dense) | weights) - set(state))
        if missing:
            raise ValueError(f"dense state is missing keys {missing[:5]}")
        self.dense = OrderedDict((k, state[k].detach().cpu().clone()) for k in self.dense)
        self.factors = {n: decompose_qr(state[n + ".weight"].detach().cpu(), self.config.svd_dtype, n) for n in self.layers}
        self._exact = set(self.layers)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue a run; loads with ``torch.load(weights_only=True)``."""
        return {
            "rounds_done": self.rounds_done,
            "config": self.config.to_dict(),
            "dense": dict(self.dense),
            "factors": {n: {"u": f.u, "sigma": f.sigma, "v": f.v} for n, f in self.factors.items()},
            "momentum": dict(self.momentum),
            "exact_svd": sorted(self._exact),
            "server_optimizer": self.server_opt.state_dict() if self.server_opt is not None else {},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (same model and strategy)."""
        if sorted(state["factors"]) != sorted(self.layers) or set(state["dense"]) != set(self.dense):
            raise ValueError("checkpoint does not match this model/strategy (different layers)")
        self.rounds_done = int(state["rounds_done"])
        self.dense = OrderedDict((k, state["dense"][k].clone()) for k in self.dense)
        self.factors = {n: Factors(d["u"].clone(), d["sigma"].clone(), d["v"].clone()) for n, d in state["factors"].items()}
        momentum = state.get("momentum", {})
        if set(momentum) != set(self.momentum):
            raise ValueError("checkpoint's momentum buffers do not match optimizer_state of this run")
        self.momentum = {k: v.clone() for k, v in momentum.items()}
        # checkpoints before the block refresh do not say which layers are an exact SVD: assume none
        self._exact = set(state.get("exact_svd", ())) & set(self.layers)
        if self.server_opt is not None:
            self.server_opt.load_state_dict(state.get("server_optimizer", {}))
        self._sent.clear()
        self._open_round = None


def _cut(value: Tensor, rows_cols: tuple[Tensor | None, Tensor | None] | None) -> Tensor:
    """``value`` restricted to the kept output rows / input columns of its module."""
    rows, cols = rows_cols or (None, None)
    if rows is not None and value.dim() >= 1:
        value = value.index_select(0, rows)
    if cols is not None and value.dim() >= 2:
        value = value.index_select(1, cols)
    return value


def _sqrt_form(f: Factors) -> Factors:
    """``(u√σ, 1, √σv)``: the factors as clients train them with ``factor_scale: sqrt``."""
    root = f.sigma.clamp_min(0).sqrt()
    return Factors(f.u * root, torch.ones_like(f.sigma), f.v * root.view(-1, *[1] * (f.v.dim() - 1)))


def _hits(name: str, rank: int, contributions: list[Contribution]) -> Tensor:
    """How many accepted clients trained each component of layer ``name``."""
    hits = torch.zeros(rank, dtype=torch.int64)
    for c in contributions:
        if name in c.components:
            hits[c.components[name]] += 1
    return hits


def _trained_change(old: Factors, new: Factors, trained: Tensor) -> Tensor:
    """:func:`component_change` on the trained components only (the others did not move: 0)."""
    out = torch.zeros(len(old.sigma), dtype=torch.float64)
    if bool(trained.any()):
        pick = lambda f: Factors(f.u[:, trained], f.sigma[trained], f.v[trained])  # noqa: E731
        out[trained] = component_change(pick(old), pick(new))
    return out


def _layer_diagnostics(
    old: Factors, new: Factors, hits: Tensor, change: Tensor, contributions: list[Contribution], name: str, top: int,
    refreshed: Refreshed | None = None,
) -> dict[str, float]:
    """One layer's round: the energy share ``Σσ²_kept / Σσ²`` the sub-models carried (mean over
    clients), the share of components trained, the effective rank after the round, the relative
    change of the layer, and the mean relative change per component for the top-``top`` components
    and for the others (untrained components count 0). With a refresh, the change comes from its
    projections (no product over the layer)."""
    energy = old.sigma.to(torch.float64) ** 2
    total = float(energy.sum()) or 1.0
    shares = [float(energy[c.components[name]].sum()) / total for c in contributions if name in c.components]
    if refreshed is not None:
        before, after, inner = refreshed.norm_old, float((new.sigma.to(torch.float64) ** 2).sum()), refreshed.inner_old
    else:
        before, after, inner = frobenius_inner(old, old), frobenius_inner(new, new), frobenius_inner(new, old)
    delta = max(after - 2 * inner + before, 0.0) ** 0.5 / max(before, 1e-24) ** 0.5
    return {
        "rank": len(old.sigma),
        "energy_kept": sum(shares) / len(shares) if shares else 0.0,
        "coverage": float((hits > 0).double().mean()),
        "effective_rank": effective_kernels(new.sigma),
        "delta_rel": delta,
        "delta_top": float(change[:top].mean()),
        "delta_rest": float(change[top:].mean()) if len(change) > top else 0.0,
    }
