"""Federated Layer-wise Learning and Federated Depth Dropout.

Guo, Morningstar, Vemulapalli, Singhal, Patel, Mansfield, "Towards Federated Learning Under Resource
Constraints via Layer-wise Training and Depth Dropout", arXiv 2309.05213 (2023). The paper trains
self-supervised representations; here the method is adapted to supervised classification: every
stage's local objective is the cross-entropy of a small auxiliary classifier on top of the block
being trained, and the last stage trains the model's own classifier.

How it runs here:

- **Blocks** (:func:`split_model`): the model is cut into an ordered list of blocks whose sequential
  application reproduces the model's output (checked on a real input). ``ResNetCifar``: the stem
  (conv, BN, ReLU), every ``BasicBlock`` on its own, then the head (pool, flatten, linear). One
  BasicBlock per stage, not one ResNet stage, because it is the finer cut (a client holds less) and
  because the second block of every ResNet stage is identity-shaped, so depth dropout has blocks to
  drop (a whole ResNet stage never is). ``CNN``: each conv block (conv, BN, ReLU, pool), the hidden
  fully connected layer when there is one, then the classifier. Any other model: its top-level
  children in order (parameterless children join the block before them), accepted only when every
  parameter lies in a child and running the children in order reproduces the model's output;
  otherwise ``ValueError``.
- **Stages** (:func:`stage_schedule`): one stage per block before the head. Stage ``s`` trains block
  ``s`` plus a head; blocks ``< s`` are frozen (eval mode, run under ``torch.no_grad``: no autograd
  graph, no BN statistics updates) and blocks ``> s`` are not sent. Stages before the last train a
  fresh auxiliary head (global average pooling + linear, or a one-hidden-layer MLP with
  ``aux_head_hidden``), discarded when the stage ends; the last stage trains the model's own head, so
  the finished model is the model as built, with no extra parameters. The head is not a stage of its
  own: a linear probe on frozen features would only repeat what the last stage's head learns.
  ``comm_round`` is split evenly (the later stages take the remainder, so the last stage, which
  trains the real head, is never the shortest) or, with ``rounds_per_stage=k``, every stage but the
  last takes ``k`` rounds and the last takes the rest.
- **Learning rate and BN** (issue 22): by default the run's schedule restarts at every stage
  (``lr_schedule: stage``: each stage is a training run of its own, so the last stage, which trains
  most of a ResNet's parameters and the real classifier, starts at ``learning_rate`` instead of the
  tail of one cosine over the run), and BatchNorm is static (``bn: static``: batch statistics, no
  running statistics averaged over non-iid clients, as PriSM's ``static_bn``). SGD momentum restarts
  every round, as for every weight-averaging method in ``fedml-prism bench --profile fidelity_methods``.
- **Depth dropout** (``depth_dropout=p``): a client drops each frozen, identity-shaped block (same
  input and output shape, e.g. a stride-1 BasicBlock) with probability ``p``, drawn once per
  (seed, round, client). Dropped blocks are neither run nor sent to that client. The trained block
  and blocks that change shape are never dropped. Evaluation always runs every block.
- **Communication**: down = every tensor the client needs that round (the kept frozen prefix, the
  trained block and the head, BN buffers included), counted for every selected client every round:
  no client-side cache is modelled, since a client sampled for the first time in a stage needs the
  prefix anyway. Up = the trained block's and the head's tensors (parameters and BN buffers).
- **Aggregation** (:func:`fedavg`): average of the uploaded block + head, uniform over clients by
  default like the engine's ``weighting: uniform`` (``weighting: samples`` weights by sample count).
- **Evaluation**: the frozen prefix + the current block + the current auxiliary head before the last
  stage; the whole model in the last stage. Every metrics row carries ``stage`` (1-based) and
  ``block`` (the trained block's name).

``run`` trains ``model`` in place and returns its metrics and summary (see
:mod:`fedml_prism.strategies.base`).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ..engine.costs import layer_costs
from ..engine.layers import convert_static_bn
from ..engine.rounds import client_batches, round_lr
from ..engine.sampling import make_generator
from ..engine.server import RunSettings
from ..engine.train import evaluate, local_train
from ..workloads.data import FederatedData
from ..workloads.models import CNN, BasicBlock, ResNetCifar
from . import base
from .driver import drive

log = logging.getLogger("fedml_prism")

SETTING = base.WEIGHTS_ONLY
STRATEGY = "layerwise"
WEIGHTINGS = ("uniform", "samples")
LR_SCHEDULES = ("stage", "run")
BN_MODES = ("static", "running")


@dataclass(frozen=True)
class Options:
    """``method_args`` of ``layerwise``.

    depth_dropout: probability in [0, 1) that a client drops each frozen identity-shaped block.
    rounds_per_stage: rounds of every stage but the last (which takes the rest); ``None`` splits
        ``comm_round`` evenly over the stages.
    aux_head_hidden: hidden width of the auxiliary heads (0: pooling + linear).
    weighting: ``uniform`` (the engine's default) or ``samples`` (FedAvg by client sample count).
    lr_schedule: ``stage`` (the run's schedule restarted for every stage, over that stage's rounds:
        with ``lr_schedule: cosine`` each stage starts at ``learning_rate`` and ends near 0) or ``run``
        (one schedule over the whole run, as PriSM's rounds).
    bn: ``static`` (BatchNorm on batch statistics, no running statistics: PriSM's default
        ``static_bn``) or ``running`` (running statistics, averaged with the trained block).
    """

    depth_dropout: float = 0.0
    rounds_per_stage: int | None = None
    aux_head_hidden: int = 0
    weighting: str = "uniform"
    lr_schedule: str = "stage"
    bn: str = "static"

    def __post_init__(self) -> None:
        p = self.depth_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 <= p < 1):
            raise ValueError(f"depth_dropout={p!r} is invalid: allowed a number in [0, 1)")
        if self.rounds_per_stage is not None:
            base.check_range("rounds_per_stage", self.rounds_per_stage, 1, 10**9, integer=True)
        base.check_range("aux_head_hidden", self.aux_head_hidden, 0, 10**7, integer=True)
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r} is invalid: allowed one of {', '.join(WEIGHTINGS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is invalid: allowed one of {', '.join(LR_SCHEDULES)}")
        if self.bn not in BN_MODES:
            raise ValueError(f"bn={self.bn!r} is invalid: allowed one of {', '.join(BN_MODES)}")


# ------------------------------------------------------------------------------------------ blocks
@dataclass
class Block:
    """One block of the split: a module sharing its parameters with the model, and the shapes of one
    sample going in and out (measured)."""

    name: str
    module: nn.Module
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()

    @property
    def identity_shaped(self) -> bool:
        """Whether skipping the block leaves a valid input for the next one."""
        return self.in_shape == self.out_shape


def _builtin_blocks(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    if isinstance(model, ResNetCifar):
        out: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(model.conv1, model.bn1, nn.ReLU()))]
        for i, stage in enumerate(model.layers):
            for j, block in enumerate(stage):
                if not isinstance(block, BasicBlock):
                    return None
                out.append((f"layers.{i}.{j}", block))
        out.append(("head", nn.Sequential(model.pool, nn.Flatten(), model.linear)))
        return out
    if isinstance(model, CNN):
        out = [
            ("conv1", nn.Sequential(model.conv1, model.bn1, nn.ReLU(), model.pool)),
            ("conv2", nn.Sequential(model.conv2, model.bn2, nn.ReLU(), model.pool)),
        ]
        if model.hidden is not None:
            out += [("hidden", nn.Sequential(nn.Flatten(), model.hidden, nn.ReLU())), ("head", model.fc)]
        else:
            out.append(("head", nn.Sequential(nn.Flatten(), model.fc)))
        return out
    return None


def _generic_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children in order; a child without parameters joins the block before it (the
    leading ones the first block with parameters)."""
    groups: list[tuple[list[str], list[nn.Module]]] = []
    leading: tuple[list[str], list[nn.Module]] = ([], [])
    for name, child in model.named_children():
        if next(child.parameters(), None) is not None:
            groups.append((leading[0] + [name], leading[1] + [child]))
            leading = ([], [])
        elif groups:
            groups[-1][0].append(name)
            groups[-1][1].append(child)
        else:
            leading[0].append(name)
            leading[1].append(child)
    return [("+".join(names), mods[0] if len(mods) == 1 else nn.Sequential(*mods)) for names, mods in groups]


def split_model(model: nn.Module, example: Tensor) -> list[Block]:
    """The model's blocks in forward order, the head last; each block's module shares the model's
    parameters. ``example`` (a batch of real inputs) measures the shapes and checks, in eval mode,
    that running the blocks in order gives the model's output. ``ValueError`` when the model cannot
    be cut that way."""
    kind = type(model).__name__
    named = _builtin_blocks(model) or _generic_blocks(model)
    if len(named) < 2:
        raise ValueError(f"model {kind} cannot be split into layer-wise blocks: it has {len(named)} top-level "
                         "block(s) with parameters, at least 2 are needed (one to train, then a head)")
    owned = {id(p) for _, m in named for p in m.parameters()}
    orphans = [n for n, p in model.named_parameters() if id(p) not in owned]
    if orphans:
        raise ValueError(f"model {kind} cannot be split into layer-wise blocks: parameters {orphans[:3]} lie outside "
                         "its top-level children (only ResNetCifar, CNN and sequential models are supported)")
    was_training = model.training
    model.eval()
    blocks = []
    try:
        with torch.no_grad():
            x = example
            for name, module in named:
                before = tuple(x.shape[1:])
                x = module(x)
                blocks.append(Block(name, module, before, tuple(x.shape[1:])))
            expected = model(example)
    except (RuntimeError, TypeError, IndexError) as err:
        raise ValueError(f"model {kind} cannot be split into layer-wise blocks: running its children in order fails "
                         f"({str(err).splitlines()[0]})") from err
    finally:
        model.train(was_training)
    if x.shape != expected.shape or not torch.allclose(x, expected, rtol=1e-4, atol=1e-5):
        raise ValueError(f"model {kind} cannot be split into layer-wise blocks: running its top-level children in order "
                         "does not reproduce its output (its forward is not sequential)")
    return blocks


# ------------------------------------------------------------------------------------------ heads and client nets
class AuxHead(nn.Module):
    """A stage's auxiliary classifier: average over the spatial (N, C, H, W) or position (N, T, D)
    axes, then linear (or linear, ReLU, linear with ``hidden``)."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, hidden: int = 0) -> None:
        super().__init__()
        if len(in_shape) not in (1, 2, 3):
            raise ValueError(f"auxiliary head: features of shape {tuple(in_shape)} are not supported (1 to 3 dims)")
        self.rank = len(in_shape)
        features = in_shape[0] if self.rank in (1, 3) else in_shape[1]
        layers: list[nn.Module] = [nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)] if hidden \
            else [nn.Linear(features, num_classes)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.rank == 3:
            x = x.mean(dim=(2, 3))
        elif self.rank == 2:
            x = x.mean(dim=1)
        return self.mlp(x)


def make_aux_head(block: Block, num_classes: int, hidden: int, seed: int, stage: int) -> AuxHead:
    """The auxiliary head of ``stage``, initialised from a generator seeded by (seed, stage) so a
    resumed run and an uninterrupted one start the stage from the same head."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(make_generator(seed, "aux-head", stage).initial_seed())
        return AuxHead(block.out_shape, num_classes, hidden)


class StageNet(nn.Module):
    """What a client runs in a stage: the frozen prefix (eval mode, no autograd graph), the block
    being trained and its head. ``train()`` leaves the prefix in eval mode, so its BN statistics
    stay the server's."""

    def __init__(self, prefix: Sequence[nn.Module], block: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.prefix = nn.ModuleList(prefix)
        self.block = block
        self.head = head

    def train(self, mode: bool = True) -> StageNet:
        super().train(mode)
        self.prefix.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            for module in self.prefix:
                x = module(x)
        return self.head(self.block(x))

    def trained_state(self) -> dict[str, Tensor]:
        """The tensors a client uploads: the block's and the head's (parameters and buffers)."""
        return {f"block.{k}": v for k, v in self.block.state_dict().items()} | {
            f"head.{k}": v for k, v in self.head.state_dict().items()
        }


def client_net(blocks: Sequence[Block], stage: int, head: nn.Module, dropped: Sequence[bool] = ()) -> StageNet:
    """A client's own copy of stage ``stage``: the frozen blocks ``< stage`` not ``dropped`` (their
    parameters do not require grad), a trainable copy of block ``stage`` and of ``head``."""
    if not 0 <= stage < len(blocks) - 1:
        raise ValueError(f"stage={stage} is invalid: allowed 0 .. {len(blocks) - 2}")
    dropped = list(dropped) or [False] * stage
    if len(dropped) != stage:
        raise ValueError(f"dropped has {len(dropped)} entries for stage {stage}: one per frozen block is needed")
    prefix = [copy.deepcopy(b.module).requires_grad_(False) for b, d in zip(blocks[:stage], dropped, strict=True) if not d]
    return StageNet(prefix, copy.deepcopy(blocks[stage].module), copy.deepcopy(head))


# ------------------------------------------------------------------------------------------ pure arithmetic
def stage_schedule(comm_round: int, stages: int, rounds_per_stage: int | None = None) -> list[int]:
    """Rounds of each stage, summing to ``comm_round``: an even split (the remainder goes to the
    last stages) or ``rounds_per_stage`` for every stage but the last, which takes the rest."""
    if rounds_per_stage is None:
        if comm_round < stages:
            raise ValueError(f"comm_round={comm_round} is invalid for layerwise: allowed at least the model's "
                             f"{stages} stages (one round per stage)")
        even, extra = divmod(comm_round, stages)
        return [even + (1 if s >= stages - extra else 0) for s in range(stages)]
    last = comm_round - rounds_per_stage * (stages - 1)
    if last < 1:
        raise ValueError(f"rounds_per_stage={rounds_per_stage} is invalid: {stages - 1} stages of it leave no round of "
                         f"comm_round={comm_round} for the last stage; allowed at most {(comm_round - 1) // max(stages - 1, 1)}")
    return [rounds_per_stage] * (stages - 1) + [last]


def stage_of(round_idx: int, schedule: Sequence[int]) -> int:
    """The stage that round ``round_idx`` (0-based) trains."""
    end = 0
    for s, rounds in enumerate(schedule):
        end += rounds
        if round_idx < end:
            return s
    raise ValueError(f"round {round_idx} is past the schedule's {end} rounds")


def depth_dropout_mask(skippable: Sequence[bool], p: float, generator: torch.Generator) -> list[bool]:
    """Which frozen blocks a client drops: each identity-shaped (``skippable``) one with probability
    ``p``. ``skippable`` lists the frozen blocks only, so the trained block is never among them. One
    uniform draw per frozen block whatever ``p``, so the stream does not depend on the option."""
    draws = torch.rand(len(skippable), generator=generator, dtype=torch.float64)
    return [bool(ok) and float(u) < p for ok, u in zip(skippable, draws, strict=True)]


def fedavg(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Weighted average of the clients' tensors (float64 accumulation; integer tensors such as BN's
    ``num_batches_tracked`` are rounded back). Every state must hold the same keys and shapes."""
    if not states or len(states) != len(weights):
        raise ValueError(f"fedavg needs one weight per state: got {len(states)} states and {len(weights)} weights")
    total = float(sum(weights))
    if not (total > 0 and all(w >= 0 for w in weights)):
        raise ValueError(f"fedavg weights {list(weights)} are invalid: allowed non-negative numbers with a positive sum")
    keys = list(states[0])
    out: dict[str, Tensor] = {}
    for key in keys:
        first = states[0][key]
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for state, w in zip(states, weights, strict=True):
            value = state[key]
            if value.shape != first.shape:
                raise ValueError(f"fedavg: {key!r} has shape {tuple(value.shape)} and {tuple(first.shape)} in two states")
            acc += value.detach().to(torch.float64) * (float(w) / total)
        out[key] = (acc if first.is_floating_point() else acc.round()).to(first.dtype)
    for state in states[1:]:
        if set(state) != set(keys):
            raise ValueError(f"fedavg: states hold different keys ({sorted(set(state) ^ set(keys))[:3]})")
    return out


# ------------------------------------------------------------------------------------------ client costs
def _build_stage(net_bytes: bytes, x: Tensor, y: Tensor) -> tuple[nn.Module, Any]:
    """Module-level build for :func:`base.peak_train_memory_mb`: the stage net is materialized here,
    so its tensors count towards the measured peak."""
    net = torch.load(io.BytesIO(net_bytes), weights_only=False)
    net.train()
    return net, lambda: F.cross_entropy(net(x), y)


def client_costs(
    model: nn.Module, blocks: Sequence[Block], data: FederatedData, settings: RunSettings, options: Options, seed: int,
    *, measure_memory: bool = True,
) -> dict[str, Any]:
    """Max over stages of a client's trained parameters, forward MACs per sample and peak training
    memory (the whole prefix kept: the worst case under depth dropout)."""
    example = data.x_test[:1]
    batch_x, batch_y = data.x_train[: settings.batch_size], data.y_train[: settings.batch_size]
    stages = len(blocks) - 1
    params, macs, peaks = [], [], []
    for s in range(stages):
        head = blocks[-1].module if s == stages - 1 else make_aux_head(
            blocks[s], data.num_classes, options.aux_head_hidden, seed, s)
        net = client_net(blocks, s, head)
        params.append(sum(p.numel() for p in net.parameters() if p.requires_grad))
        macs.append(sum(c[2] for c in layer_costs(net, example).values()))
        if measure_memory:
            buf = io.BytesIO()
            torch.save(net, buf)
            peaks.append(base.peak_train_memory_mb(partial(_build_stage, buf.getvalue(), batch_x, batch_y)))
    return {
        "client_params": max(params),
        "client_macs": max(macs),
        "peak_train_mb": max(peaks) if peaks else float("nan"),
        "stage_params": params,
        "stage_macs": macs,
    }


# ------------------------------------------------------------------------------------------ the run
class Layerwise:
    """The method under :func:`~fedml_prism.strategies.driver.drive`: stage by stage, see the module docstring."""

    name = STRATEGY
    eval_fields = ("test_acc", "test_loss")

    def __init__(self, model: nn.Module, data: FederatedData, settings: RunSettings, options: Options, seed: int) -> None:
        self.model, self.data, self.settings, self.opts, self.seed = model, data, settings, options, seed
        if options.bn == "static":
            convert_static_bn(model)
        self.blocks = split_model(model, data.x_test[:2])
        self.stages = len(self.blocks) - 1
        self.schedule = stage_schedule(settings.comm_round, self.stages, options.rounds_per_stage)
        self.head: nn.Module | None = None
        self.head_stage = -1
        self.test = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=256)
        if options.depth_dropout and not any(b.identity_shaped for b in self.blocks[:-2]):
            log.warning("layerwise: depth_dropout=%g has no effect: %s has no identity-shaped block to drop",
                        options.depth_dropout, type(model).__name__)

    @property
    def identity(self) -> dict[str, Any]:
        return {"options": asdict(self.opts), "schedule": self.schedule, "seed": self.seed,
                "blocks": [b.name for b in self.blocks]}

    def _use_head(self, stage: int) -> nn.Module:
        """The head of ``stage``: the model's classifier on the last stage, else a fresh auxiliary head."""
        if self.head_stage != stage:
            self.head = self.blocks[-1].module if stage == self.stages - 1 else make_aux_head(
                self.blocks[stage], self.data.num_classes, self.opts.aux_head_hidden, self.seed, stage)
            self.head_stage = stage
        return self.head

    def stage_lr(self, round_idx: int, run_lr: float) -> float:
        """Round ``round_idx``'s learning rate: the run's (``lr_schedule: run``) or the run's schedule
        over the rounds of the round's stage, restarted at every stage (``stage``)."""
        if self.opts.lr_schedule == "run":
            return run_lr
        s = stage_of(round_idx, self.schedule)
        start = sum(self.schedule[:s])
        return round_lr(dataclasses.replace(self.settings, comm_round=self.schedule[s]), round_idx - start)

    def play_round(self, round_idx: int, clients: list[int], lr: float) -> dict[str, Any]:
        s = stage_of(round_idx, self.schedule)
        lr = self.stage_lr(round_idx, lr)
        head, settings = self._use_head(s), self.settings
        skippable = [b.identity_shaped for b in self.blocks[:s]]
        uploads, weights, losses, dropped_total, bytes_down, bytes_up = [], [], [], 0, 0, 0
        for cid in clients:
            dropped = depth_dropout_mask(skippable, self.opts.depth_dropout, make_generator(self.seed, "depth", round_idx, cid))
            net = client_net(self.blocks, s, head, dropped)
            bytes_down += base.tensor_bytes(net.state_dict().values())
            dropped_total += sum(dropped)
            stats = local_train(
                net, client_batches(self.data.client_dataset(cid), settings, self.seed, round_idx, cid),
                epochs=settings.epochs, lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay,
                reg_lambda=0.0, clip_norm=settings.clip_grad_norm or None)
            up = net.trained_state()
            bytes_up += base.tensor_bytes(up.values())
            if stats.samples == 0:
                continue  # nothing learned: it sent back what it got
            uploads.append(up)
            weights.append(float(len(self.data.client_indices[cid])) if self.opts.weighting == "samples" else 1.0)
            losses.append(stats.loss)
        if uploads:
            new = fedavg(uploads, weights)
            self.blocks[s].module.load_state_dict({k.removeprefix("block."): v for k, v in new.items() if k.startswith("block.")})
            head.load_state_dict({k.removeprefix("head."): v for k, v in new.items() if k.startswith("head.")})
        return {"train_loss": sum(losses) / len(losses) if losses else float("nan"), "clients": len(uploads),
                "bytes_down": bytes_down, "bytes_up": bytes_up, "stage": s + 1, "block": self.blocks[s].name, "lr": lr,
                "dropped_blocks": dropped_total / settings.client_num_per_round}

    def evaluate(self) -> dict[str, float]:
        s = self.head_stage
        net = self.model if s == self.stages - 1 else StageNet([b.module for b in self.blocks[:s]],
                                                                 self.blocks[s].module, self.head)
        acc, loss = evaluate(net, self.test)
        return {"test_acc": acc, "test_loss": loss}

    def state(self) -> dict[str, Any]:
        last = self.head_stage == self.stages - 1
        return {"model": self.model.state_dict(), "head_stage": self.head_stage,
                "head": self.head.state_dict() if self.head is not None and not last else {}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        stage = int(state["head_stage"])
        if stage >= 0:
            self._use_head(stage)
            if stage < self.stages - 1:
                self.head.load_state_dict(state["head"])

    def describe(self, row: Mapping[str, Any]) -> str:
        return (f"stage {row['stage']}/{self.stages} ({row['block']}) | acc {row['test_acc']:.4f} | "
                f"train {row['train_loss']:.4f} | down {row['bytes_down'] / 1e6:.2f} MB up {row['bytes_up'] / 1e6:.2f} MB")

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        costs = client_costs(self.model, self.blocks, self.data, self.settings, self.opts, self.seed)
        return base.summary_of(
            rows, client_params=costs["client_params"], client_macs=costs["client_macs"],
            peak_train_mb=costs["peak_train_mb"], setting=SETTING,
            dense_params=sum(p.numel() for p in self.model.parameters()), stages=self.stages,
            stage_rounds=self.schedule, blocks=[b.name for b in self.blocks[:-1]], stage_params=costs["stage_params"],
            stage_macs=costs["stage_macs"], depth_dropout=self.opts.depth_dropout,
        )


def run(model: nn.Module, data: FederatedData, settings: RunSettings, options: Mapping[str, Any], seed: int, *,
        resume: bool = False, progress: bool = False) -> base.MethodRun:
    """Train ``model`` (in place) stage by stage; see the module docstring."""
    method = Layerwise(model, data, settings, base.options_from(Options, options), seed)
    return drive(method, settings, seed, resume=resume, progress=progress)
