"""Equal budgets: the keep ratio at which a strategy's client sub-model has as many parameters as
prism's (``match: params``)."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ...engine.config import PrismConfig
from ...engine.decompose import factorizable_layers
from ...engine.principal import PrincipalModel
from ...job import Job
from ...workloads.models import create_model


class ParamCounter:
    """Client sub-model parameter counts of one model by strategy and keep ratio, cached.

    A :class:`PrincipalModel` is built once per distinct structure (the factorized layer set for the
    principal strategies, which can change with the keep ratio; the channel plan for origdrop /
    rolex; the dense model for full) and reused for every keep ratio with that structure, so the
    SVDs of big layers run once."""

    def __init__(self, model: nn.Module, base_config: PrismConfig | Mapping[str, Any] | None = None) -> None:
        self.model = model
        if base_config is None:
            base_config = PrismConfig()
        elif not isinstance(base_config, PrismConfig):
            base_config = PrismConfig.from_mapping(base_config)
        self.base = dataclasses.replace(base_config, capacities=None)
        self._models: dict[tuple, PrincipalModel] = {}
        self._counts: dict[tuple[str, float], int] = {}

    def config(self, strategy: str, keep_ratio: float) -> PrismConfig:
        """The base config with ``strategy`` and a fixed ``keep_ratio`` (no capacities)."""
        return dataclasses.replace(self.base, strategy=strategy, keep_ratio=keep_ratio)

    def dense_params(self) -> int:
        """Parameters of the dense model."""
        return sum(p.numel() for p in self.model.parameters())

    def sizes(self) -> set[int]:
        """Every channel count / rank whose multiples ``j / C`` can be a step of the count."""
        out: set[int] = set()
        for p in self.model.parameters():
            if p.dim() >= 2:
                out |= {p.shape[0], p.shape[1], min(p.shape[0], math.prod(p.shape[1:]))}
        for pm in self._models.values():
            if pm.plan is not None:
                out |= set(pm.plan.sizes.values())
        return {c for c in out if c > 0}

    def count(self, strategy: str, keep_ratio: float) -> int:
        """Parameters of client 0's round-0 sub-model (``sample_submodel(0, 0, record=False)``)."""
        key = (strategy, float(keep_ratio))
        if key not in self._counts:
            cfg = self.config(strategy, keep_ratio)
            if cfg.principal:
                structure: tuple = ("principal", tuple(factorizable_layers(self.model, cfg)))
            else:
                structure = (cfg.strategy == "full",)
            pm = self._models.get(structure)
            if pm is None:
                pm = self._models[structure] = PrincipalModel(self.model, cfg)
            view = copy.copy(pm)  # shares the factors; only the config (strategy, keep ratio) differs
            view.config = cfg
            sub = view.sample_submodel(0, 0, record=False)
            self._counts[key] = sum(p.numel() for p in sub.module.parameters())
        return self._counts[key]


def match_keep_ratio(
    model: nn.Module,
    strategy: str,
    target_params: int,
    base_config: PrismConfig | Mapping[str, Any] | None = None,
    *,
    tolerance: float = 0.02,
    counter: ParamCounter | None = None,
) -> float:
    """The keep ratio in (0, 1] whose ``strategy`` client sub-model has the parameter count closest
    to ``target_params`` (within ``tolerance``, relative).

    Channel / component counts are ``ceil(k·C)``, so the count is a step function of ``k`` whose steps
    end at ``j / C``: a bisection over those step points finds where the count crosses the target,
    then the step points around it are scanned and the closest (smallest ``k`` on ties) is returned.
    ``counter`` (built for the same model and base config) shares its cached models between calls.

    Raises ``ValueError`` (naming strategy and target) when no keep ratio is within tolerance."""
    counter = counter or ParamCounter(model, base_config)
    target = int(target_params)
    if target <= 0:
        raise ValueError(f"match_keep_ratio: target_params={target_params!r} is invalid: allowed an integer > 0")
    if strategy == "full":
        candidates = [1.0]
    else:
        # the count only changes right after a step point j / C (C: a channel count or rank), and
        # the step point itself is the largest keep ratio of its step: bisect over the step points
        counter.count(strategy, 1.0)  # builds the strategy's model first, so sizes() knows its channel plan
        steps = sorted({j / c for c in counter.sizes() for j in range(1, c + 1)} | {1.0})
        lo, hi = -1, len(steps) - 1  # count(steps[lo]) < target <= count(steps[hi]) (lo = -1: below all)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if counter.count(strategy, steps[mid]) >= target:
                hi = mid
            else:
                lo = mid
        candidates = steps[max(0, hi - 6): hi + 7]
    best = min(candidates, key=lambda k: (abs(counter.count(strategy, k) - target), k))
    got = counter.count(strategy, best)
    if abs(got - target) > tolerance * target:
        raise ValueError(
            f"match_keep_ratio: no keep ratio gives {strategy} a sub-model within {tolerance:.0%} of "
            f"{target:,} parameters (closest: {got:,} at keep {best:.4g})"
        )
    return best


def resolve_match(match: str | None, profile: Mapping[str, Any]) -> str | None:
    """``match`` argument (None: the profile's ``match``; ``"none"``: off) as ``"params"`` or None."""
    value = match if match is not None else profile.get("match")
    if value in (None, "none"):
        return None
    if value != "params":
        raise ValueError(f"match={value!r} is invalid: allowed params, none")
    return "params"


@dataclasses.dataclass
class KeepMatcher:
    """The matched keep ratio of each (strategy, nominal keep) of one bench, computed once; one
    :class:`ParamCounter` (built from the first job's model) serves them all."""

    counter: ParamCounter | None = None
    matched: dict[tuple[str, float], float] = dataclasses.field(default_factory=dict)

    def keep(self, strategy: str, keep: float, job_of: Callable[[], Job]) -> float:
        """The keep ratio ``strategy`` runs at for the nominal ``keep``; ``job_of()`` gives the run's Job
        (only built when this pair was not matched yet)."""
        if (strategy, keep) not in self.matched:
            self.matched[(strategy, keep)] = self._match(strategy, keep, job_of())
        return self.matched[(strategy, keep)]

    def _match(self, strategy: str, keep: float, job: Job) -> float:
        if job.prism.capacities:
            raise ValueError("match=params needs a fixed keep_ratio: the profile's prism_args set capacities")
        if self.counter is None:
            self.counter = ParamCounter(create_model(job.model, **job.model_kwargs), job.prism)
        target = self.counter.count("prism", keep)
        if self.counter.count(strategy, keep) == target:
            return keep
        return match_keep_ratio(self.counter.model, strategy, target, counter=self.counter)
