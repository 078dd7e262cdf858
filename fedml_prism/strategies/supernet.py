"""SuperFed's supernet (:mod:`fedml_prism.strategies.superfed` is the method): the space of sub-networks
of a ResNet (a depth per stage, a width per block), extracting a sub-network's leading channels, and the
weight-shared aggregation of sub-networks of different sizes.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.layers import convert_static_bn, set_submodule
from ..engine.sampling import keep_count
from ..engine.submodel import meta_skeleton, resized
from ..workloads.models import BasicBlock, ResNetCifar

#: random draws tried before a capped draw is narrowed to fit the budget
CAPPED_TRIES = 64


# ---------------------------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class Arch:
    """A sub-network: blocks kept per stage, and the width fraction of every kept block (per stage)."""

    depth: tuple[int, ...]
    width: tuple[tuple[float, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"depth": list(self.depth), "width": [list(w) for w in self.width]}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Arch:
        return cls(tuple(int(d) for d in value["depth"]), tuple(tuple(float(x) for x in w) for w in value["width"]))


@dataclass
class SubnetSpace:
    """The sub-networks of one supernet: allowed depths per stage, widths, and the parameter count
    of any choice (exact: every block's parameters are affine in its kept inner channels)."""

    stage_blocks: tuple[int, ...]
    depths: tuple[tuple[int, ...], ...]
    widths: tuple[float, ...]
    inner: tuple[tuple[int, ...], ...]  # inner channels of every block, per stage
    block_fixed: tuple[tuple[int, ...], ...]  # parameters of a block that do not depend on its width
    block_per_channel: tuple[tuple[int, ...], ...]  # parameters per kept inner channel
    outer_params: int  # stem, classifier and anything else outside the blocks
    budget: int | None = None  # at most this many parameters per sub-network (capped mode)
    _largest: Arch | None = field(default=None, repr=False)

    def keep(self, stage: int, block: int, width: float) -> int:
        return keep_count(width, self.inner[stage][block])

    def params(self, arch: Arch) -> int:
        total = self.outer_params
        for i, (d, ws) in enumerate(zip(arch.depth, arch.width, strict=True)):
            for j in range(d):
                total += self.block_fixed[i][j] + self.block_per_channel[i][j] * self.keep(i, j, ws[j])
        return total

    def fits(self, arch: Arch) -> bool:
        return self.budget is None or self.params(arch) <= self.budget

    def uniform(self, depth: Sequence[int], width: float) -> Arch:
        return Arch(tuple(depth), tuple((width,) * d for d in depth))

    def smallest(self) -> Arch:
        return self.uniform([d[0] for d in self.depths], self.widths[0])

    def middle(self) -> Arch:
        arch = self.uniform([d[(len(d) - 1) // 2] for d in self.depths], self.widths[(len(self.widths) - 1) // 2])
        return self.shrink_to_fit(arch)

    def largest(self) -> Arch:
        """Max depth and width uncapped; capped, the largest fitting sub-network found by the search
        in the module docstring (deterministic)."""
        if self._largest is None:
            self._largest = self._search_largest()
        return self._largest

    def _search_largest(self) -> Arch:
        top = self.uniform([d[-1] for d in self.depths], self.widths[-1])
        if self.fits(top):
            return top
        best, best_params = self.smallest(), self.params(self.smallest())
        for depth in itertools.product(*self.depths):
            for w in self.widths:
                arch = self.uniform(depth, w)
                p = self.params(arch)
                if self.fits(arch) and (p, depth) > (best_params, best.depth):
                    best, best_params = arch, p
        while True:  # widen one block at a time, the largest step that still fits first
            steps = []
            for i, ws in enumerate(best.width):
                for j, w in enumerate(ws):
                    k = self.widths.index(w)
                    if k + 1 < len(self.widths):
                        cand = _with_width(best, i, j, self.widths[k + 1])
                        if self.fits(cand):
                            steps.append((self.params(cand), -i, -j, cand))
            if not steps:
                return best
            best = max(steps, key=lambda s: s[:3])[3]

    def random(self, generator: torch.Generator) -> Arch:
        """Depth per stage and width per kept block uniformly at random; capped, redrawn until it
        fits (``CAPPED_TRIES``), then narrowed until it does."""
        arch = self._draw(generator)
        for _ in range(CAPPED_TRIES - 1):
            if self.fits(arch):
                return arch
            arch = self._draw(generator)
        return self.shrink_to_fit(arch)

    def _draw(self, g: torch.Generator) -> Arch:
        depth, width = [], []
        for allowed in self.depths:
            d = allowed[int(torch.randint(len(allowed), (1,), generator=g))]
            depth.append(d)
            width.append(tuple(self.widths[int(i)] for i in torch.randint(len(self.widths), (d,), generator=g)))
        return Arch(tuple(depth), tuple(width))

    def shrink_to_fit(self, arch: Arch) -> Arch:
        """Narrow the block whose narrowing saves most parameters, then (all blocks at the smallest
        width) drop the last block of the deepest stage, until ``arch`` fits the budget."""
        while not self.fits(arch):
            steps = []
            for i, ws in enumerate(arch.width):
                for j, w in enumerate(ws):
                    k = self.widths.index(w)
                    if k > 0:
                        cand = _with_width(arch, i, j, self.widths[k - 1])
                        steps.append((self.params(arch) - self.params(cand), -i, -j, cand))
            if steps:
                arch = max(steps, key=lambda s: s[:3])[3]
                continue
            deeper = [(arch.depth[i], i) for i in range(len(arch.depth)) if arch.depth[i] > self.depths[i][0]]
            if not deeper:
                raise RuntimeError("the smallest sub-network exceeds the budget")  # checked in build_space
            _, i = max(deeper)
            d = max(x for x in self.depths[i] if x < arch.depth[i])
            depth = list(arch.depth)
            depth[i] = d
            width = list(arch.width)
            width[i] = arch.width[i][:d]
            arch = Arch(tuple(depth), tuple(width))
        return arch

    def grid(self) -> list[tuple[str, Arch]]:
        """The sub-networks evaluated at the end: smallest, middle, largest (always, even where two
        coincide under a cap), then every width with the largest's depths that fits and is not
        already listed."""
        out = [("smallest", self.smallest()), ("middle", self.middle()), ("largest", self.largest())]
        seen = {arch for _, arch in out}
        for w in self.widths:
            arch = self.uniform(self.largest().depth, w)
            if self.fits(arch) and arch not in seen:
                seen.add(arch)
                out.append((f"width={w:g}", arch))
        return out


def _with_width(arch: Arch, stage: int, block: int, width: float) -> Arch:
    ws = list(arch.width)
    row = list(ws[stage])
    row[block] = width
    ws[stage] = tuple(row)
    return Arch(arch.depth, tuple(ws))


def check_model(model: nn.Module) -> None:
    """SuperFed's elastic depth/width here needs the built-in ResNet family."""
    if not isinstance(model, ResNetCifar):
        raise ValueError(
            f"model={type(model).__name__} is invalid for strategy=superfed: allowed the ResNet family "
            "(resnet18_cifar, resnet_tiny, ResNetCifar with BasicBlock stages)"
        )
    for i, stage in enumerate(model.layers):
        for j, block in enumerate(stage):
            if not isinstance(block, BasicBlock):
                raise ValueError(f"model block layers.{i}.{j} is a {type(block).__name__}: superfed needs BasicBlock stages")
            if j > 0 and len(block.shortcut) > 0:
                raise ValueError(f"model block layers.{i}.{j} changes shape: only the first block of a stage may")


# ---------------------------------------------------------------------------------------------- sub-networks
def prepare_supernet(model: nn.Module, bn: str = "static") -> nn.Module:
    """A copy of ``model`` as the supernet: BatchNorm static (batch statistics) or removed."""
    check_model(model)
    supernet = copy.deepcopy(model)
    if bn == "static":
        return convert_static_bn(supernet)
    for name, module in list(supernet.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            set_submodule(supernet, name, nn.Identity())
    return supernet


def subnet_skeleton(skeleton: nn.Module, arch: Arch) -> nn.Module:
    """The sub-network's structure on the meta device: the first ``d`` blocks of every stage, each
    with its kept inner channels."""
    module = copy.deepcopy(skeleton)
    if len(arch.depth) != len(module.layers):
        raise ValueError(f"arch has {len(arch.depth)} stages, the supernet {len(module.layers)}")
    for i, (d, ws) in enumerate(zip(arch.depth, arch.width, strict=True)):
        stage = module.layers[i]
        if not 1 <= d <= len(stage) or len(ws) != d:
            raise ValueError(f"arch stage {i}: depth {d} with {len(ws)} widths does not fit {len(stage)} blocks")
        module.layers[i] = stage[:d]
        for j, w in enumerate(ws):
            block = module.layers[i][j]
            k = keep_count(w, block.conv1.out_channels)
            block.conv1 = resized(block.conv1, k, None)
            if isinstance(block.bn1, nn.modules.batchnorm._BatchNorm):
                block.bn1 = resized(block.bn1, k, None)
            block.conv2 = resized(block.conv2, None, k)
    return module


def leading(shape: Sequence[int]) -> tuple[slice, ...]:
    """The index of a nested element block: the first ``n`` entries along every dimension."""
    return tuple(slice(0, n) for n in shape)


def extract_subnet(supernet: nn.Module, arch: Arch, skeleton: nn.Module | None = None,
                   device: torch.device | str = "cpu") -> nn.Module:
    """A physically smaller copy of the supernet's sub-network ``arch`` (its own tensors)."""
    module = subnet_skeleton(skeleton if skeleton is not None else meta_skeleton(supernet), arch).to_empty(device=device)
    full = supernet.state_dict()
    module.load_state_dict({k: full[k][leading(v.shape)] for k, v in module.state_dict().items()})
    return module


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def aggregate_shared(state: Mapping[str, Tensor], updates: Sequence[Mapping[str, Tensor]],
                     weights: Sequence[float]) -> OrderedDict[str, Tensor]:
    """Weight-shared aggregation: every element of ``state`` becomes the ``weights``-weighted mean of
    the updates holding it (an update holds the leading block ``[:n0, :n1, …]`` of its shape of every
    entry it has); elements no update holds are returned bit for bit. Sums run in float64; integer
    entries are rounded."""
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    if any(not (w > 0 and math.isfinite(w)) for w in weights):
        raise ValueError(f"weights={list(weights)} is invalid: allowed finite numbers > 0")
    for u in updates:
        unknown = sorted(set(u) - set(state))
        if unknown:
            raise ValueError(f"update entries {unknown[:5]} are not in the supernet")
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, old in state.items():
        acc = torch.zeros(old.shape, dtype=torch.float64)
        cnt = torch.zeros(old.shape, dtype=torch.float64)
        for u, w in zip(updates, weights, strict=True):
            value = u.get(key)
            if value is None:
                continue
            if value.dim() != old.dim() or any(n > m for n, m in zip(value.shape, old.shape, strict=True)):
                raise ValueError(f"update entry {key!r} of shape {tuple(value.shape)} is not a leading block of "
                                 f"{tuple(old.shape)}")
            region = leading(value.shape)
            acc[region] += value.detach().cpu().to(torch.float64) * w
            cnt[region] += w
        mean = acc / cnt.clamp_min(1e-300)
        if not old.is_floating_point():
            mean = mean.round()
        out[key] = torch.where(cnt > 0, mean.to(old.dtype), old.detach().cpu())
    return out
