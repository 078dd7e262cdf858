"""Which layers become principal kernels, and their SVD (``W̄ = U diag(σ) Vᵀ``).

Two rules (``PrismConfig.rule``), each a set of parts that the ``skip_*`` flags switch off:

========================  ==========================================  ================================
part (flag)               ``default``                                 ``paper``
========================  ==========================================  ================================
candidates                Conv2d (groups 1), Linear and subclasses    Conv2d (groups 1), plain
                          with Linear's forward (attention            ``nn.Linear``
                          projections after ``convert_attention``)
``skip_first_conv``       every layer fed by the raw model input      the first Conv2d
``skip_1x1``              residual shortcut / downsample convs        every 1×1 conv
``skip_classifier``       the last Linear                             the last Linear
``skip_no_saving``        layers whose principal form at the largest keep ratio would not be smaller
========================  ==========================================  ================================

``factorize_include`` / ``factorize_exclude`` patterns (fnmatch on the module name, or a type name such
as ``Linear``) override both rules. Shortcut convs and the raw-input layers are found by tracing the
model with ``torch.fx`` (a conv whose output is added to a branch that starts from the conv's own input
is a shortcut); a model fx cannot trace falls back to names (``shortcut`` / ``downsample``) and to the
first leaf module with parameters. :func:`savings_report` says how much a sub-model keeps and which layers
stay dense and why; :func:`little_saving_warning` turns that into the warning ``costs`` and ``run``
print.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import Tensor, fx, nn

from .attention import PrismMultiheadAttention, convert_attention
from .config import PrismConfig
from .layers import PrincipalLayer
from .sampling import keep_count

log = logging.getLogger(__name__)

#: binary operations that join two branches (a layer behind them is not "the" producer of the result)
_JOIN = {
    operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, operator.truediv, operator.matmul,
    torch.add, torch.sub, torch.mul, torch.cat, torch.stack, torch.matmul, torch.bmm,
    "add", "add_", "sub", "mul", "mul_", "div", "matmul", "bmm",
}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_SHORTCUT_NAMES = ("shortcut", "downsample")


def _matches(name: str, module: nn.Module, patterns: tuple[str, ...]) -> str | None:
    return next((p for p in patterns if fnmatchcase(name, p) or type(module).__name__ == p), None)


def _is_linear(module: nn.Module, rule: str) -> bool:
    """A Linear the rule factorizes: ``paper`` plain ``nn.Linear``; ``default`` also subclasses that keep
    Linear's forward (e.g. ``out_proj``'s ``NonDynamicallyQuantizableLinear``)."""
    if rule == "paper":
        return type(module) is nn.Linear
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _inside_torch_attention(model: nn.Module) -> set[str]:
    """Submodules of ``nn.MultiheadAttention`` (it applies their weights functionally, so they cannot be
    swapped for principal layers; :func:`~fedml_prism.engine.attention.convert_attention` makes them modules)."""
    return {
        f"{name}.{sub}" if name else sub
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for sub, _ in m.named_modules()
        if sub
    }


def _candidates(model: nn.Module, rule: str) -> list[tuple[str, nn.Module]]:
    hidden = _inside_torch_attention(model)
    return [
        (name, m)
        for name, m in model.named_modules()
        if name not in hidden and ((isinstance(m, nn.Conv2d) and m.groups == 1) or _is_linear(m, rule))
    ]


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(N, M·k·k)`` of the im2col view of a Conv2d / Linear weight."""
    w = module.weight
    return w.shape[0], math.prod(w.shape[1:])


@dataclass(frozen=True)
class _Graph:
    """What tracing found: the layers fed by the raw input, and residual shortcut convs."""

    traced: bool
    raw_input: frozenset[str] = frozenset()
    shortcuts: frozenset[str] = frozenset()


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            qualname in self.leaves
            or isinstance(m, (PrismMultiheadAttention, PrincipalLayer))
            or super().is_leaf_module(m, qualname)
        )


def _transparent(module: nn.Module) -> bool:
    """Modules a branch passes through without a weight matrix: norms and parameter-free modules."""
    return isinstance(module, _NORMS) or next(module.parameters(), None) is None


def _producer(node: fx.Node, modules: dict[str, nn.Module], layers: set[str]) -> fx.Node:
    """Walk up from ``node`` through transparent operations; the node where the walk stops (a layer,
    a join of two branches, the input, another module with weights)."""
    while True:
        if node.op == "call_module":
            if node.target in layers or not _transparent(modules[node.target]):
                return node
        elif node.op not in ("call_function", "call_method"):
            return node
        elif node.target in _JOIN and sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2:
            return node
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node):
            return node
        node = first


def _ancestors(node: fx.Node, cache: dict[fx.Node, set[fx.Node]]) -> set[fx.Node]:
    """``node`` and every node it depends on."""
    if node not in cache:
        seen, stack = {node}, [node]
        while stack:
            for a in stack.pop().all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    stack.append(a)
        cache[node] = seen
    return cache[node]


def _graph_roles(model: nn.Module, layers: set[str]) -> _Graph:
    """Trace ``model`` and find the layers fed by the raw input and the residual shortcut convs.

    A conv ``S`` is a shortcut of ``a + b`` when ``S`` produces ``a``, ``S``'s own input (the fork) also
    feeds ``b``, and ``b`` is not itself one layer from the same fork (two parallel layers are branches,
    not a shortcut and a main path)."""
    try:
        graph = _Tracer(layers).trace(model)
    except Exception:  # noqa: BLE001 - fx raises many kinds of errors on data-dependent control flow
        return _Graph(traced=False)
    modules = dict(model.named_modules())
    nodes = {n.target: n for n in graph.nodes if n.op == "call_module" and n.target in layers}
    raw = set()
    fork: dict[fx.Node, fx.Node] = {}
    for name, node in nodes.items():
        if node.args and isinstance(node.args[0], fx.Node):
            fork[node] = _producer(node.args[0], modules, layers)
            if fork[node].op == "placeholder":
                raw.add(name)
    cache: dict[fx.Node, set[fx.Node]] = {}
    shortcuts = set()
    for node in graph.nodes:
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if node.op not in ("call_function", "call_method") or node.target not in _ADD or len(operands) != 2:
            continue
        ends = [_producer(a, modules, layers) for a in operands]
        for this, other, end, other_end in ((*operands, *ends), (*reversed(operands), *reversed(ends))):
            if end not in fork or not isinstance(modules[end.target], nn.Conv2d):
                continue
            if end in _ancestors(other, cache) or fork[end] not in _ancestors(other, cache):
                continue
            if other_end in fork and fork[other_end] is fork[end] and other_end not in _ancestors(this, cache):
                continue
            shortcuts.add(end.target)
    return _Graph(True, frozenset(raw), frozenset(shortcuts))


def _first_weighted(model: nn.Module) -> str | None:
    """The first leaf module (registration order) that owns parameters: the first layer when fx cannot
    trace the model."""
    return next(
        (n for n, m in model.named_modules()
         if next(m.children(), None) is None and next(m.parameters(recurse=False), None) is not None),
        None,
    )


def classify_layers(model: nn.Module, config: PrismConfig) -> dict[str, str | None]:
    """Every candidate layer of ``model`` (module order) → ``None`` if it is put in principal form,
    else why it stays dense (naming the flag or pattern that decides)."""
    rule = config.rule
    candidates = _candidates(model, rule)
    first_conv = next((n for n, m in candidates if isinstance(m, nn.Conv2d)), None)
    last_linear = next((n for n, m in reversed(candidates) if isinstance(m, nn.Linear)), None)
    graph = _Graph(traced=False)
    if rule == "default" and (config.skip_first_conv or config.skip_1x1):
        graph = _graph_roles(model, {n for n, _ in candidates})
    first_weighted = _first_weighted(model)
    out: dict[str, str | None] = {}
    for name, m in candidates:
        out[name] = _reason(name, m, config, first_conv, last_linear, graph, first_weighted)
    return out


def _reason(
    name: str, m: nn.Module, config: PrismConfig, first_conv: str | None, last_linear: str | None,
    graph: _Graph, first_weighted: str | None,
) -> str | None:
    if (pattern := _matches(name, m, config.factorize_exclude)) is not None:
        return f"factorize_exclude pattern {pattern!r}"
    if _matches(name, m, config.factorize_include) is not None:
        return None
    n, mkk = matrix_shape(m)
    is_1x1 = isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)
    if config.rule == "paper":
        if config.skip_first_conv and name == first_conv:
            return "first conv (skip_first_conv, rule paper)"
        if config.skip_1x1 and is_1x1:
            return "1×1 conv (skip_1x1, rule paper)"
    else:
        raw = name in graph.raw_input if graph.traced else name == first_weighted
        if config.skip_first_conv and raw:
            return "first layer on raw input (skip_first_conv)"
        shortcut = name in graph.shortcuts if graph.traced else any(p in _SHORTCUT_NAMES for p in name.split("."))
        if config.skip_1x1 and isinstance(m, nn.Conv2d) and shortcut:
            return "residual shortcut / downsample conv (skip_1x1)"
    if config.skip_classifier and name == last_linear:
        return "classifier, the last Linear (skip_classifier)"
    if min(n, mkk) < 2:
        return "rank 1: nothing to factorize"
    if config.skip_no_saving:
        kept = keep_count(config.max_keep_ratio, min(n, mkk))
        if kept * (n + mkk) >= n * mkk:
            return f"no saving at keep {config.max_keep_ratio:g} (skip_no_saving)"
    return None


def factorizable_layers(model: nn.Module, config: PrismConfig) -> list[str]:
    """Names of the layers to put in principal form, in module order (see :func:`classify_layers`)."""
    return [name for name, reason in classify_layers(model, config).items() if reason is None]


# ---------------------------------------------------------------------------- how much a sub-model keeps
@dataclass(frozen=True)
class DenseLayer:
    """A module whose parameters a sub-model carries in full, and why."""

    name: str
    kind: str
    params: int
    reason: str


@dataclass
class SavingsReport:
    """Parameters of a sub-model at ``keep_ratio`` next to the dense model's, counted from the layer
    shapes (the principal form of an N × M·k·k weight keeping r' components holds r'·(N + M·k·k))."""

    keep_ratio: float
    params: int
    dense_params: int
    factorized: list[str] = field(default_factory=list)
    dense_layers: list[DenseLayer] = field(default_factory=list)

    @property
    def share(self) -> float:
        """Sub-model parameters / dense parameters."""
        return self.params / self.dense_params if self.dense_params else 1.0

    def format(self, top: int = 8) -> str:
        """One paragraph: the share, then the largest dense layers with their reasons."""
        total = self.dense_params or 1
        big = sorted(self.dense_layers, key=lambda d: -d.params)
        lines = [
            f"a sub-model at keep {self.keep_ratio:g} holds {self.share:.1%} of the dense parameters "
            f"({self.params:,} of {self.dense_params:,}); {len(self.factorized)} layers are factorized, "
            f"{len(big)} modules stay dense, the largest:"
        ]
        lines += [f"  {d.name or '<model>'} ({d.kind}, {d.params:,} params, {d.params / total:.1%}): {d.reason}"
                  for d in big[:top]]
        if len(big) > top:
            rest = sum(d.params for d in big[top:])
            lines.append(f"  … and {len(big) - top} more ({rest / total:.1%})")
        return "\n".join(lines)


def _dense_reason(name: str, module: nn.Module, hidden: set[str], own: list[str]) -> str:
    """Why a module with parameters (``own``: their names) that is no candidate layer stays dense."""
    if isinstance(module, nn.Conv2d):
        kind = "depthwise" if module.groups == module.in_channels == module.out_channels else "grouped"
        return f"{kind} conv (groups={module.groups}): only groups=1 convs are factorized"
    if isinstance(module, nn.MultiheadAttention):
        return "nn.MultiheadAttention not converted (fedml_prism.engine.attention.convert_attention)"
    if name in hidden:
        return "projection of an unconverted nn.MultiheadAttention"
    if isinstance(module, nn.Linear):
        return f"{type(module).__name__} (a Linear subclass this rule does not factorize)"
    if isinstance(module, _NORMS):
        return "normalization (always dense)"
    if isinstance(module, PrismMultiheadAttention) or next(module.children(), None) is not None:
        return f"tensors the module holds itself ({', '.join(own)}): always dense"
    return f"unsupported type {type(module).__name__}"


def savings_report(model: nn.Module, config: PrismConfig, keep_ratio: float | None = None) -> SavingsReport:
    """How many parameters a principal sub-model at ``keep_ratio`` (default: the smallest keep ratio in
    ``config``) holds, and every module that stays dense with the reason. ``model`` is prepared as
    ``PrincipalModel`` prepares it (``nn.MultiheadAttention`` converted, on a copy); it may live on the
    ``meta`` device."""
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        model = convert_attention(copy.deepcopy(model))
    rho = keep_ratio if keep_ratio is not None else (min(config.capacities) if config.capacities else config.keep_ratio)
    reasons = classify_layers(model, config)
    hidden = _inside_torch_attention(model)
    factorized = [n for n, r in reasons.items() if r is None]
    report = SavingsReport(rho, 0, 0, factorized)
    chosen = set(factorized)
    for name, module in model.named_modules():
        own = {k: p.numel() for k, p in module.named_parameters(recurse=False)}
        count = sum(own.values())
        report.dense_params += count
        if name in chosen:
            n, mkk = matrix_shape(module)
            count += keep_count(rho, min(n, mkk)) * (n + mkk) - own["weight"]
        elif count:
            reason = reasons.get(name) or _dense_reason(name, module, hidden, list(own))
            report.dense_layers.append(DenseLayer(name, type(module).__name__, count, reason))
        report.params += count
    return report


#: ``costs`` and ``run`` warn when a sub-model at a keep ratio up to this holds more than
#: :data:`WARN_SHARE` of the dense parameters
WARN_KEEP = 0.3
WARN_SHARE = 0.5


def little_saving_warning(model: nn.Module, config: PrismConfig) -> str | None:
    """The warning for a principal strategy whose sub-models at keep ≤ 0.3 would hold more than half of
    the dense parameters (naming the layers that stay dense and why), or ``None``."""
    if not config.principal:
        return None
    report = savings_report(model, config)
    if report.keep_ratio > WARN_KEEP or report.share <= WARN_SHARE:
        return None
    hint = "rule: default also factorizes 1×1 convs and attention projections; " if config.rule == "paper" else ""
    return (
        f"strategy {config.strategy} with rule {config.rule}: {report.format()}\n"
        f"  ({hint}factorize_include forces a layer into principal form, skip_* flags switch parts of the rule off)"
    )


@dataclass
class Factors:
    """Principal form of one layer: ``u`` (N×r), ``sigma`` (r), ``v`` (r × M × k × k)."""

    u: Tensor
    sigma: Tensor
    v: Tensor

    def dense(self) -> Tensor:
        """``U diag(σ) Vᵀ`` in the original weight shape."""
        w = (self.u * self.sigma) @ self.v.flatten(1)
        return w.view(self.u.shape[0], *self.v.shape[1:])

    def clone(self) -> Factors:
        return Factors(self.u.clone(), self.sigma.clone(), self.v.clone())


def svd_factors(weight: Tensor, dtype: str = "float32", name: str = "") -> Factors:
    """Decompose a dense weight; float32 first (or float64), float64 on failure.

    Raises ``ValueError`` if the weight is not finite or no precision converges, so the caller can
    decide to keep the previous factors.
    """
    if not torch.isfinite(weight).all():
        raise ValueError(f"layer {name!r}: weight has non-finite entries, cannot decompose")
    mat = weight.detach().reshape(weight.shape[0], -1)
    tries = ["float32", "float64"] if dtype == "float32" else ["float64"]
    last_error: Exception | None = None
    for attempt in tries:
        try:
            u, s, vh = torch.linalg.svd(mat.to(getattr(torch, attempt)), full_matrices=False)
        except (RuntimeError, torch.linalg.LinAlgError) as err:  # pragma: no branch - logged below
            last_error = err
            log.warning("layer %r: SVD in %s failed (%s); retrying", name, attempt, err)
            continue
        if not (torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(vh).all()):
            last_error = RuntimeError("non-finite SVD result")
            log.warning("layer %r: SVD in %s gave non-finite factors; retrying", name, attempt)
            continue
        out = weight.dtype
        return Factors(u.to(out).contiguous(), s.to(out), vh.to(out).view(-1, *weight.shape[1:]).contiguous())
    raise ValueError(f"layer {name!r}: SVD failed in every precision: {last_error}")
