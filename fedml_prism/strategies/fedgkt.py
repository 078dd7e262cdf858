"""FedGKT: Group Knowledge Transfer (He, Annavaram and Avestimehr, "Group Knowledge Transfer: Federated
Learning of Large CNNs at the Edge", NeurIPS 2020), run in one process next to PriSM.

The job's model is cut in two. A client trains only a small extractor (the stem, optionally the first
ResNet stage) plus a pooled linear head; the server trains the rest of the model on the feature maps
the clients upload. Knowledge goes both ways by distillation: a client learns from the server's logits
for its samples, the server from the clients' logits. No weights travel and nothing is aggregated;
what travels is features, logits and labels (``SETTING`` = :data:`base.SHARES_ACTIVATIONS`).

Choices (the paper assumes every client takes part in every round; here the same
:func:`~fedml_prism.engine.server.select_clients` as PriSM picks each round's clients):

- **Stateful clients.** Each client keeps its extractor, head, SGD momentum and the server logits it
  got last time across rounds; they are never averaged. In its first round a client trains with
  cross-entropy only, afterwards with ``CE + alpha * KD(T)`` against those logits.
- **Keys are sample indices.** An upload lists the client's samples in the order of its dataset, so
  row ``i`` of features, logits and labels, and of the server's reply, is sample ``i`` (the index is
  implicit and costs no bytes). Shuffled training batches carry their sample indices and look their
  teacher rows up by them. FedML's implementation keys logits by batch index while its loaders
  shuffle, so a client distils from the logits of other samples; this module does not.
- **The server trains on every client seen so far.** A client's extractor changes only when it trains,
  so the features it uploaded last are still exactly what its extractor computes: the server's cache
  of all clients seen is never stale, and training on it uses all the data the server has, as the
  paper's server does. The cost is server memory (one feature map per training sample).
- **Server logits** are computed after the server's epochs, in eval mode, for the round's clients only.
- **Evaluation** is FedGKT's inference path, client extractor → server model, on the test set: the mean
  accuracy and loss over the round's clients, each with its own extractor (FedML's server evaluates
  every client's features of its own test data the same way). Averaging the extractors' weights would
  not be FedGKT. The client-only accuracy (extractor + head) is reported as ``client_acc``.
- **Resume** recomputes the server's feature cache from the checkpointed client states (extraction is
  deterministic), so a checkpoint holds weights, momentum and logits, not the features.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ..engine.costs import layer_costs
from ..engine.rounds import round_lr
from ..engine.sampling import make_generator
from ..engine.server import RunSettings
from ..engine.train import evaluate
from ..workloads.data import FederatedData
from . import base
from .driver import drive
from .fedgkt_parts import (
    EVAL_BATCH,
    ClientModel,
    CNNServer,
    DistillStats,
    FeatureCache,
    ResNetServer,
    Upload,
    distill_loss,
    extract,
    kd_loss,
    pooled_head,
    server_logits,
    split_model,
    train_client,
    train_server,
)

__all__ = ["EVAL_BATCH", "SETTING", "STRATEGY", "CNNServer", "ClientModel", "DistillStats", "FeatureCache", "FedGKT",
           "Options", "ResNetServer", "Upload", "distill_loss", "extract", "kd_loss", "pooled_head", "run",
           "server_logits", "split_model", "train_client", "train_server"]

log = logging.getLogger("fedml_prism")

SETTING = base.SHARES_ACTIVATIONS
STRATEGY = "fedgkt"


@dataclass(frozen=True)
class Options:
    """``method_args`` of ``fedgkt``: distillation temperature and weight, the server's epochs per round
    and learning rate (``None``: the run's ``learning_rate``), how many ResNet stages a client runs, and
    what the server trains on each round: ``seen`` (the last upload of every client seen so far, what
    FedML 0.9.6's ``GKTServerTrainer`` does: it keeps each client's features in a dict by client index
    that it never clears, ``simulation/mpi/fedgkt/GKTServerTrainer.py`` lines 101 and 310) or ``round``
    (this round's uploads only: cheaper under partial participation, not the published method).
    ``server_kd``: whether the server's loss adds ``alpha * KD`` against the clients' logits (the
    paper's two-way transfer) or is cross-entropy alone (false, the default: FedML's
    ``whether_distill_on_the_server`` switch, line 331 of the same file, whose FedGKT launcher
    ``main_fedgkt.py`` defaults it to 0); the clients distil from the server's logits either way."""

    temperature: float = 3.0
    alpha: float = 0.5
    server_epochs: int = 1
    server_lr: float | None = None
    client_blocks: int = 0
    server_data: str = "seen"
    server_kd: bool = False

    def __post_init__(self) -> None:
        if self.server_data not in ("seen", "round"):
            raise ValueError(f"server_data={self.server_data!r} is invalid: allowed seen or round")
        base.check_range("temperature", self.temperature, 0, math.inf, low_open=True)
        base.check_range("alpha", self.alpha, 0, 1)
        base.check_range("server_epochs", self.server_epochs, 1, 10_000, integer=True)
        if self.server_lr is not None:
            base.check_range("server_lr", self.server_lr, 0, math.inf, low_open=True)
        base.check_range("client_blocks", self.client_blocks, 0, 16, integer=True)
        if not isinstance(self.server_kd, bool):
            raise ValueError(f"server_kd={self.server_kd!r} is invalid: allowed true or false")


# ---------------------------------------------------------------------------------------------- a run
def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _default_device() -> torch.device:
    return torch.device("cpu")


@dataclass
class _ClientState:
    """What a client keeps between its rounds (and the checkpoint stores): weights, SGD momentum and
    the server's logits for its samples from its last round."""

    model: dict[str, Tensor]
    momentum: dict[str, Tensor]
    teacher: Tensor | None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "momentum": self.momentum, "teacher": self.teacher}


class FedGKT:
    """The method under :func:`~fedml_prism.strategies.driver.drive` (see the module docstring)."""

    name = STRATEGY
    eval_fields = ("test_acc", "test_loss", "client_acc")

    def __init__(self, model: nn.Module, data: FederatedData, settings: RunSettings, options: Options, seed: int,
                 device: torch.device) -> None:
        self.model, self.data, self.settings, self.opts, self.seed, self.device = model, data, settings, options, seed, device
        self.client_template, self.server = split_model(model, client_blocks=options.client_blocks, seed=seed)
        predicted = self.client_template.head[-1].out_features
        if predicted != data.num_classes:
            raise ValueError(f"the model predicts {predicted} classes, the data has num_classes={data.num_classes}")
        self.server_lr = float(options.server_lr if options.server_lr is not None else settings.learning_rate)
        self.clients: dict[int, _ClientState] = {}
        self.server_momentum: dict[str, Tensor] | None = None
        self.init_state = _cpu_state(self.client_template)
        self.work = copy.deepcopy(self.client_template).to(device)
        self.server.to(device)
        self.cache = FeatureCache()
        self.selected: list[int] = []
        self.test_loader = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=EVAL_BATCH)

    @property
    def identity(self) -> dict[str, Any]:
        return {**asdict(self.opts), "server_lr": self.server_lr}

    def load_client(self, cid: int) -> ClientModel:
        state = self.clients.get(cid)
        self.work.load_state_dict(state.model if state is not None else self.init_state)
        return self.work

    def _train_client(self, round_idx: int, cid: int, lr: float) -> float:
        """Client ``cid``'s round: distil from its teacher, upload its features; returns its loss."""
        s, dataset, state = self.settings, self.data.client_dataset(cid), self.clients.get(cid)
        module = self.load_client(cid)
        augment = make_generator(self.seed, "fedgkt-augment", round_idx, cid) if s.augment == "flip_crop" else None
        stats = train_client(
            module, dataset, state.teacher if state is not None else None, epochs=s.epochs, batch_size=s.batch_size,
            lr=lr, momentum=s.momentum, weight_decay=s.weight_decay, clip_norm=s.clip_grad_norm or None,
            temperature=self.opts.temperature, alpha=self.opts.alpha,
            generator=make_generator(self.seed, "fedgkt-data", round_idx, cid), device=self.device,
            momentum_buffers=state.momentum if state is not None else None, augment=augment)
        self.cache.put(cid, extract(module, dataset, self.device))
        # the teacher is replaced by the server's reply once the server has trained this round
        self.clients[cid] = _ClientState(_cpu_state(module), stats.momentum, state.teacher if state is not None else None)
        return stats.loss

    def play_round(self, round_idx: int, clients: list[int], lr: float) -> dict[str, Any]:
        s, self.selected = self.settings, clients
        losses = [self._train_client(round_idx, cid, lr) for cid in clients]
        bytes_up = sum(base.tensor_bytes(self.cache.uploads[cid].tensors()) for cid in clients)
        trained_on = self.cache
        if self.opts.server_data == "round":
            trained_on = FeatureCache()
            for cid in clients:
                trained_on.put(cid, self.cache.uploads[cid])
        stats = train_server(
            self.server, trained_on, epochs=self.opts.server_epochs, batch_size=s.batch_size,
            lr=round_lr(s, round_idx, self.server_lr), momentum=s.momentum, weight_decay=s.weight_decay,
            clip_norm=s.clip_grad_norm or None, temperature=self.opts.temperature,
            alpha=self.opts.alpha if self.opts.server_kd else 0.0,
            generator=make_generator(self.seed, "fedgkt-server", round_idx), device=self.device,
            momentum_buffers=self.server_momentum)
        self.server_momentum = stats.momentum
        bytes_down = 0
        for cid in clients:
            reply = server_logits(self.server, self.cache.uploads[cid].features, self.device)
            bytes_down += base.tensor_bytes([reply])
            self.clients[cid].teacher = reply
        return {"train_loss": sum(losses) / len(losses), "clients": len(clients), "bytes_down": bytes_down,
                "bytes_up": bytes_up, "server_loss": stats.loss, "cached_samples": len(self.cache),
                "server_samples": len(trained_on)}

    def evaluate(self) -> dict[str, float]:
        acc, loss, client_acc = _evaluate(self.selected, self.load_client, self.server, self.test_loader, self.device)
        return {"test_acc": acc, "test_loss": loss, "client_acc": client_acc}

    def state(self) -> dict[str, Any]:
        return {"server": _cpu_state(self.server), "server_momentum": self.server_momentum,
                "client_init": self.init_state, "clients": {str(c): st.to_dict() for c, st in sorted(self.clients.items())}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.server.load_state_dict(state["server"])
        self.server_momentum, self.init_state = state["server_momentum"], state["client_init"]
        self.clients = {int(c): _ClientState(**st) for c, st in state["clients"].items()}
        for cid in sorted(self.clients):  # the server's cache is a function of the clients' states: rebuild it
            self.cache.put(cid, extract(self.load_client(cid), self.data.client_dataset(cid), self.device))

    def describe(self, row: Mapping[str, Any]) -> str:
        return (f"acc {row['test_acc']:.4f} | client acc {row['client_acc']:.4f} | train {row['train_loss']:.4f} | "
                f"server {row['server_loss']:.4f} | up {row['bytes_up'] / 1e6:.2f} MB down {row['bytes_down'] / 1e6:.2f} MB")

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return _summary(rows, self.model, self.client_template, self.server, self.data, self.settings, self.opts)


def run(model: nn.Module, data: FederatedData, settings: RunSettings, options: Mapping[str, Any], seed: int, *,
        resume: bool = False, progress: bool = False, device: torch.device | str | None = None) -> base.MethodRun:
    """FedGKT for ``settings.comm_round`` rounds (see the module docstring); metrics and checkpoint in
    ``settings.output_dir``. ``device`` defaults to the CPU."""
    device = torch.device(device) if device is not None else _default_device()
    method = FedGKT(model, data, settings, base.options_from(Options, options), seed, device)
    return drive(method, settings, seed, resume=resume, progress=progress)


def _evaluate(selected: list[int], load_client: Callable[[int], ClientModel], server: nn.Module, test_loader: DataLoader,
              device: torch.device) -> tuple[float, float, float]:
    """``(accuracy, loss)`` of client extractor → server model and the client-only accuracy, each the
    mean over the round's clients."""
    accs, losses, client_accs = [], [], []
    for cid in selected:
        client = load_client(cid)
        acc, loss = evaluate(nn.Sequential(client.extractor, server), test_loader, device)
        accs.append(acc)
        losses.append(loss)
        client_accs.append(evaluate(client, test_loader, device)[0])
    n = len(selected)
    return sum(accs) / n, sum(losses) / n, sum(client_accs) / n


def _summary(rows: list[dict[str, Any]], model: nn.Module, client: ClientModel, server: nn.Module,
             data: FederatedData, settings: RunSettings, opts: Options) -> dict[str, Any]:
    example = data.x_test[:1]
    probe = copy.deepcopy(client).cpu().eval()
    with torch.no_grad():
        feature_shape = list(probe.extractor(example).shape[1:])
    build = functools.partial(_client_training_step, copy.deepcopy(client).to("meta"), tuple(example.shape[1:]),
                              data.num_classes, settings.batch_size, opts.temperature, opts.alpha)
    return base.summary_of(
        rows,
        client_params=sum(p.numel() for p in client.parameters()),
        client_macs=sum(c[2] for c in layer_costs(probe, example).values()),
        peak_train_mb=base.peak_train_memory_mb(build),
        setting=SETTING,
        dense_params=sum(p.numel() for p in model.parameters()),
        server_params=sum(p.numel() for p in server.parameters()),
        feature_shape=feature_shape,
        client_blocks=opts.client_blocks,
    )


def _client_training_step(template: ClientModel, sample_shape: tuple[int, ...], num_classes: int, batch_size: int,
                          temperature: float, alpha: float) -> tuple[nn.Module, Any]:
    """A client's model built from a meta-device template (no weights travel in FedGKT: it is built
    locally) and one ``CE + alpha * KD`` step on a batch, for :func:`base.peak_train_memory_mb`."""
    module = template.to_empty(device="cpu")
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    x = torch.randn(batch_size, *sample_shape)
    y = torch.randint(0, num_classes, (batch_size,))
    teacher = torch.randn(batch_size, num_classes)
    return module, lambda: distill_loss(module(x), y, teacher, temperature, alpha)[0]
