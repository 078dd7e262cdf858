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

import functools
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ..engine.costs import layer_costs
from ..engine.rounds import client_batches
from ..engine.sampling import make_generator
from ..engine.server import RunSettings
from ..engine.submodel import meta_skeleton
from ..engine.train import evaluate, local_train
from ..workloads.data import FederatedData
from . import base
from .driver import drive
from .supernet import (
    CAPPED_TRIES,
    Arch,
    SubnetSpace,
    aggregate_shared,
    check_model,
    count_params,
    extract_subnet,
    leading,
    prepare_supernet,
    subnet_skeleton,
)

__all__ = ["CAPPED_TRIES", "NAME", "SETTING", "Arch", "Options", "SubnetSpace", "SuperFed", "aggregate_shared",
           "beta_at", "build_space", "check_model", "count_params", "extract_subnet", "leading", "make_generator",
           "next_smallest_params", "peak_memory",
           "preflight", "prepare_supernet", "round_weights", "run", "setting", "subnet_skeleton",
           "tracking_sandwich"]

log = logging.getLogger("fedml_prism")

SETTING = base.TRAINS_FULL_MODEL
NAME = "superfed"
BETA_SCHEDULES = ("cosine", "uniform")
BN_MODES = ("static", "none")
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
    if budget is not None and space.largest() == space.smallest():
        small, step = space.params(space.smallest()), next_smallest_params(space)
        nxt = f"the next smallest has {step:,}" if step is not None else "there is no other (one depth, one width)"
        raise ValueError(
            f"max_params_ratio={options.max_params_ratio} is invalid for this model: its budget of {budget:,} of "
            f"{dense:,} parameters admits a single sub-network (the smallest has {small:,} parameters, {nxt}), so "
            "every client would train the same model; a capped space needs at least two sub-networks: raise "
            "max_params_ratio, add smaller widths, or use a model with more blocks per stage"
        )
    return space


def preflight(model: nn.Module, options: Options) -> None:
    """Before any work: ``ValueError`` when ``model`` is no supernet or ``options`` make no valid space
    for it (:func:`build_space`)."""
    build_space(prepare_supernet(model, options.bn), options, count_params(model))


def next_smallest_params(space: SubnetSpace) -> int | None:
    """Parameters of the second smallest sub-network of ``space`` (ignoring the budget): one step up from
    the smallest (one block a width wider, or one stage a block deeper), since parameters grow with
    every step; None when the space holds one sub-network."""
    small = space.smallest()
    steps = []
    for i, (d, allowed) in enumerate(zip(small.depth, space.depths, strict=True)):
        if len(space.widths) > 1:
            steps += [Arch(small.depth, small.width[:i] + (ws,) + small.width[i + 1:])
                      for ws in (small.width[i][:j] + (space.widths[1],) + small.width[i][j + 1:] for j in range(d))]
        deeper = [a for a in allowed if a > d]
        if deeper:
            depth = small.depth[:i] + (deeper[0],) + small.depth[i + 1:]
            steps.append(Arch(depth, small.width[:i] + ((space.widths[0],) * deeper[0],) + small.width[i + 1:]))
    return min((space.params(a) for a in steps), default=None)


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


class SuperFed:
    """The method under :func:`~fedml_prism.strategies.driver.drive` (see the module docstring)."""

    name = NAME
    eval_fields = ("test_acc", "test_loss")

    def __init__(self, model: nn.Module, data: FederatedData, settings: RunSettings, options: Options, seed: int) -> None:
        self.data, self.settings, self.opts, self.seed = data, settings, options, seed
        self.dense_params = count_params(model)
        self.supernet = prepare_supernet(model, options.bn)
        self.space = build_space(self.supernet, options, self.dense_params)
        self.largest = self.space.largest()
        self.device = torch.device(options.device)
        self.skeleton = meta_skeleton(self.supernet)
        self.beta_final = options.beta_final if options.beta_final is not None else 1.0 / settings.client_num_per_round
        self.beta_rounds = options.beta_rounds if options.beta_rounds is not None else max(1, round(0.8 * settings.comm_round))
        self.test = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=EVAL_BATCH)
        self.counts: dict[int, list[int]] = {}
        self.max_params, self.max_arch = 0, None

    @property
    def identity(self) -> dict[str, Any]:
        return {"options": self.opts.to_dict(), "seed": int(self.seed)}

    def _train(self, round_idx: int, cid: int, arch: Arch, lr: float) -> tuple[dict[str, Tensor], float, int]:
        """Client ``cid`` trains sub-network ``arch``; its weights, mean loss and bytes received."""
        s = self.settings
        sub = extract_subnet(self.supernet, arch, self.skeleton, self.device)
        down = base.tensor_bytes(sub.state_dict().values())
        stats = local_train(sub, client_batches(self.data.client_dataset(cid), s, self.seed, round_idx, cid),
                            epochs=s.epochs, lr=lr, momentum=s.momentum, weight_decay=s.weight_decay, reg_lambda=0.0,
                            clip_norm=s.clip_grad_norm or None, device=self.device)
        return {k: v.detach().cpu().clone() for k, v in sub.state_dict().items()}, stats.loss, down

    def play_round(self, round_idx: int, clients: list[int], lr: float) -> dict[str, Any]:
        plan, self.counts = tracking_sandwich(clients, self.counts, round_idx, self.seed, self.space)
        beta = beta_at(round_idx, init=self.opts.beta_init, final=self.beta_final, rounds=self.beta_rounds) \
            if self.opts.beta_schedule == "cosine" else None
        weights = round_weights([role for _, _, role in plan], beta)
        updates, losses, down, up, round_params = [], [], 0, 0, []
        for cid, arch, _role in plan:
            trained, loss, received = self._train(round_idx, cid, arch, lr)
            down += received
            up += base.tensor_bytes(trained.values())
            updates.append(trained)
            if loss == loss:
                losses.append(loss)
            p = self.space.params(arch)
            round_params.append(p)
            if p > self.max_params:
                self.max_params, self.max_arch = p, arch
        self.supernet.load_state_dict(aggregate_shared(self.supernet.state_dict(), updates, weights))
        return {"train_loss": sum(losses) / len(losses) if losses else float("nan"), "clients": len(plan),
                "bytes_down": down, "bytes_up": up, "beta": beta if beta is not None else float("nan"),
                "max_client_params": max(round_params), "min_client_params": min(round_params)}

    def evaluate(self) -> dict[str, float]:
        acc, loss = evaluate(extract_subnet(self.supernet, self.largest, self.skeleton, self.device), self.test, self.device)
        return {"test_acc": acc, "test_loss": loss}

    def state(self) -> dict[str, Any]:
        return {"supernet": self.supernet.state_dict(), "counts": {str(c): v for c, v in self.counts.items()},
                "max_params": self.max_params, "max_arch": self.max_arch.to_dict() if self.max_arch else None}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.supernet.load_state_dict(state["supernet"])
        self.counts = {int(c): list(v) for c, v in state["counts"].items()}
        self.max_params = int(state["max_params"])
        self.max_arch = Arch.from_dict(state["max_arch"]) if state["max_arch"] else None

    def describe(self, row: Mapping[str, Any]) -> str:
        return (f"acc {row['test_acc']:.4f} | train {row['train_loss']:.4f} | beta {row['beta']:.3f} | params "
                f"{row['min_client_params']}..{row['max_client_params']} | down {row['bytes_down'] / 1e6:.2f} MB "
                f"up {row['bytes_up'] / 1e6:.2f} MB")

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return _summary(self.supernet, self.space, self.skeleton, self.data, self.settings, self.opts,
                        self.dense_params, rows, self.max_arch or self.largest, self.device)


def run(model: nn.Module, data: FederatedData, settings: RunSettings, options: Mapping[str, Any], seed: int, *,
        resume: bool = False, progress: bool = False) -> base.MethodRun:
    """SuperFed on ``data`` with the schedule of ``settings`` (see the module docstring)."""
    opts = options if isinstance(options, Options) else base.options_from(Options, options)
    return drive(SuperFed(model, data, settings, opts, seed), settings, seed, resume=resume, progress=progress)


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
