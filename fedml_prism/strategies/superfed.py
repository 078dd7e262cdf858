"""SuperFed / SuperFedNAS (Khare et al., "SuperFed: Weight Shared Federated Learning", 2023; code:
gatech-sysml/superfednas): a weight-shared supernet trained federatedly, so that a whole family of
sub-networks is co-trained at the cost of one model.

What is implemented here, on the built-in ResNet family (:class:`~fedml_prism.workloads.models.ResNetCifar`
with :class:`~fedml_prism.workloads.models.BasicBlock` stages: ``resnet18_cifar``, ``resnet_tiny``):

- **Elastic depth and width.** A sub-network keeps the first ``d`` blocks of every stage (``d`` from
  ``depths``; the first block of a stage, which changes resolution and channels, is always kept) and,
  in every kept block, the first ``ceil(w·C)`` inner channels (the output of ``conv1`` / input of
  ``conv2``; ``w`` from ``widths``, per block: OFA's "expand ratio"). The residual stream, stem and
  classifier stay whole (the authors' ResNet space samples depth and expand ratio only). Sub-networks
  are physically smaller modules, every tensor a leading slice ``[:n0, :n1, …]`` of the supernet's.
- **Tracking sandwich** (``subnet_dist_type TS_all_random``). Each round, of the selected clients
  (:func:`~fedml_prism.engine.server.select_clients`, the same as PriSM's), the one that has trained
  the largest sub-network least often trains it, the remaining one that has trained the smallest
  least often trains the smallest, the others train random sub-networks drawn from
  ``(seed, round, client)``. Ties go to the lowest client id (the authors' set order).
- **Weight-shared aggregation** (their ``_aggregate`` / ``add_subnet``): every element of the
  supernet becomes ``Σ_k β_k θ_k / Σ_k β_k`` over the clients ``k`` whose sub-network holds it;
  elements no client held keep their value bit for bit (:func:`aggregate_shared`).
- **β schedule** (their ``maxnet_cos_all_subnet``): the largest sub-network's client weighs
  ``β_t = β_0·((1-α)·½(1+cos(π·min(t,T)/T)) + α)`` with ``α = β_T/β_0``; every other client
  ``(1-β_t)/(K-1)``. Their runs use ``β_0 = 0.9``, ``β_T = 0.125 = 1/K`` (K = 8 clients per round:
  uniform at the end) and ``T ≈ 0.8 × rounds`` (1200 of 1500); these are the defaults here
  (``beta_final`` None = ``1/K``, ``beta_rounds`` None = ``round(0.8 × comm_round)``).
  ``beta_schedule: uniform`` weighs every client 1.

Two modes (option ``cap``): uncapped, as published (one client trains the full supernet each round,
:data:`~fedml_prism.strategies.base.TRAINS_FULL_MODEL`), and capped at ``max_params_ratio`` of the
dense model's parameters, like PriSM's client budget: every sampled sub-network, the "largest"
included, fits the budget (:data:`~fedml_prism.strategies.base.WEIGHTS_ONLY`). Capped, the largest
sub-network is the one with most parameters among the fitting ones with one width for all blocks,
then widened block by block while it fits; a random draw that does not fit is redrawn (64 tries),
then narrowed step by step until it does.

Departures from the authors' code, all documented choices: BatchNorm is static (batch statistics, as
PriSM's default ``static_bn``) or, with ``bn: none``, removed (the authors' default without
``--use_bn`` freezes BN at weight 1, bias 0, mean 0, var 1: the identity up to ``1/sqrt(1+eps)``);
clients weigh equally whatever their sample counts (their default, no ``--weight_dataset``); no
knowledge distillation and no FedDyn term; SGD momentum restarts every round.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import math
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ..engine.costs import layer_costs
from ..engine.layers import convert_static_bn, set_submodule
from ..engine.sampling import keep_count, make_generator
from ..engine.server import FlipCrop, RunSettings, select_clients
from ..engine.submodel import meta_skeleton, resized
from ..engine.train import evaluate, local_train
from ..workloads.data import FederatedData
from ..workloads.models import BasicBlock, ResNetCifar
from . import base

log = logging.getLogger("fedml_prism")

SETTING = base.TRAINS_FULL_MODEL
NAME = "superfed"
BETA_SCHEDULES = ("cosine", "uniform")
BN_MODES = ("static", "none")
#: random draws tried before a capped draw is narrowed to fit the budget
CAPPED_TRIES = 64
EVAL_BATCH = 256


# ---------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Options:
    """``method_args`` of ``superfed`` (see the module docstring)."""

    depths: Sequence[int] | None = None
    widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0)
    cap: bool = False
    max_params_ratio: float = 0.2
    beta_schedule: str = "cosine"
    beta_init: float = 0.9
    beta_final: float | None = None
    beta_rounds: int | None = None
    bn: str = "static"
    measure_memory: bool = True
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.depths is not None:
            depths = _number_list("depths", self.depths, integer=True)
            if not all(_is_int(d) and d >= 1 for d in depths):
                raise ValueError(f"depths={self.depths!r} is invalid: allowed a non-empty list of distinct integers >= 1")
            object.__setattr__(self, "depths", tuple(sorted(depths)))
        widths = _number_list("widths", self.widths, integer=False)
        if not all(_is_number(w) and 0 < w <= 1 for w in widths):
            raise ValueError(f"widths={self.widths!r} is invalid: allowed a non-empty list of distinct numbers in (0, 1]")
        object.__setattr__(self, "widths", tuple(sorted(float(w) for w in widths)))
        for name in ("cap", "measure_memory"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: allowed true or false")
        base.check_range("max_params_ratio", self.max_params_ratio, 0, 1, low_open=True)
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule={self.beta_schedule!r} is invalid: allowed {', '.join(BETA_SCHEDULES)}")
        base.check_range("beta_init", self.beta_init, 0, 1, low_open=True)
        if self.beta_final is not None:
            base.check_range("beta_final", self.beta_final, 0, 1, low_open=True)
        if self.beta_rounds is not None and not (_is_int(self.beta_rounds) and self.beta_rounds >= 1):
            raise ValueError(f"beta_rounds={self.beta_rounds!r} is invalid: allowed an integer >= 1, or null "
                             "(0.8 x comm_round)")
        if self.bn not in BN_MODES:
            raise ValueError(f"bn={self.bn!r} is invalid: allowed {', '.join(BN_MODES)}")
        try:
            ok = isinstance(self.device, str) and torch.device(self.device).type in ("cpu", "cuda")
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"device={self.device!r} is invalid: allowed cpu, cuda or cuda:<index>")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["depths"] = list(self.depths) if self.depths is not None else None
        out["widths"] = list(self.widths)
        return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number_list(name: str, value: Any, *, integer: bool) -> list[Any]:
    """A non-empty list of distinct numbers (ValueError naming ``name`` otherwise)."""
    kind = "integers" if integer else "numbers"
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{name}={value!r} is invalid: allowed a non-empty list of distinct {kind}")
    items = list(value)
    try:
        distinct = len(set(items)) == len(items)
    except TypeError:  # unhashable entries
        distinct = False
    if not items or not distinct:
        raise ValueError(f"{name}={value!r} is invalid: allowed a non-empty list of distinct {kind}")
    return items


def setting(options: Options) -> str:
    """The bench's "setting" column: uncapped, one client trains the full supernet every round."""
    return base.WEIGHTS_ONLY if options.cap else base.TRAINS_FULL_MODEL


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


def build_space(model: nn.Module, options: Options, dense_params: int | None = None) -> SubnetSpace:
    """The sub-network space of a (prepared) supernet under ``options``; ``ValueError`` when the
    depths fit no stage or, capped, when even the smallest sub-network exceeds the budget."""
    check_model(model)
    stage_blocks = tuple(len(stage) for stage in model.layers)
    depths = []
    for n in stage_blocks:
        allowed = tuple(range(1, n + 1)) if options.depths is None else tuple(d for d in options.depths if d <= n)
        if not allowed:
            raise ValueError(f"depths={list(options.depths or [])} is invalid for this model: its stages have "
                             f"{list(stage_blocks)} blocks")
        depths.append(allowed)
    inner, fixed, per_channel = [], [], []
    block_total = 0
    for stage in model.layers:
        inner.append(tuple(b.conv1.out_channels for b in stage))
        f_row, c_row = [], []
        for b in stage:
            total = sum(p.numel() for p in b.parameters())
            widths = [b.conv1.weight[:1].numel(), b.conv2.weight[:, :1].numel()]
            if b.conv1.bias is not None:
                widths.append(1)
            widths += [p[:1].numel() for p in b.bn1.parameters()]
            c = sum(widths)
            f_row.append(total - c * b.conv1.out_channels)
            c_row.append(c)
            block_total += total
        fixed.append(tuple(f_row))
        per_channel.append(tuple(c_row))
    outer = sum(p.numel() for p in model.parameters()) - block_total
    dense = dense_params if dense_params is not None else sum(p.numel() for p in model.parameters())
    budget = math.floor(options.max_params_ratio * dense + 1e-9) if options.cap else None
    space = SubnetSpace(stage_blocks, tuple(depths), tuple(options.widths), tuple(inner), tuple(fixed),
                        tuple(per_channel), outer, budget)
    if not space.fits(space.smallest()):
        raise ValueError(
            f"max_params_ratio={options.max_params_ratio} is invalid for this model: the smallest sub-network has "
            f"{space.params(space.smallest()) / dense:.3f} of the dense parameters (add a smaller width or depth)"
        )
    return space


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


# ---------------------------------------------------------------------------------------------- rounds
def tracking_sandwich(clients: Sequence[int], counts: Mapping[int, Sequence[int]], round_idx: int, seed: int,
                      space: SubnetSpace) -> tuple[list[tuple[int, Arch, str]], dict[int, list[int]]]:
    """This round's ``(client, arch, role)`` (role largest / smallest / random, clients in the given
    order) and the updated ``{client: [times largest, times smallest]}``. The largest goes to the
    client that trained it least often, the smallest to the remaining one that trained it least
    often (ties: lowest id); the rest draw from ``(seed, round, client)``."""
    new = {c: list(v) for c, v in counts.items()}
    for c in clients:
        new.setdefault(c, [0, 0])
    largest, smallest = space.largest(), space.smallest()
    big = min(clients, key=lambda c: (new[c][0], c))
    rest = [c for c in clients if c != big]
    small = min(rest, key=lambda c: (new[c][1], c)) if rest else None
    out = []
    for c in clients:
        if c == big:
            arch, role = largest, "largest"
        elif c == small:
            arch, role = smallest, "smallest"
        else:
            arch, role = space.random(make_generator(seed, "superfed-arch", round_idx, c)), "random"
        if arch == largest:
            new[c][0] += 1
        elif arch == smallest:
            new[c][1] += 1
        out.append((c, arch, role))
    return out, new


def beta_at(round_idx: int, *, init: float, final: float, rounds: int) -> float:
    """The largest sub-network's weight in round ``round_idx`` (0-based): cosine from ``init`` to
    ``final`` over ``rounds`` rounds, then ``final`` (the authors' ``maxnet_cos_all_subnet``)."""
    t = min(round_idx, rounds)
    alpha = final / init
    return init * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * t / rounds)) + alpha)


def round_weights(roles: Sequence[str], beta: float | None) -> list[float]:
    """Aggregation weight of every client: ``β`` for the largest sub-network, ``(1-β)/(K-1)`` for
    each other; all 1 when ``beta`` is None (uniform) or when one client plays."""
    if beta is None or len(roles) == 1:
        return [1.0] * len(roles)
    other = (1 - beta) / (len(roles) - 1)
    return [beta if r == "largest" else other for r in roles]


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


def _learning_rate(settings: RunSettings, round_idx: int) -> float:
    """As PriSM's clients: constant, or cosine from ``learning_rate`` to 0 over ``comm_round``."""
    if settings.lr_schedule == "cosine":
        return settings.learning_rate * 0.5 * (1 + math.cos(math.pi * round_idx / settings.comm_round))
    return settings.learning_rate


def _client_batches(data: FederatedData, settings: RunSettings, seed: int, round_idx: int, client: int) -> Iterable:
    """The client's shuffled batches, seeded as PriSM's clients seed theirs."""
    g = make_generator(seed, "data", round_idx, client)
    loader = DataLoader(data.client_dataset(client), batch_size=settings.batch_size, shuffle=True, generator=g)
    if settings.augment == "flip_crop":
        return FlipCrop(loader, make_generator(seed, "augment", round_idx, client))
    return loader


def _memory_build(path: str, batch: Tensor) -> tuple[nn.Module, Any]:
    """In the measuring process: the client's sub-network as it arrives, and one step's loss."""
    module = torch.load(path, weights_only=False).train()
    out_dim = module(batch[:1]).shape[-1]
    labels = torch.randint(0, out_dim, (batch.shape[0],), generator=torch.Generator().manual_seed(0))
    return module, lambda: nn.functional.cross_entropy(module(batch), labels)


def peak_memory(sub: nn.Module, example: Tensor, batch_size: int) -> float:
    """Peak resident MB of training ``sub`` on a batch like ``example`` (fresh process)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "subnet.pt")
        torch.save(sub.cpu(), path)
        batch = example[:1].expand(batch_size, *example.shape[1:]).clone()
        return base.peak_train_memory_mb(functools.partial(_memory_build, path, batch))


def run(model: nn.Module, data: FederatedData, settings: RunSettings, options: Mapping[str, Any], seed: int, *,
        resume: bool = False, progress: bool = False) -> base.MethodRun:
    """SuperFed on ``data`` with the schedule of ``settings`` (see the module docstring)."""
    opts = options if isinstance(options, Options) else base.options_from(Options, options)
    dense_params = count_params(model)
    supernet = prepare_supernet(model, opts.bn)
    space = build_space(supernet, opts, dense_params)
    device = torch.device(opts.device)
    skeleton = meta_skeleton(supernet)
    s = settings
    beta_final = opts.beta_final if opts.beta_final is not None else 1.0 / s.client_num_per_round
    beta_rounds = opts.beta_rounds if opts.beta_rounds is not None else max(1, round(0.8 * s.comm_round))
    test = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=EVAL_BATCH)
    identity = {"options": opts.to_dict(), "seed": int(seed)}

    counts: dict[int, list[int]] = {}
    rows: list[dict[str, Any]] = []
    start_round, max_params, max_arch = 0, 0, None
    state = base.load_checkpoint(s.output_dir) if resume else None
    if state is not None:
        if state["identity"] != identity:
            diff = sorted(k for k in identity["options"] if state["identity"]["options"].get(k) != identity["options"][k])
            raise ValueError(f"checkpoint in {s.output_dir} was written with other method_args or seed "
                             f"({', '.join(diff) or 'seed'}): {state['identity']}")
        supernet.load_state_dict(state["supernet"])
        counts = {int(c): list(v) for c, v in state["counts"].items()}
        rows, start_round = list(state["metrics"]), int(state["round"])
        max_params = int(state["max_params"])
        max_arch = Arch.from_dict(state["max_arch"]) if state["max_arch"] else None
        log.info("superfed: resumed from %s after round %d", s.output_dir, start_round)
    metrics = base.MetricsLog(s.output_dir, NAME, rows)
    largest = space.largest()

    for r in range(start_round, s.comm_round):
        round_start = time.time()
        clients = select_clients(seed, r, s.client_num_in_total, s.client_num_per_round)
        plan, counts = tracking_sandwich(clients, counts, r, seed, space)
        beta = beta_at(r, init=opts.beta_init, final=beta_final, rounds=beta_rounds) \
            if opts.beta_schedule == "cosine" else None
        weights = round_weights([role for _, _, role in plan], beta)
        updates, losses, down, up, round_params = [], [], 0, 0, []
        for cid, arch, _role in plan:
            sub = extract_subnet(supernet, arch, skeleton, device)
            down += base.tensor_bytes(sub.state_dict().values())
            stats = local_train(sub, _client_batches(data, s, seed, r, cid), epochs=s.epochs, lr=_learning_rate(s, r),
                                momentum=s.momentum, weight_decay=s.weight_decay, reg_lambda=0.0,
                                clip_norm=s.clip_grad_norm or None, device=device)
            trained = {k: v.detach().cpu().clone() for k, v in sub.state_dict().items()}
            up += base.tensor_bytes(trained.values())
            updates.append(trained)
            if stats.loss == stats.loss:
                losses.append(stats.loss)
            p = space.params(arch)
            round_params.append(p)
            if p > max_params:
                max_params, max_arch = p, arch
        supernet.load_state_dict(aggregate_shared(supernet.state_dict(), updates, weights))
        acc = loss = float("nan")
        if (r + 1) % s.frequency_of_the_test == 0 or r + 1 == s.comm_round:
            acc, loss = evaluate(extract_subnet(supernet, largest, skeleton, device), test, device)
        row = metrics.add(r, round_start, test_acc=acc, test_loss=loss,
                          train_loss=sum(losses) / len(losses) if losses else float("nan"), clients=len(plan),
                          bytes_down=down, bytes_up=up, beta=beta if beta is not None else float("nan"),
                          max_client_params=max(round_params), min_client_params=min(round_params))
        if (r + 1) % s.checkpoint_every == 0 or r + 1 == s.comm_round:
            base.save_checkpoint(s.output_dir, {
                "identity": identity, "supernet": supernet.state_dict(), "round": r + 1,
                "counts": {str(c): v for c, v in counts.items()}, "metrics": metrics.rows,
                "max_params": max_params, "max_arch": max_arch.to_dict() if max_arch else None,
            })
        (log.info if progress else log.debug)(
            "superfed round %d/%d | acc %.4f | train %.4f | beta %.3f | params %d..%d | down %.2f MB up %.2f MB",
            r + 1, s.comm_round, row["test_acc"], row["train_loss"], row["beta"], row["min_client_params"],
            row["max_client_params"], down / 1e6, up / 1e6)

    return base.MethodRun(metrics.rows, _summary(supernet, space, skeleton, data, settings, opts, dense_params,
                                                 metrics.rows, max_arch or largest, device))


def _summary(supernet: nn.Module, space: SubnetSpace, skeleton: nn.Module, data: FederatedData, settings: RunSettings,
             opts: Options, dense_params: int, rows: list[dict[str, Any]], max_arch: Arch,
             device: torch.device) -> dict[str, Any]:
    """Final costs and the accuracy of every sub-network of :meth:`SubnetSpace.grid`."""
    test = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=EVAL_BATCH)
    example = data.x_test[:1]
    subnets = []
    for name, arch in space.grid():
        sub = extract_subnet(supernet, arch, skeleton, device)
        acc, loss = evaluate(sub, test, device)
        macs = sum(c[2] for c in layer_costs(sub, example).values())
        subnets.append({"name": name, **arch.to_dict(), "params": count_params(sub), "macs": int(macs),
                        "accuracy": acc, "loss": loss})
    client = extract_subnet(supernet, max_arch, skeleton, "cpu")
    peak = peak_memory(client, example, settings.batch_size) if opts.measure_memory else float("nan")
    return base.summary_of(
        rows, client_params=count_params(client), client_macs=int(sum(c[2] for c in layer_costs(client, example).values())),
        peak_train_mb=peak, setting=setting(opts), dense_params=dense_params, subnets=subnets,
        largest_arch=space.largest().to_dict(), budget_params=space.budget,
    )
