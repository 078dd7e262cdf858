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

from .aggregate import Contribution, aggregate_components, average_elements, check_update
from .channels import ChannelPlan, channel_plan
from .config import PrismConfig
from .decompose import Factors, factorizable_layers, svd_factors
from .layers import convert_static_bn
from .sampling import (
    draw_capacity,
    first_channels,
    keep_count,
    make_generator,
    rolling_channels,
    sample_components,
    top_components,
)
from .submodel import RESERVED, SubModel, build_module, meta_skeleton

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientUpdate:
    """An update as a transport delivers it: the sender's id as the *server* knows it, the ``up``
    payload, and the number of local samples."""

    client_id: int
    payload: Mapping[str, Tensor]
    num_samples: int = 1
    train_loss: float = float("nan")


@dataclass
class AggregateReport:
    """What one aggregation did."""

    round_idx: int
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    coverage: float = 0.0
    refresh_failed: list[str] = field(default_factory=list)


@dataclass
class _Sent:
    """What the server remembers of a sent sub-model (no tensors of the model itself)."""

    keep_ratio: float
    shapes: dict[str, torch.Size]
    indices: dict[str, Tensor]
    components: dict[str, Tensor]
    rows: dict[str, Tensor]
    cols: dict[str, Tensor]


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
        model = copy.deepcopy(model).cpu()
        if self.config.static_bn:
            model = convert_static_bn(model)
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
            name: svd_factors(state[name + ".weight"], self.config.svd_dtype, name) for name in self.layers
        }
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
        self._sent[client_id] = _Sent(
            rho,
            {k: v.shape for k, v in up.items() if not k.startswith(RESERVED)},
            sub.index_entries(),
            sub.components,
            sub.rows,
            sub.cols,
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
        for name in self.layers:
            f = self.factors[name]
            rank = len(f.sigma)
            keep = keep_count(rho, rank)
            if self.config.strategy == "orthdrop":
                idx = top_components(rank, keep)
            else:
                idx = sample_components(f.sigma, keep, self.config.kappa, g)
            components[name] = idx
            state[name + ".u"] = f.u[:, idx]
            state[name + ".v"] = f.v[idx]
            state[name + ".sigma"] = f.sigma[idx]
        ranks = {n: len(i) for n, i in components.items()}
        module = build_module(self.skeleton, state, ranks, device=device)
        return SubModel(module, self.config.strategy, client_id, round_idx, rho, components)

    def _sample_channels(self, client_id: int, round_idx: int, rho: float, device: Any) -> SubModel:
        if self.plan is None:  # full FedAvg
            module = build_module(self.skeleton, self.dense, device=device)
            return SubModel(module, "full", client_id, round_idx, rho)
        kept = {}
        for g in self.plan.free_groups():
            size = self.plan.sizes[g]
            keep = keep_count(rho, size)
            if self.config.strategy == "rolex":
                kept[g] = rolling_channels(size, keep, round_idx)
            else:
                kept[g] = first_channels(size, keep)
        slices = self.plan.slices(kept)
        state = {}
        for key, value in self.dense.items():
            rows, cols = slices.get(key.rpartition(".")[0], (None, None))
            if rows is not None and value.dim() >= 1:
                value = value.index_select(0, rows)
            if cols is not None and value.dim() >= 2:
                value = value.index_select(1, cols)
            state[key] = value
        cut = {n: (None if r is None else len(r), None if c is None else len(c)) for n, (r, c) in slices.items()}
        module = build_module(self.skeleton, state, cut=cut, device=device)
        rows = {n: r for n, (r, _) in slices.items() if r is not None}
        cols = {n: c for n, (_, c) in slices.items() if c is not None}
        return SubModel(module, self.config.strategy, client_id, round_idx, rho, rows=rows, cols=cols)

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
                reason = check_update(payload, sent.shapes, sent.indices)
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
            self.dense = average_elements(self.dense, contributions)
            if self.layers:
                report.coverage = _coverage(self.factors, contributions)
                factors = aggregate_components(self.factors, contributions)
                if self.config.refresh:
                    factors = self._refresh(factors, report)
                self.factors = factors
        else:
            log.warning("round %d: no update accepted; the global model is unchanged", report.round_idx + 1)
        self._sent.clear()
        self._open_round = None
        self.rounds_done += 1
        return report

    def _refresh(self, factors: dict[str, Factors], report: AggregateReport) -> dict[str, Factors]:
        out = {}
        for name, f in factors.items():
            try:
                out[name] = svd_factors(f.dense(), self.config.svd_dtype, name)
            except ValueError as err:
                log.warning("orthogonal refresh skipped for layer %r this round: %s", name, err)
                report.refresh_failed.append(name)
                out[name] = f
        return out

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
        """Replace the global model with dense weights (re-decomposes the factorized layers)."""
        weights = {name + ".weight" for name in self.layers}
        missing = sorted((set(self.dense) | weights) - set(state))
        if missing:
            raise ValueError(f"dense state is missing keys {missing[:5]}")
        self.dense = OrderedDict((k, state[k].detach().cpu().clone()) for k in self.dense)
        self.factors = {n: svd_factors(state[n + ".weight"].detach().cpu(), self.config.svd_dtype, n) for n in self.layers}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue a run; loads with ``torch.load(weights_only=True)``."""
        return {
            "rounds_done": self.rounds_done,
            "config": self.config.to_dict(),
            "dense": dict(self.dense),
            "factors": {n: {"u": f.u, "sigma": f.sigma, "v": f.v} for n, f in self.factors.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (same model and strategy)."""
        if sorted(state["factors"]) != sorted(self.layers) or set(state["dense"]) != set(self.dense):
            raise ValueError("checkpoint does not match this model/strategy (different layers)")
        self.rounds_done = int(state["rounds_done"])
        self.dense = OrderedDict((k, state["dense"][k].clone()) for k in self.dense)
        self.factors = {n: Factors(d["u"].clone(), d["sigma"].clone(), d["v"].clone()) for n, d in state["factors"].items()}
        self._sent.clear()
        self._open_round = None


def _coverage(factors: Mapping[str, Factors], contributions: list[Contribution]) -> float:
    """Fraction of all principal components trained by at least one client this round."""
    total = hit = 0
    for name, f in factors.items():
        seen = torch.zeros(len(f.sigma), dtype=torch.bool)
        for c in contributions:
            if name in c.components:
                seen[c.components[name]] = True
        total += len(seen)
        hit += int(seen.sum())
    return hit / total if total else 0.0
