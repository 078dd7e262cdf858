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
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ..engine.costs import layer_costs
from ..engine.sampling import make_generator
from ..engine.server import RunSettings, flip_crop, select_clients
from ..engine.train import evaluate, load_momentum, make_optimizer, read_momentum
from ..workloads.data import FederatedData
from ..workloads.models import CNN, ResNetCifar
from . import base

log = logging.getLogger("fedml_prism")

SETTING = base.SHARES_ACTIVATIONS
STRATEGY = "fedgkt"
#: batch size of feature extraction, server logits and evaluation (no training: any size gives the same rows)
EVAL_BATCH = 256


@dataclass(frozen=True)
class Options:
    """``method_args`` of ``fedgkt``: distillation temperature and weight, the server's epochs per round
    and learning rate (``None``: the run's ``learning_rate``), how many ResNet stages a client runs, and
    what the server trains on each round: ``seen`` (the last upload of every client seen so far) or
    ``round`` (this round's uploads only, as FedML's implementation does with its participants; with
    partial participation ``seen`` costs the server up to total/per-round times more)."""

    temperature: float = 3.0
    alpha: float = 0.5
    server_epochs: int = 1
    server_lr: float | None = None
    client_blocks: int = 0
    server_data: str = "seen"

    def __post_init__(self) -> None:
        if self.server_data not in ("seen", "round"):
            raise ValueError(f"server_data={self.server_data!r} is invalid: allowed seen or round")
        base.check_range("temperature", self.temperature, 0, math.inf, low_open=True)
        base.check_range("alpha", self.alpha, 0, 1)
        base.check_range("server_epochs", self.server_epochs, 1, 10_000, integer=True)
        if self.server_lr is not None:
            base.check_range("server_lr", self.server_lr, 0, math.inf, low_open=True)
        base.check_range("client_blocks", self.client_blocks, 0, 16, integer=True)


# ---------------------------------------------------------------------------------------------- the split
class ClientModel(nn.Module):
    """What a client trains: a feature extractor and a small pooled linear head on its feature maps."""

    def __init__(self, extractor: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.extractor, self.head = extractor, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.extractor(x))


class ResNetServer(nn.Module):
    """The ResNet stages a client does not run, then the model's own pooling and classifier."""

    def __init__(self, layers: nn.Sequential, linear: nn.Linear) -> None:
        super().__init__()
        self.layers, self.pool, self.linear = layers, nn.AdaptiveAvgPool2d(1), linear

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(self.pool(self.layers(features)).flatten(1))


class CNNServer(nn.Module):
    """The CNN after its first conv block: second conv block, optional hidden layer, classifier."""

    def __init__(self, model: CNN) -> None:
        super().__init__()
        self.conv2, self.bn2 = copy.deepcopy(model.conv2), copy.deepcopy(model.bn2)
        self.pool = nn.MaxPool2d(2)
        self.hidden = copy.deepcopy(model.hidden)
        self.fc = copy.deepcopy(model.fc)

    def forward(self, features: Tensor) -> Tensor:
        x = self.pool(self.bn2(self.conv2(features)).relu()).flatten(1)
        if self.hidden is not None:
            x = self.hidden(x).relu()
        return self.fc(x)


def pooled_head(channels: int, num_classes: int, generator: torch.Generator) -> nn.Sequential:
    """Global average pooling and a linear classifier, initialised like ``nn.Linear`` (uniform in
    ``±1/sqrt(fan_in)``) but from ``generator``, so the head does not depend on the global RNG."""
    linear = nn.Linear(channels, num_classes)
    bound = 1 / math.sqrt(channels)
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound, generator=generator)
        linear.bias.uniform_(-bound, bound, generator=generator)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear)


def split_model(model: nn.Module, *, client_blocks: int = 0, seed: int = 0) -> tuple[ClientModel, nn.Module]:
    """``(client model, server model)`` cut from ``model`` (copies: ``model`` is left as it is).

    ``ResNetCifar``: the client runs the stem and the first ``client_blocks`` stages, the server the other
    stages and the model's head. ``CNN``: the client runs the first conv block, the server the rest. At
    the start ``server(client.extractor(x))`` is ``model(x)``."""
    if isinstance(model, ResNetCifar):
        stages = list(model.layers)
        if client_blocks > len(stages) - 1:
            raise ValueError(f"client_blocks={client_blocks} is invalid: allowed an integer in [0, {len(stages) - 1}] "
                             f"for this ResNet of {len(stages)} stages (the server keeps at least one)")
        kept = [copy.deepcopy(s) for s in stages[:client_blocks]]
        extractor = nn.Sequential(copy.deepcopy(model.conv1), copy.deepcopy(model.bn1), nn.ReLU(), *kept)
        channels = kept[-1][-1].bn2.num_features if kept else model.bn1.num_features
        server: nn.Module = ResNetServer(nn.Sequential(*[copy.deepcopy(s) for s in stages[client_blocks:]]),
                                         copy.deepcopy(model.linear))
        num_classes = model.linear.out_features
    elif isinstance(model, CNN):
        if client_blocks != 0:
            raise ValueError(f"client_blocks={client_blocks} is invalid: allowed 0 for the cnn "
                             "(its client runs the first conv block)")
        extractor = nn.Sequential(copy.deepcopy(model.conv1), copy.deepcopy(model.bn1), nn.ReLU(), nn.MaxPool2d(2))
        channels = model.bn1.num_features
        server = CNNServer(model)
        num_classes = model.fc.out_features
    else:
        raise ValueError(f"fedgkt cannot split a {type(model).__name__}: allowed models are ResNetCifar "
                         "(resnet_tiny, resnet18_cifar) and CNN (cnn)")
    head = pooled_head(channels, num_classes, make_generator(seed, "fedgkt-head"))
    return ClientModel(extractor, head), server


# ---------------------------------------------------------------------------------------------- losses
def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton's distillation loss ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, mean over
    the batch; exactly 0 when ``student`` equals ``teacher``."""
    log_p = F.log_softmax(student / temperature, dim=1)
    log_q = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature**2


def distill_loss(output: Tensor, labels: Tensor, teacher: Tensor | None, temperature: float,
                 alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(CE + alpha * KD, CE, KD)``; without a teacher KD is 0 and the loss is CE alone."""
    ce = F.cross_entropy(output, labels)
    if teacher is None:
        kd = torch.zeros((), device=output.device)
        return ce, ce, kd
    kd = kd_loss(output, teacher, temperature)
    return ce + alpha * kd, ce, kd


@dataclass
class DistillStats:
    """Means over the samples of a training pass, and the SGD momentum it ended with (by name)."""

    loss: float
    ce: float
    kd: float
    samples: int
    momentum: dict[str, Tensor] = field(default_factory=dict)


class _Meter:
    def __init__(self) -> None:
        self.loss = self.ce = self.kd = 0.0
        self.samples = 0

    def add(self, n: int, loss: Tensor, ce: Tensor, kd: Tensor) -> None:
        self.loss += float(loss) * n
        self.ce += float(ce) * n
        self.kd += float(kd) * n
        self.samples += n

    def stats(self, momentum: dict[str, Tensor]) -> DistillStats:
        n = self.samples or math.nan
        return DistillStats(self.loss / n, self.ce / n, self.kd / n, self.samples, momentum)


def _sgd_step(module: nn.Module, opt: torch.optim.Optimizer, loss: Tensor, clip_norm: float | None) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_norm:
        nn.utils.clip_grad_norm_(module.parameters(), clip_norm)
    opt.step()


# ---------------------------------------------------------------------------------------------- a client
def train_client(
    module: nn.Module,
    dataset: TensorDataset,
    teacher: Tensor | None,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    clip_norm: float | None,
    temperature: float,
    alpha: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    momentum_buffers: Mapping[str, Tensor] | None = None,
    augment: torch.Generator | None = None,
) -> DistillStats:
    """Train a client's model in place on shuffled batches of ``dataset`` (``(x, y)``), with
    ``CE + alpha * KD`` against ``teacher[i]`` for sample ``i`` (row ``i`` of the server's last reply),
    or CE alone when ``teacher`` is ``None``. The loader yields each batch's sample indices with it,
    so the teacher rows follow the samples whatever order the shuffle gives."""
    x_all, y_all = dataset.tensors[:2]
    if teacher is not None and len(teacher) != len(y_all):
        raise ValueError(f"teacher logits have {len(teacher)} rows for a client of {len(y_all)} samples")
    indexed = TensorDataset(x_all, y_all, torch.arange(len(y_all)))
    loader = DataLoader(indexed, batch_size=batch_size, shuffle=True, generator=generator)

    def batches() -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        for x, y, idx in loader:
            yield (flip_crop(x, augment) if augment is not None else x), y, (teacher[idx] if teacher is not None else None)

    return _distill(module, epochs, batches, lr=lr, momentum=momentum, weight_decay=weight_decay, clip_norm=clip_norm,
                    temperature=temperature, alpha=alpha, device=device, momentum_buffers=momentum_buffers)


def _distill(
    module: nn.Module,
    epochs: int,
    batches: Callable[[], Iterable[tuple[Tensor, Tensor, Tensor | None]]],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    clip_norm: float | None,
    temperature: float,
    alpha: float,
    device: torch.device | str,
    momentum_buffers: Mapping[str, Tensor] | None,
) -> DistillStats:
    """``epochs`` passes of SGD on ``CE + alpha * KD`` over ``batches()`` (inputs, labels, teacher logits
    or ``None``), the optimizer's momentum started from ``momentum_buffers``: the step both sides share."""
    module.to(device).train()
    opt = make_optimizer(module, lr, momentum, weight_decay)
    if momentum_buffers is not None:
        load_momentum(opt, module, momentum_buffers)
    meter = _Meter()
    for _ in range(epochs):
        for x, y, target in batches():
            x, y = x.to(device), y.to(device)
            target = target.to(device) if target is not None else None
            loss, ce, kd = distill_loss(module(x), y, target, temperature, alpha)
            _sgd_step(module, opt, loss, clip_norm)
            meter.add(len(y), loss.detach(), ce.detach(), kd.detach())
    return meter.stats(read_momentum(opt, module))


@dataclass
class Upload:
    """What a client sends: feature maps, its logits and the labels, row ``i`` = its sample ``i``."""

    features: Tensor
    logits: Tensor
    labels: Tensor

    def tensors(self) -> list[Tensor]:
        return [self.features, self.logits, self.labels]


@torch.no_grad()
def extract(client: ClientModel, dataset: TensorDataset, device: torch.device | str = "cpu") -> Upload:
    """The client's upload: features (float32), logits (float32) and labels (int64) of every sample,
    in dataset order, in eval mode (deterministic: resume recomputes it bit for bit)."""
    x_all, y_all = dataset.tensors[:2]
    client.to(device).eval()
    feats, logits = [], []
    for start in range(0, len(y_all), EVAL_BATCH):
        f = client.extractor(x_all[start:start + EVAL_BATCH].to(device))
        feats.append(f.float().cpu())
        logits.append(client.head(f).float().cpu())
    return Upload(torch.cat(feats), torch.cat(logits), y_all.to(torch.int64).clone())


# ---------------------------------------------------------------------------------------------- the server
class FeatureCache:
    """The server's copy of each seen client's last upload. Positions ``0 .. len-1`` run over the
    clients in id order and each client's rows in sample order."""

    def __init__(self) -> None:
        self.uploads: dict[int, Upload] = {}

    def put(self, client_id: int, upload: Upload) -> None:
        self.uploads[client_id] = upload

    def __len__(self) -> int:
        return sum(len(u.labels) for u in self.uploads.values())

    def gather(self, positions: Tensor) -> Upload:
        """The rows at ``positions``, in that order."""
        order = sorted(self.uploads)
        sizes = torch.tensor([len(self.uploads[c].labels) for c in order])
        ends = sizes.cumsum(0)
        owner = torch.searchsorted(ends, positions, right=True)
        rows = positions - (ends - sizes)[owner]
        first = self.uploads[order[0]]
        n = len(positions)
        out = Upload(first.features.new_empty(n, *first.features.shape[1:]),
                     first.logits.new_empty(n, *first.logits.shape[1:]), first.labels.new_empty(n))
        for k in owner.unique().tolist():
            sel = owner == k
            up = self.uploads[order[k]]
            out.features[sel], out.logits[sel], out.labels[sel] = (t[rows[sel]] for t in up.tensors())
        return out


def train_server(
    server: nn.Module,
    cache: FeatureCache,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    clip_norm: float | None,
    temperature: float,
    alpha: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    momentum_buffers: Mapping[str, Tensor] | None = None,
) -> DistillStats:
    """``epochs`` shuffled passes over the cached features with ``CE + alpha * KD`` against the
    clients' logits of the same samples."""
    def batches() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        perm = torch.randperm(len(cache), generator=generator)
        for start in range(0, len(perm), batch_size):
            x, t, y = cache.gather(perm[start:start + batch_size]).tensors()
            yield x, y, t

    return _distill(server, epochs, batches, lr=lr, momentum=momentum, weight_decay=weight_decay, clip_norm=clip_norm,
                    temperature=temperature, alpha=alpha, device=device, momentum_buffers=momentum_buffers)


@torch.no_grad()
def server_logits(server: nn.Module, features: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """The server's logits (float32, eval mode) for each row of ``features``, in row order."""
    server.to(device).eval()
    out = [server(features[s:s + EVAL_BATCH].to(device)).float().cpu() for s in range(0, len(features), EVAL_BATCH)]
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- a run
def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _round_lr(lr: float, settings: RunSettings, round_idx: int) -> float:
    """The round's learning rate, on PriSM's clients' schedule (``cosine``: to 0 over ``comm_round``)."""
    if settings.lr_schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * round_idx / settings.comm_round))
    return lr


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


def run(
    model: nn.Module,
    data: FederatedData,
    settings: RunSettings,
    options: Mapping[str, Any],
    seed: int,
    *,
    resume: bool = False,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> base.MethodRun:
    """FedGKT for ``settings.comm_round`` rounds (see the module docstring); metrics and checkpoint in
    ``settings.output_dir``. ``device`` defaults to the CPU."""
    opts = base.options_from(Options, options)
    device = torch.device(device) if device is not None else _default_device()
    client_template, server = split_model(model, client_blocks=opts.client_blocks, seed=seed)
    predicted = client_template.head[-1].out_features
    if predicted != data.num_classes:
        raise ValueError(f"the model predicts {predicted} classes, the data has num_classes={data.num_classes}")
    server_lr = float(opts.server_lr if opts.server_lr is not None else settings.learning_rate)
    saved_options = {**asdict(opts), "server_lr": server_lr}
    out = settings.output_dir

    clients: dict[int, _ClientState] = {}
    server_momentum: dict[str, Tensor] | None = None
    init_state = _cpu_state(client_template)
    rows: list[dict[str, Any]] | None = None
    start_round = 0
    checkpoint = base.load_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        log.info("fedgkt: no checkpoint in %s: starting from round 1", out)
    if checkpoint is not None:
        if checkpoint.get("method") != STRATEGY:
            raise ValueError(f"checkpoint in {out} was written by method {checkpoint.get('method')!r}, not {STRATEGY!r}")
        diff = sorted(k for k in saved_options if checkpoint["options"].get(k) != saved_options[k])
        if diff:
            raise ValueError(f"checkpoint in {out} was written with other method_args ({', '.join(diff)}): "
                             f"{checkpoint['options']}")
        server.load_state_dict(checkpoint["server"])
        server_momentum = checkpoint["server_momentum"]
        init_state = checkpoint["client_init"]
        clients = {int(c): _ClientState(**s) for c, s in checkpoint["clients"].items()}
        rows, start_round = checkpoint["metrics"], int(checkpoint["rounds_done"])
        log.info("fedgkt: resumed from %s after round %d", out, start_round)

    work = copy.deepcopy(client_template).to(device)
    server.to(device)

    def load_client(cid: int) -> ClientModel:
        state = clients.get(cid)
        work.load_state_dict(state.model if state is not None else init_state)
        return work

    cache = FeatureCache()
    for cid in sorted(clients):  # the server's cache is a function of the clients' states: rebuild it
        cache.put(cid, extract(load_client(cid), data.client_dataset(cid), device))

    metrics = base.MetricsLog(out, STRATEGY, rows)
    test_loader = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=EVAL_BATCH)
    s = settings
    for r in range(start_round, s.comm_round):
        t0 = time.time()
        selected = select_clients(seed, r, s.client_num_in_total, s.client_num_per_round)
        lr, slr = _round_lr(s.learning_rate, s, r), _round_lr(server_lr, s, r)
        bytes_up = bytes_down = 0
        client_losses = []
        for cid in selected:
            dataset = data.client_dataset(cid)
            state = clients.get(cid)
            module = load_client(cid)
            augment = make_generator(seed, "fedgkt-augment", r, cid) if s.augment == "flip_crop" else None
            stats = train_client(
                module, dataset, state.teacher if state is not None else None, epochs=s.epochs, batch_size=s.batch_size, lr=lr,
                momentum=s.momentum, weight_decay=s.weight_decay, clip_norm=s.clip_grad_norm or None,
                temperature=opts.temperature, alpha=opts.alpha, generator=make_generator(seed, "fedgkt-data", r, cid),
                device=device, momentum_buffers=state.momentum if state is not None else None, augment=augment)
            client_losses.append(stats.loss)
            upload = extract(module, dataset, device)
            bytes_up += base.tensor_bytes(upload.tensors())
            cache.put(cid, upload)
            # the teacher is replaced by the server's reply once the server has trained this round
            clients[cid] = _ClientState(_cpu_state(module), stats.momentum, state.teacher if state is not None else None)
        trained_on = cache
        if opts.server_data == "round":
            trained_on = FeatureCache()
            for cid in selected:
                trained_on.put(cid, cache.uploads[cid])
        server_stats = train_server(
            server, trained_on, epochs=opts.server_epochs, batch_size=s.batch_size, lr=slr, momentum=s.momentum,
            weight_decay=s.weight_decay, clip_norm=s.clip_grad_norm or None, temperature=opts.temperature,
            alpha=opts.alpha, generator=make_generator(seed, "fedgkt-server", r), device=device,
            momentum_buffers=server_momentum)
        server_momentum = server_stats.momentum
        for cid in selected:
            reply = server_logits(server, cache.uploads[cid].features, device)
            bytes_down += base.tensor_bytes([reply])
            clients[cid].teacher = reply

        acc = loss = client_acc = float("nan")
        if (r + 1) % s.frequency_of_the_test == 0 or r + 1 == s.comm_round:
            acc, loss, client_acc = _evaluate(selected, load_client, server, test_loader, device)
        row = metrics.add(r, t0, test_acc=acc, test_loss=loss, train_loss=sum(client_losses) / len(client_losses),
                          clients=len(selected), bytes_down=bytes_down, bytes_up=bytes_up, client_acc=client_acc,
                          server_loss=server_stats.loss, cached_samples=len(cache), server_samples=len(trained_on))
        if (r + 1) % s.checkpoint_every == 0 or r + 1 == s.comm_round:
            base.save_checkpoint(out, {
                "method": STRATEGY, "options": saved_options, "rounds_done": r + 1, "metrics": metrics.rows,
                "server": _cpu_state(server), "server_momentum": server_momentum, "client_init": init_state,
                "clients": {str(c): st.to_dict() for c, st in sorted(clients.items())},
            })
        (log.info if progress else log.debug)(
            "fedgkt round %d/%d | acc %.4f | client acc %.4f | train %.4f | server %.4f | up %.2f MB down %.2f MB",
            r + 1, s.comm_round, row["test_acc"], client_acc, row["train_loss"], server_stats.loss, bytes_up / 1e6,
            bytes_down / 1e6)

    return base.MethodRun(metrics.rows, _summary(metrics.rows, model, client_template, server, data, s, opts))


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
