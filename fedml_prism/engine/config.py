"""The one validated, frozen configuration object of the PriSM engine.

Everything the engine needs is here; FedML's ``args`` never reaches the core (the FedML glue builds a
``PrismConfig`` once with :meth:`PrismConfig.from_mapping`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

#: Strategies that sample in the orthogonal (principal) space.
PRINCIPAL_STRATEGIES = ("prism", "uniform", "orthdrop")
#: Strategies that keep the dense model and cut original channels (or none for ``full``).
CHANNEL_STRATEGIES = ("origdrop", "rolex", "full")
STRATEGIES = PRINCIPAL_STRATEGIES + CHANNEL_STRATEGIES
#: Names of methods defined above the engine (``fedml_prism.strategies`` registers its own with
#: :func:`register_methods` when it is imported). A ``PrismConfig`` may name them so one config and one
#: bench schedule serve every method; ``PrincipalModel`` refuses them. The engine knows none of them.
_REGISTERED: list[str] = []
WEIGHTINGS = ("uniform", "samples")
SVD_DTYPES = ("float32", "float64")
#: How a client's factors carry σ: ``frozen`` (the paper's text: unit ``u``, ``v`` trained, σ a frozen
#: buffer) or ``sqrt`` (the authors' reference code: ``u√σ`` and ``√σv`` trained, σ implicit).
FACTOR_SCALES = ("frozen", "sqrt")
#: What happens to the clients' SGD momentum between rounds: ``reset`` (a fresh optimizer each round)
#: or ``aggregate`` (the server aggregates the buffers like the weights and sends them back).
OPTIMIZER_STATES = ("reset", "aggregate")
#: Which layers become principal kernels (see :func:`fedml_prism.engine.decompose.classify_layers`):
#: ``default`` (every Conv2d / Linear / attention projection that saves, except the first layer on raw
#: input, the classifier and residual shortcut convs) or ``paper`` (the paper's rule).
RULES = ("default", "paper")
#: What a client keeps for backward (:mod:`fedml_prism.engine.recompute`): ``principal`` (each block keeps
#: its inputs and its principal layers' narrow outputs, the full-width part is recomputed; dense blocks
#: keep their conv / matmul outputs and recompute BN + activation) or ``full`` (plain autograd).
ACTIVATION_MEMORY = ("principal", "full")
#: The server's step on the round's aggregated change (Reddi et al. 2021, "Adaptive Federated
#: Optimization"): ``none`` (the aggregate is the new model, FedAvg), ``avgm`` (server momentum,
#: FedAvgM) or ``adam`` (FedAdam); see :mod:`fedml_prism.engine.server_opt`.
SERVER_OPTIMIZERS = ("none", "avgm", "adam")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"PrismConfig.{name}={value!r} is invalid: allowed {allowed}")


def _check_ratio(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, value, "a number in (0, 1]")
    value = float(value)
    if not (0.0 < value <= 1.0) or math.isnan(value):
        _fail(name, value, "a number in (0, 1]")
    return value


def register_methods(names: tuple[str, ...]) -> None:
    """Let ``PrismConfig.strategy`` name methods defined above the engine (in their order, once each)."""
    _REGISTERED.extend(n for n in names if n not in _REGISTERED and n not in STRATEGIES)


def known_strategies() -> tuple[str, ...]:
    """The engine's strategies, then the registered methods."""
    return STRATEGIES + tuple(_REGISTERED)


@dataclass(frozen=True)
class PrismConfig:
    """Settings of one PriSM (or baseline) federated job.

    Attributes:
        strategy: ``prism`` (importance sampling, Eq. 2), ``uniform`` (prism with ``kappa=0``),
            ``orthdrop`` (the same top components for everyone, FedHM), ``origdrop``
            (HeteroFL/FjORD first channels), ``rolex`` (FedRolex rolling window) or ``full`` (FedAvg).
        keep_ratio: fraction ρ of components (or channels) every client keeps, in (0, 1].
        capacities: optional ``{keep_ratio: probability}``; each client draws its keep ratio once
            from it (heterogeneous clients). Overrides ``keep_ratio``.
        kappa: smooth factor κ ≥ 0 of the sampling probabilities ``p_i ∝ σ_i^κ``.
        reg_lambda: λ of the Eq. 4 regularizer on the kept principal kernels (replaces weight decay
            on the factors).
        seed: root of every random choice (samplers and capacity draws).
        weighting: ``uniform`` (α = 1/C_i, the paper) or ``samples`` (weights ∝ client sample count).
        rule: which layers become principal kernels. ``default``: every Conv2d (groups 1) and Linear
            (subclasses with Linear's forward too, so attention projections; ``nn.MultiheadAttention``
            is converted first) except the parts below. ``paper``: the paper's rule, Conv2d and plain
            ``nn.Linear`` only, every 1×1 conv dense.
        factorize_include: module name patterns (fnmatch) or type names forced into principal form.
        factorize_exclude: module name patterns or type names kept dense (wins over include).
        skip_first_conv: keep the first layer dense (``default``: every layer fed by the raw input;
            ``paper``: the first Conv2d).
        skip_1x1: ``default``: keep residual shortcut / downsample convs dense (the 1×1 convs the paper
            meant); ``paper``: keep every 1×1 conv dense.
        skip_classifier: keep the classifier (the last Linear) dense.
        skip_no_saving: keep a layer dense when its principal form at the largest keep ratio would not
            be smaller than the dense weight.
        static_bn: convert BatchNorm layers to ``track_running_stats=False``.
        svd_dtype: precision of the decompositions (``float32`` or ``float64``).
        refresh: re-decompose every factorized layer after each aggregation (orthogonal refresh).
        factor_scale: ``frozen`` (σ frozen, unit factors trained; the paper's text) or ``sqrt``
            (``u√σ`` and ``√σv`` trained, so each component's magnitude trains too; the authors' code).
        optimizer_state: ``reset`` (every round starts with zero momentum) or ``aggregate`` (the
            server keeps momentum buffers in the global model's coordinates, averages the clients'
            final buffers with the weights' coefficients, and sends each client its slice).
        warmup_rounds: the first rounds in which the principal strategies send everyone the top-k
            components (OrthDrop) before sampling starts (the authors' later code uses 50).
        activation_memory: ``principal`` (clients train with selective recomputation: a block keeps
            for backward its inputs and its principal layers' narrow r′-channel outputs and recomputes
            the full-width part; for the dense and channel strategies, BN + activation are recomputed
            from the kept conv outputs) or ``full`` (plain autograd). Same loss, gradients and updates.
        top_share: hybrid sampling (``prism`` / ``uniform``): of each layer's ``k`` kept components the top
            ``round(top_share·k)`` are always sent, the rest are sampled ``∝ σ^κ`` without replacement from
            the tail (0: the paper's sampling; 1: the same sub-model as ``orthdrop``).
        history_mix: τ ≥ 0 of the coverage-aware step (principal strategies): a component trained by
            ``C_i`` of the round's clients moves ``C_i / (C_i + τ)`` of the way from its previous value to
            Eq. 3's average (0: Eq. 3 as is; FedHM's blend with the previous model where few trained).
        server_optimizer: ``none``, ``avgm`` (FedAvgM) or ``adam`` (FedAdam) on the round's aggregated
            change of every trainable weight (the dense product of factorized layers, before the refresh).
        server_lr: the server's step size η (``avgm``: ``w ← w + η·m``; ``adam``: ``w ← w + η·m/(√v+ε)``).
        server_momentum: β₁ (``avgm``: ``m ← β₁·m + Δ``; ``adam``: ``m ← β₁·m + (1−β₁)·Δ``).
        server_beta2: β₂ of ``adam`` (``v ← β₂·v + (1−β₂)·Δ²``).
        server_eps: ε of ``adam`` (Reddi et al.'s τ, the adaptivity floor).
    """

    strategy: str = "prism"
    keep_ratio: float = 0.2
    capacities: Mapping[float, float] | None = None
    kappa: float = 4.0  # measured on the fidelity profiles (docs/fidelity.md); the paper used 2.5
    reg_lambda: float = 5e-4
    seed: int = 0
    weighting: str = "uniform"
    rule: str = "default"
    factorize_include: tuple[str, ...] = ()
    factorize_exclude: tuple[str, ...] = ()
    skip_first_conv: bool = True
    skip_1x1: bool = True
    skip_classifier: bool = True
    skip_no_saving: bool = True
    static_bn: bool = True
    svd_dtype: str = "float32"
    refresh: bool = True
    # defaults measured on the fidelity profiles (docs/fidelity.md): aggregated momentum, √σ factors
    # and κ = 4 help PriSM, a top-k warm-up did not
    factor_scale: str = "sqrt"
    optimizer_state: str = "aggregate"
    warmup_rounds: int = 0
    activation_memory: str = "principal"
    # variants of issue 21 (docs/fidelity.md#variants): off by default
    top_share: float = 0.0
    history_mix: float = 0.0
    server_optimizer: str = "none"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    server_beta2: float = 0.99
    server_eps: float = 1e-3

    def __post_init__(self) -> None:
        if self.strategy not in known_strategies():
            _fail("strategy", self.strategy, f"one of {', '.join(known_strategies())}")
        object.__setattr__(self, "keep_ratio", _check_ratio("keep_ratio", self.keep_ratio))
        if self.capacities is not None:
            object.__setattr__(self, "capacities", self._check_capacities(self.capacities))
        if isinstance(self.kappa, bool) or not isinstance(self.kappa, (int, float)) or not (
            self.kappa >= 0 and math.isfinite(self.kappa)
        ):
            _fail("kappa", self.kappa, "a finite number >= 0")
        if self.strategy == "uniform":
            object.__setattr__(self, "kappa", 0.0)
        if not isinstance(self.reg_lambda, (int, float)) or not (
            self.reg_lambda >= 0 and math.isfinite(self.reg_lambda)
        ):
            _fail("reg_lambda", self.reg_lambda, "a finite number >= 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            _fail("seed", self.seed, "an integer >= 0")
        if self.weighting not in WEIGHTINGS:
            _fail("weighting", self.weighting, f"one of {', '.join(WEIGHTINGS)}")
        if self.factor_scale not in FACTOR_SCALES:
            _fail("factor_scale", self.factor_scale, f"one of {', '.join(FACTOR_SCALES)}")
        if self.activation_memory not in ACTIVATION_MEMORY:
            _fail("activation_memory", self.activation_memory, f"one of {', '.join(ACTIVATION_MEMORY)}")
        if self.optimizer_state not in OPTIMIZER_STATES:
            _fail("optimizer_state", self.optimizer_state, f"one of {', '.join(OPTIMIZER_STATES)}")
        if isinstance(self.warmup_rounds, bool) or not isinstance(self.warmup_rounds, int) or self.warmup_rounds < 0:
            _fail("warmup_rounds", self.warmup_rounds, "an integer >= 0")
        self._check_variants()
        for name in ("refresh", "static_bn", "skip_first_conv", "skip_1x1", "skip_classifier", "skip_no_saving"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "true or false")
        if self.rule not in RULES:
            _fail("rule", self.rule, f"one of {', '.join(RULES)}")
        if self.svd_dtype not in SVD_DTYPES:
            _fail("svd_dtype", self.svd_dtype, f"one of {', '.join(SVD_DTYPES)}")
        for name in ("factorize_include", "factorize_exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not all(isinstance(p, str) and p for p in value):
                _fail(name, value, "a list of module name patterns or type names")
            object.__setattr__(self, name, tuple(value))

    def _check_variants(self) -> None:
        def number(name: str, allowed: str, ok: Any) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
                _fail(name, value, allowed)

        number("top_share", "a number in [0, 1]", lambda v: 0 <= v <= 1)
        number("history_mix", "a finite number >= 0", lambda v: v >= 0)
        number("server_lr", "a finite number > 0", lambda v: v > 0)
        number("server_momentum", "a number in [0, 1)", lambda v: 0 <= v < 1)
        number("server_beta2", "a number in [0, 1)", lambda v: 0 <= v < 1)
        number("server_eps", "a finite number > 0", lambda v: v > 0)
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            _fail("server_optimizer", self.server_optimizer, f"one of {', '.join(SERVER_OPTIMIZERS)}")
        if self.server_optimizer != "none" and self.strategy not in STRATEGIES:
            _fail("server_optimizer", self.server_optimizer,
                  f"none for strategy {self.strategy!r} (the server step applies to {', '.join(STRATEGIES)})")
        if self.server_optimizer != "none" and not self.refresh:
            _fail("server_optimizer", self.server_optimizer,
                  "none with refresh: false (the server step is taken on the dense product, which the refresh decomposes)")
        if self.top_share > 0 and self.strategy not in ("prism", "uniform"):
            _fail("top_share", self.top_share, f"0 for strategy {self.strategy!r} (hybrid sampling applies to prism and uniform)")
        if self.history_mix > 0 and self.strategy not in PRINCIPAL_STRATEGIES:
            _fail("history_mix", self.history_mix,
                  f"0 for strategy {self.strategy!r} (the coverage-aware step applies to {', '.join(PRINCIPAL_STRATEGIES)})")

    @staticmethod
    def _check_capacities(capacities: Mapping[Any, Any]) -> dict[float, float]:
        if not isinstance(capacities, Mapping) or not capacities:
            _fail("capacities", capacities, "a non-empty mapping {keep_ratio: probability}")
        out: dict[float, float] = {}
        for ratio, prob in capacities.items():
            try:
                ratio_f = float(ratio)
            except (TypeError, ValueError):
                _fail("capacities", capacities, "keys that are keep ratios in (0, 1]")
            out[_check_ratio("capacities (key)", ratio_f)] = float(prob)
        if any(p < 0 or not math.isfinite(p) for p in out.values()):
            _fail("capacities", capacities, "probabilities >= 0")
        total = sum(out.values())
        if not math.isclose(total, 1.0, rel_tol=0, abs_tol=1e-6):
            _fail("capacities", capacities, f"probabilities that sum to 1 (they sum to {total:g})")
        return dict(sorted(out.items()))

    @property
    def principal(self) -> bool:
        """True for the strategies that train principal kernels (prism, uniform, orthdrop)."""
        return self.strategy in PRINCIPAL_STRATEGIES

    @property
    def max_keep_ratio(self) -> float:
        """The largest keep ratio any client can get."""
        return max(self.capacities) if self.capacities else self.keep_ratio

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PrismConfig:
        """Build from a plain mapping (e.g. the ``prism_args`` section of a fedml_config.yaml).

        Unknown keys raise a ``ValueError`` that lists the known ones.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"prism_args has unknown key(s) {unknown}: allowed keys are {sorted(known)}"
            )
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML/JSON friendly view (the inverse of :meth:`from_mapping`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["factorize_include"] = list(self.factorize_include)
        out["factorize_exclude"] = list(self.factorize_exclude)
        out["capacities"] = dict(self.capacities) if self.capacities else None
        return out


@dataclass(frozen=True)
class RunSettings:
    """FedML's usual training keys, validated once."""

    comm_round: int = 10
    client_num_in_total: int = 10
    client_num_per_round: int = 10
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_grad_norm: float = 5.0
    frequency_of_the_test: int = 1
    checkpoint_every: int = 1
    min_clients_per_round: int = 1
    round_timeout_s: float = 600.0
    start_timeout_s: float = 300.0
    lr_schedule: str = "constant"
    augment: str = "none"
    diagnostics: bool = False
    output_dir: str = "outputs"

    def __post_init__(self) -> None:
        positive_int = ("comm_round", "client_num_in_total", "client_num_per_round", "epochs", "batch_size",
                        "frequency_of_the_test", "checkpoint_every", "min_clients_per_round")
        for name in positive_int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: allowed an integer >= 1")
        for name in ("learning_rate", "round_timeout_s", "start_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r} is invalid: allowed a number > 0")
        for name in ("momentum", "weight_decay", "clip_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name}={value!r} is invalid: allowed a number >= 0")
        if not isinstance(self.diagnostics, bool):
            raise ValueError(f"diagnostics={self.diagnostics!r} is invalid: allowed true or false")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is invalid: allowed constant, cosine")
        if self.augment not in ("none", "flip_crop"):
            raise ValueError(f"augment={self.augment!r} is invalid: allowed none, flip_crop")
        if self.client_num_per_round > self.client_num_in_total:
            raise ValueError(
                f"client_num_per_round={self.client_num_per_round} is invalid: allowed at most "
                f"client_num_in_total={self.client_num_in_total}"
            )
        if self.min_clients_per_round > self.client_num_per_round:
            raise ValueError(
                f"min_clients_per_round={self.min_clients_per_round} is invalid: allowed at most "
                f"client_num_per_round={self.client_num_per_round}"
            )

    @classmethod
    def from_args(cls, args: Any, **override: Any) -> RunSettings:
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values.update(override)
        return cls(**values)
