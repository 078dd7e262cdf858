"""FedGKT's pieces (:mod:`fedml_prism.strategies.fedgkt` is the method): the model cut into a client
extractor with a pooled head and the server's rest, the distillation losses, a client's and the
server's training, and the features, logits and labels that travel (keyed by sample index).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ..engine.rounds import flip_crop
from ..engine.sampling import make_generator
from ..engine.train import load_momentum, make_optimizer, read_momentum
from ..workloads.models import CNN, ResNetCifar

#: batch size of feature extraction, server logits and evaluation (no training: any size gives the same rows)
EVAL_BATCH = 256


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
