"""Original-space channel groups, for the HeteroFL/FjORD (``origdrop``) and FedRolex baselines.

Slicing "the first ρ·C channels of every hidden layer, with matching input channels downstream" must
keep residual additions consistent: both operands of ``a + b`` have to keep the same channels. The
model is traced with ``torch.fx``; every Conv2d/Linear output opens a channel *group*, shape-preserving
operations (BN, activations, pooling, flatten) pass the group on, additions merge groups
(union-find). Groups reaching the model input or output keep every channel (raw image channels and
logits are never cut). A Linear after ``flatten`` sees each channel ``in_features / C`` times
(channel-major flatten), so its input columns are expanded accordingly.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_PASS_FUNCS = {
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, torch.sigmoid, torch.tanh,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout,
    torch.flatten, operator.mul, operator.truediv, torch.mul, F.hardswish, F.hardtanh,
}
_PASS_METHODS = {
    "relu", "relu_", "sigmoid", "tanh", "flatten", "view", "reshape", "contiguous", "mul", "div",
    "clone", "float", "to", "mean", "squeeze", "unsqueeze",
}
_NON_TENSOR_METHODS = {"size", "dim"}
_NORMS = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class ModuleSlice:
    """How one module is cut: ``out_group`` selects weight rows (and bias / BN vectors),
    ``in_group`` weight columns, each channel of which spans ``in_repeat`` columns."""

    out_group: int | None
    in_group: int | None
    in_repeat: int = 1


@dataclass
class ChannelPlan:
    """Channel groups of a model: their sizes, the ones never cut, and how each module is cut."""

    sizes: dict[int, int] = field(default_factory=dict)
    fixed: set[int] = field(default_factory=set)
    modules: dict[str, ModuleSlice] = field(default_factory=dict)

    def free_groups(self) -> list[int]:
        """Groups that are cut, in a stable order."""
        return sorted(g for g in self.sizes if g not in self.fixed)

    def slices(self, kept: dict[int, Tensor]) -> dict[str, tuple[Tensor | None, Tensor | None]]:
        """Per module ``(rows, cols)`` index tensors (``None`` = keep all) for ``kept[group]``."""
        out = {}
        for name, ms in self.modules.items():
            rows = kept.get(ms.out_group) if ms.out_group is not None else None
            cols = kept.get(ms.in_group) if ms.in_group is not None else None
            if cols is not None and ms.in_repeat > 1:
                cols = (cols[:, None] * ms.in_repeat + torch.arange(ms.in_repeat)).flatten()
            if rows is not None or cols is not None:
                out[name] = (rows, cols)
        return out


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        self.parent[max(ra, rb)] = min(ra, rb)
        return min(ra, rb)


def channel_plan(model: nn.Module) -> ChannelPlan:
    """Trace ``model`` and find its channel groups. Raises ``ValueError`` naming the first operation
    that channel slicing cannot follow (e.g. ``torch.cat`` or an unknown parametrized module)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - fx raises many kinds of errors
        raise ValueError(
            f"origdrop/rolex need a torch.fx-traceable model to find matching channels: {err}"
        ) from err
    tracer = _GroupTracer(dict(gm.named_modules()))
    for node in gm.graph.nodes:
        tracer.visit(node)
    return tracer.plan()


class _GroupTracer:
    """Walks a traced graph once, giving each node the channel group of its output (``None``: not a
    channel-carrying tensor) and recording, per sliced module, its raw ``(out, in, repeat)`` groups."""

    def __init__(self, mods: dict[str, nn.Module]) -> None:
        self.mods = mods
        self.uf = _UnionFind()
        self.size: dict[int, int] = {}
        self.fixed: set[int] = set()
        self.group: dict[fx.Node, int | None] = {}
        self.raw: dict[str, tuple[int | None, int | None, int]] = {}

    def arg_groups(self, node: fx.Node) -> list[int]:
        found = []
        for a in node.all_input_nodes:
            g = self.group.get(a)
            if g is not None:
                found.append(g)
        return found

    def first(self, node: fx.Node) -> int | None:
        a = node.args[0] if node.args else None
        return self.group.get(a) if isinstance(a, fx.Node) else None

    def opened(self, channels: int) -> int:
        g = self.uf.new()
        self.size[g] = channels
        return g

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            g = self.uf.new()
            self.fixed.add(g)
            self.group[node] = g
        elif node.op == "get_attr":
            self.group[node] = None
        elif node.op == "call_module":
            self.group[node] = self.visit_module(node, self.mods[node.target])
        elif node.op in ("call_function", "call_method"):
            self.group[node] = self.visit_function(node)
        elif node.op == "output":
            for g in self.arg_groups(node):
                self.fixed.add(g)

    def visit_module(self, node: fx.Node, m: nn.Module) -> int | None:
        gin = self.first(node)
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            self.raw[node.target] = (self.opened(m.out_channels), gin, 1)
            if gin is not None:
                self.size.setdefault(self.uf.find(gin), m.in_channels)
            return self.raw[node.target][0]
        if isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels:
            self.raw[node.target] = (gin, None, 1)  # depthwise: one filter per channel
            return gin
        if isinstance(m, nn.Linear):
            repeat = 1
            if gin is not None:
                channels = self.size.get(self.uf.find(gin))
                if channels and m.in_features % channels == 0:
                    repeat = m.in_features // channels
            self.raw[node.target] = (self.opened(m.out_features), gin, repeat)
            return self.raw[node.target][0]
        if isinstance(m, _NORMS):
            self.raw[node.target] = (gin, None, 1)
            return gin
        if not any(True for _ in m.parameters()) and not any(True for _ in m.buffers()):
            return gin
        raise ValueError(
            f"origdrop/rolex cannot slice module {node.target!r} of type "
            f"{type(m).__name__}: supported are Conv2d, Linear, BatchNorm and "
            "parameter-free modules"
        )

    def visit_function(self, node: fx.Node) -> int | None:
        target = node.target
        groups = self.arg_groups(node)
        if target in _ADD and len(groups) > 1:
            merged = groups[0]
            for g in groups[1:]:
                merged = self.uf.union(merged, g)
            return merged
        if target in _NON_TENSOR_METHODS or target is getattr:
            return None
        if target in _ADD or target in _PASS_FUNCS or target in _PASS_METHODS:
            return self.first(node)
        if not groups:
            return None
        name = getattr(target, "__name__", str(target))
        raise ValueError(
            f"origdrop/rolex cannot follow channels through {name!r} (node {node.name}): "
            "use a principal strategy, or exclude such models from channel baselines"
        )

    def plan(self) -> ChannelPlan:
        """Merge the groups joined by additions and turn the recorded modules into :class:`ModuleSlice`s."""
        uf = self.uf
        plan = ChannelPlan()
        roots_fixed = {uf.find(g) for g in self.fixed}
        for g, channels in self.size.items():
            root = uf.find(g)
            if plan.sizes.setdefault(root, channels) != channels:
                raise ValueError(f"residual addition joins layers of {plan.sizes[root]} and {channels} channels")
        plan.fixed = {g for g in plan.sizes if g in roots_fixed}
        for name, (gout, gin, repeat) in self.raw.items():
            rout = uf.find(gout) if gout is not None else None
            rin = uf.find(gin) if gin is not None else None
            plan.modules[name] = ModuleSlice(
                rout if rout not in roots_fixed else None,
                rin if rin not in roots_fixed else None,
                repeat,
            )
        return plan
