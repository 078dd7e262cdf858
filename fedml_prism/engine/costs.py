"""What a sub-model costs a client, measured on the real modules and payloads.

Parameters are counted from each module's tensors, multiply-accumulates (MACs) from a forward pass
with hooks on every Conv2d / Linear / principal layer (the output shapes the pass really produced),
and bytes from the wire payloads (``down`` = server → client, ``up`` = client → server).

The forward pass needs an input the model accepts: a real sample (``x_train[:1]``, as ``run`` and
``bench`` pass) has the dataset's dtype and shape; from a shape alone, :func:`probe_input` builds
zeros of the dtype the model takes (token ids for a model that starts with an embedding).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .layers import PrincipalConv2d, PrincipalLinear
from .principal import PrincipalModel
from .recompute import principal_width
from .submodel import SubModel


@dataclass
class LayerCost:
    name: str
    kind: str
    params: int
    macs: int
    dense_params: int
    dense_macs: int


@dataclass
class CostReport:
    strategy: str
    keep_ratio: float
    input_shape: tuple[int, ...]
    input_dtype: str
    params: int
    macs: int
    bytes_down: int
    bytes_up: int
    dense_params: int
    dense_macs: int
    dense_bytes: int
    layers: list[LayerCost] = field(default_factory=list)
    #: training memory at ``batch_size``: bytes the sub-model's forward holds for backward (trained with
    #: ``activation_memory``) and the dense model's with plain autograd (:func:`activation_bytes`)
    batch_size: int | None = None
    activation_memory: str | None = None
    activation_bytes: int | None = None
    dense_activation_bytes: int | None = None

    @property
    def ratios(self) -> dict[str, float]:
        out = {
            "params": self.params / self.dense_params,
            "macs": self.macs / self.dense_macs if self.dense_macs else math.nan,
            "bytes_down": self.bytes_down / self.dense_bytes,
            "bytes_up": self.bytes_up / self.dense_bytes,
        }
        if self.activation_bytes is not None and self.dense_activation_bytes:
            out["activation_bytes"] = self.activation_bytes / self.dense_activation_bytes
        return out

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ratios"] = self.ratios
        return out


def _module_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, PrincipalConv2d):
        m_kk = math.prod(module.v.shape[1:])
        return out.shape[2] * out.shape[3] * module.rank * (m_kk + module.out_channels)
    if isinstance(module, PrincipalLinear):
        rows = out.numel() // module.out_features
        return rows * module.rank * (module.in_features + module.out_features)
    if isinstance(module, nn.Conv2d):
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        return out[0].numel() * per_output
    if isinstance(module, nn.Linear):
        return out[0].numel() * module.in_features
    return 0


_TOKEN_INPUT = (nn.Embedding, nn.EmbeddingBag)

# input dtypes by name (``str(dtype)`` without ``torch.``), for ``fedml-prism costs --input-dtype``
INPUT_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32)
}


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype ``model`` takes: ``torch.long`` (token ids) when its first leaf module with
    parameters is an ``nn.Embedding`` / ``nn.EmbeddingBag``, otherwise the dtype of its first
    floating-point parameter (float32 if it has none). "First" is registration order, which is the
    forward order of the built-in models; pass an explicit dtype (or a real sample) for a model where
    it is not."""
    for module in model.modules():
        if next(module.children(), None) is not None or next(module.parameters(recurse=False), None) is None:
            continue
        if isinstance(module, _TOKEN_INPUT):
            return torch.long
        break
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def probe_input(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """A batch of one all-zero input of ``input_shape`` (one sample, no batch dimension) in ``dtype``
    (default :func:`input_dtype`); zero is a valid token id for every embedding."""
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"input_shape={input_shape!r} is invalid: allowed one or more dimensions, each > 0")
    return torch.zeros(1, *shape, dtype=dtype or input_dtype(model))


def _example_batch(model: nn.Module, example: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """One sample from ``example`` (a batch: its first row is used; or a shape: :func:`probe_input`),
    on the model's device; floating-point inputs take the model's floating dtype, ids keep theirs."""
    if not isinstance(example, torch.Tensor):
        example = probe_input(model, example)
    if example.dim() == 0 or len(example) == 0:
        raise ValueError(
            f"example of shape {tuple(example.shape)} is invalid: allowed a batch of N ≥ 1 samples, e.g. x_train[:1]"
        )
    x = example[:1]
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None:
        x = x.to(param.device, dtype=param.dtype if x.is_floating_point() else x.dtype)
    return x


def layer_costs(model: nn.Module, example: torch.Tensor | Sequence[int]) -> dict[str, tuple[str, int, int]]:
    """``{module name: (type, params, MACs per sample)}`` for every module that owns parameters or
    computes a Conv2d / Linear / principal product.

    ``example`` is a batch of real inputs (its first sample is run: the dataset's dtype and shape) or
    the shape of one sample (zeros of :func:`input_dtype` are run)."""
    x = _example_batch(model, example)
    found: dict[str, tuple[str, int, int]] = {}
    hooks = []
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own == 0 and not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        found[name] = (type(module).__name__, own, 0)

        def hook(mod: nn.Module, _inp: object, out: torch.Tensor, name: str = name) -> None:
            kind, own, macs = found[name]
            found[name] = (kind, own, macs + _module_macs(mod, out))

        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except (RuntimeError, IndexError) as err:
        raise ValueError(
            f"cost probe: {type(model).__name__} cannot run one input of shape {tuple(x.shape[1:])} and dtype "
            f"{str(x.dtype).removeprefix('torch.')} ({str(err).splitlines()[0]}): give the input shape and dtype "
            "the model takes"
        ) from err
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found


def _payload_bytes(payload: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in payload.values())


def submodel_costs(
    pm: PrincipalModel, sub: SubModel, example: torch.Tensor | Sequence[int], batch_size: int | None = None
) -> CostReport:
    """Costs of ``sub`` next to the dense model of ``pm`` for one input: the first sample of the batch
    ``example``, or zeros of the shape ``example`` in the dense model's :func:`input_dtype`. With
    ``batch_size``, also the training memory: the bytes a forward on ``batch_size`` copies of that input
    holds for backward, for ``sub`` trained with ``pm.config.activation_memory`` and for the dense model
    with plain autograd."""
    dense_model = pm.dense_model()
    x = _example_batch(dense_model, example)
    dense = layer_costs(dense_model, x)
    small = layer_costs(sub.module, x)
    memory = {}
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid: allowed an integer >= 1")
        batch = x.expand(batch_size, *x.shape[1:]).clone()
        mode = pm.config.activation_memory
        memory = {"batch_size": batch_size, "activation_memory": mode,
                  "activation_bytes": activation_bytes(copy.deepcopy(sub.module), batch, mode),
                  "dense_activation_bytes": activation_bytes(copy.deepcopy(dense_model), batch, "full")}
    layers = []
    for name, (kind, params, macs) in dense.items():
        sub_kind, sub_params, sub_macs = small.get(name, (kind, 0, 0))
        layers.append(LayerCost(name, sub_kind, sub_params, sub_macs, params, macs))
    dense_bytes = sum(t.numel() * t.element_size() for t in dense_model.state_dict().values())
    if pm.momentum:  # optimizer_state: aggregate — full FedAvg would send its momentum buffers too
        dense_bytes += sum(p.numel() * p.element_size() for p in dense_model.parameters())
    return CostReport(
        strategy=sub.strategy,
        keep_ratio=sub.keep_ratio,
        input_shape=tuple(x.shape[1:]),
        input_dtype=str(x.dtype).removeprefix("torch."),
        params=sum(p.numel() for p in sub.module.parameters()),
        macs=sum(c[2] for c in small.values()),
        bytes_down=_payload_bytes(sub.to_payload("down")),
        bytes_up=_payload_bytes(sub.to_payload("up")),
        dense_params=sum(p.numel() for p in dense_model.parameters()),
        dense_macs=sum(c[2] for c in dense.values()),
        dense_bytes=dense_bytes,
        layers=layers,
        **memory,
    )


def format_costs(report: CostReport) -> str:
    """A short human-readable table."""
    r = report.ratios
    lines = [
        f"strategy={report.strategy} keep_ratio={report.keep_ratio} input={report.input_shape} {report.input_dtype}",
        f"{'':12}{'sub-model':>14}{'dense':>14}{'ratio':>8}",
        f"{'params':12}{report.params:>14,}{report.dense_params:>14,}{r['params']:>8.1%}",
        f"{'MACs':12}{report.macs:>14,}{report.dense_macs:>14,}{r['macs']:>8.1%}",
        f"{'bytes down':12}{report.bytes_down:>14,}{report.dense_bytes:>14,}{r['bytes_down']:>8.1%}",
        f"{'bytes up':12}{report.bytes_up:>14,}{report.dense_bytes:>14,}{r['bytes_up']:>8.1%}",
    ]
    if report.activation_bytes is not None:
        lines.append(
            f"{'train mem':12}{report.activation_bytes:>14,}{report.dense_activation_bytes:>14,}"
            f"{r['activation_bytes']:>8.1%}  activation bytes held for backward at batch {report.batch_size} "
            f"(sub-model: activation_memory {report.activation_memory}; dense: plain autograd)"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop lines) for the block."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def activation_bytes(module: nn.Module, x: torch.Tensor, activation_memory: str = "principal") -> int:
    """Bytes a training forward pass (model and cross-entropy loss on batch ``x``) leaves allocated
    for the backward pass: every tensor autograd keeps, the recomputation's checkpoints and kept
    outputs included, counted by the allocator (``torch.cuda.memory_allocated`` on CUDA, the
    profiler's memory events on the CPU); the backward pass then runs and frees them. ``module``
    trains (gradients accumulate); pass a copy to keep it untouched. One untimed step runs first, so
    what kernels cache on a shape's first use is not counted as held."""
    module.train()
    cuda = x.device.type == "cuda"
    with principal_width(module, activation_memory == "principal"), _no_gc():
        _cross_entropy(module(x)).backward()
        if cuda:
            torch.cuda.synchronize(x.device)
            before = torch.cuda.memory_allocated(x.device)
            out = module(x)
            held = torch.cuda.memory_allocated(x.device) - before
        else:
            from torch.profiler import ProfilerActivity, profile

            with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = module(x)
            held = sum(e.self_cpu_memory_usage for e in prof.events())
        held -= out.numel() * out.element_size()  # the output itself is not kept for backward
        _cross_entropy(out).backward()
    return int(held)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Collect garbage first and pause the collector, so tensors of unrelated objects freed by a
    collection during the counted forward do not count against it."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _cross_entropy(out: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits ``(N, C, ...)`` against class 0 everywhere (any label costs the same)."""
    return F.cross_entropy(out, torch.zeros(out.shape[0], *out.shape[2:], dtype=torch.long, device=out.device))
