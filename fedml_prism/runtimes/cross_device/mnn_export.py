"""Sub-models as MNN graphs, for FedML's cross-device (Beehive) devices, and back.

A device of FedML's Android SDK loads the ``.mnn`` file it is sent, makes every weight of its
convolution / matrix-multiply ops trainable (``NN::extract(inputs, outputs, true)``), trains them with
MNN's SGD on ``_CrossEntropy(output, one_hot)``, and uploads the graph it saves. So what the device
trains is decided by how the graph is written. :func:`export_submodel` writes a PriSM sub-model so
that the device trains exactly the sub-model's parameters:

- a principal layer becomes ``conv(x, V_I)`` → ``· σ_I`` (a constant per channel) → ``1×1 conv(U_I) + b``:
  ``U_I`` and ``V_I`` are conv weights (trained), ``σ_I`` a constant (frozen, as in PriSM);
- static BatchNorm becomes its batch-statistics normalization in elementary ops followed by a
  depthwise 1×1 convolution holding the affine weight and bias, so MNN trains them (MNN's own
  BatchNorm op stops gradients in MNN 3.6 and its Mul/Add constants are not trainable);
- ONNX ``Flatten`` and ``GlobalAveragePool`` are rewritten to ``Reshape`` and ``ReduceMean``: MNN 3.6
  has no gradient through its versions of the two, so nothing before them would train;
- the output is ``softmax`` (MNN's cross entropy takes probabilities, as the SDK's models give).

MNN's converter gives every convolution a bias; the ones PyTorch does not have (``v_bias`` of the
first factor, biases of bias-free layers) are zero when sent and trained on the device. On return a
first-factor bias is folded into the layer bias (``b += U_I σ_I v_b``, exact) and the others are
dropped, which is exact when batch-statistics BN follows (every bias-free conv of the built-in
models) because BN removes any per-channel constant.

MNN's graph parameters have no names and come back in graph order, so :func:`export_submodel` also
converts a *probe* copy of the same graph whose tensors hold distinct random values and matches
MNN's parameters to state-dict keys by value; the map is cached per architecture (ranks and shapes).

A trained graph comes back from a device: :func:`read_trained` has it parsed by a child process
with a time and memory limit (:mod:`fedml_prism.runtimes.cross_device.mnn_sandbox`) and gets plain float32 arrays back.

``MNN`` is imported on first use (``pip install MNN``; 3.x). ``MNN.tools`` is never imported: its
usage logger runs ``pip install aliyun-log-python-sdk`` and posts to a remote log service at import
(``MNN/tools/utils/log.py``); the converter is called through ``_tools.mnnconvert`` directly.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...engine.layers import PrincipalConv2d, PrincipalLayer, PrincipalLinear
from .mnn_sandbox import ParseLimits, read_isolated
from .mnn_sandbox_child import INPUT, OUTPUT, graph_module

log = logging.getLogger("fedml_prism")

V_BIAS = ".v_bias"
OPSET = 13


def _mnn():
    try:
        import MNN
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("the MNN package is needed for cross-device export: pip install MNN") from err
    return MNN


# ---------------------------------------------------------------------------------- export form
class _ExportPrincipal(nn.Module):
    """A principal layer as three ops MNN keeps apart: factor V (conv or matmul), ·σ, factor U."""

    def __init__(self, layer: PrincipalLayer) -> None:
        super().__init__()
        self.conv = isinstance(layer, PrincipalConv2d)
        if self.conv:
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
            self.padding_mode = layer.padding_mode
        self.u, self.v = layer.u, layer.v
        self.bias = layer.bias if layer.bias is not None else nn.Parameter(torch.zeros(layer.u.shape[0]))
        self.register_buffer("sigma", layer.sigma.detach().clone())
        self.register_buffer("v_bias", torch.zeros(layer.rank))

    def forward(self, x: Tensor) -> Tensor:
        if not self.conv:
            return F.linear(F.linear(x, self.v, self.v_bias) * self.sigma, self.u, self.bias)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, [p for p in reversed(self.padding) for _ in range(2)], mode=self.padding_mode)
            padding = (0, 0)
        h = F.conv2d(x, self.v, self.v_bias, self.stride, padding, self.dilation) * self.sigma.view(1, -1, 1, 1)
        return F.conv2d(h, self.u.view(*self.u.shape, 1, 1), self.bias)


class _ExportBatchNorm(nn.Module):
    """Batch-statistics BatchNorm (training semantics; static BN's in evaluation too), affine part
    as a depthwise 1×1 convolution. Running statistics, if any, stay as unused buffers."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"{type(bn).__name__} cannot be exported to MNN: only BatchNorm2d is supported")
        self.eps = bn.eps
        c = bn.num_features
        self.weight = bn.weight if bn.affine else nn.Parameter(torch.ones(c))
        self.bias = bn.bias if bn.affine else nn.Parameter(torch.zeros(c))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(bn, name, None) is not None:
                self.register_buffer(name, getattr(bn, name))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        d = x - mean
        var = (d * d).mean(dim=(0, 2, 3), keepdim=True)
        c = self.weight.shape[0]
        return F.conv2d(d / torch.sqrt(var + self.eps), self.weight.view(c, 1, 1, 1), self.bias, groups=c)


class _WithBias(nn.Module):
    """A bias-free Conv2d / Linear with an explicit zero bias (MNN's converter adds one anyway)."""

    def __init__(self, module: nn.Conv2d | nn.Linear) -> None:
        super().__init__()
        self.conv = isinstance(module, nn.Conv2d)
        if self.conv:
            self.stride, self.padding, self.dilation = module.stride, module.padding, module.dilation
            self.groups, self.padding_mode = module.groups, module.padding_mode
            self.pad = module._reversed_padding_repeated_twice
        self.weight = module.weight
        self.bias = nn.Parameter(torch.zeros(module.weight.shape[0]))

    def forward(self, x: Tensor) -> Tensor:
        if not self.conv:
            return F.linear(x, self.weight, self.bias)
        if self.padding_mode != "zeros":
            return F.conv2d(F.pad(x, self.pad, mode=self.padding_mode), self.weight, self.bias, self.stride, 0,
                            self.dilation, self.groups)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _Softmax(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.net(x), dim=1)


def export_form(module: nn.Module) -> tuple[nn.Module, set[str], dict[str, bool]]:
    """The module as it is written to ONNX for MNN (see the module docstring).

    Returns ``(form, extras, principal)``: state keys (prefixed ``net.``) that the original module does
    not have, and ``{principal layer: has its own bias}``."""
    net = copy.deepcopy(module).train()
    extras: set[str] = set()
    principal: dict[str, bool] = {}
    for name, child in list(net.named_modules()):
        if not name:
            continue
        if isinstance(child, (PrincipalConv2d, PrincipalLinear)):
            principal[name] = child.bias is not None
            extras.add(f"net.{name}{V_BIAS}")
            if child.bias is None:
                extras.add(f"net.{name}.bias")
            replacement: nn.Module = _ExportPrincipal(child)
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):
            replacement = _ExportBatchNorm(child)
        elif isinstance(child, (nn.Conv2d, nn.Linear)) and child.bias is None:
            extras.add(f"net.{name}.bias")
            replacement = _WithBias(child)
        else:
            continue
        _replace(net, name, replacement)
    form = _Softmax(net)
    return form, extras, principal


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


# ---------------------------------------------------------------------------------- conversion
def _convert(form: nn.Module, input_shape: tuple[int, ...], path: str) -> None:
    import onnx

    onnx_path = path + ".onnx"
    example = torch.zeros(2, *input_shape)
    with torch.no_grad(), warnings_quiet():
        torch.onnx.export(
            form, (example,), onnx_path, dynamo=False, input_names=[INPUT], output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, do_constant_folding=False,
            opset_version=OPSET,
        )
    graph = onnx.load(onnx_path)
    _rewrite_for_training(graph.graph)
    onnx.save(graph, onnx_path)
    import _tools  # MNN's converter, without MNN.tools (see the module docstring)

    _mnn()
    args = ["mnnconvert", "-f", "ONNX", "--modelFile", onnx_path, "--MNNModel", path, "--bizCode", "fedml_prism",
            "--forTraining"]
    with _stdout_to_log():
        ok = _tools.mnnconvert(args)
    os.remove(onnx_path)
    if not ok or not os.path.exists(path):
        raise RuntimeError(f"MNN converter failed on {onnx_path} (see the log for its output)")


def _rewrite_for_training(graph) -> None:
    """Replace ONNX ops whose MNN 3.6 counterparts have no gradient (nothing upstream would train):
    ``Flatten(axis=a)`` → ``Reshape([0]*a + [-1])``; ``GlobalAveragePool`` → ``ReduceMean(axes=2,3)``."""
    import numpy as np
    from onnx import helper, numpy_helper

    for i, node in enumerate(list(graph.node)):
        if node.op_type == "Flatten":
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if axis < 1:
                raise ValueError(f"ONNX node {node.name!r}: Flatten(axis={axis}) cannot be exported for MNN training")
            shape_name = f"{node.output[0]}__shape"
            graph.initializer.append(numpy_helper.from_array(np.array([0] * axis + [-1], dtype=np.int64), shape_name))
            new = helper.make_node("Reshape", [node.input[0], shape_name], list(node.output), name=node.name)
        elif node.op_type == "GlobalAveragePool":
            new = helper.make_node("ReduceMean", [node.input[0]], list(node.output), name=node.name, axes=[2, 3],
                                   keepdims=1)
        else:
            continue
        graph.node.remove(node)
        graph.node.insert(i, new)


@contextlib.contextmanager
def warnings_quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _stdout_to_log():
    """MNN's C++ converter prints to fd 1: send it to the debug log instead of the user's terminal."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace").strip()
            if text:
                log.debug("MNN converter: %s", text)


# ---------------------------------------------------------------------------------- graphs
def load_module(path: str, for_training: bool = True):
    """An MNN module from a graph file the server made, with its parameters exposed (in this process:
    uploaded graphs are read by :func:`read_trained`, in a child process).

    Workaround for FedML 0.9.6 ``cross_device/server_mnn/utils.py:18`` (``load_module(..., False)``):
    under MNN 3.x a module loaded with ``for_training=False`` has no parameters, so FedML reads and
    writes none. Input: the graph's only input (or ``data``); output: ``prob`` (or the only output).
    """
    return graph_module(_mnn(), path, for_training)


def read_parameters(path: str) -> list:
    """The graph's parameters as numpy arrays, in MNN's order."""
    import numpy as np

    return [np.array(p.read(), dtype=np.float32).copy() for p in load_module(path, True).parameters]


@dataclass
class MnnGraph:
    """An exported sub-model: the file, the state key of each MNN parameter, and what is needed to
    map a trained copy of the graph back onto the sub-model's payload."""

    path: str
    keys: list[str]
    shapes: dict[str, torch.Size]
    principal: dict[str, bool]
    sigma: dict[str, Tensor] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()


class MnnExporter:
    """Writes sub-models as MNN graphs; caches the parameter map per architecture."""

    def __init__(self, input_shape: Iterable[int], seed: int = 0) -> None:
        self.input_shape = tuple(int(d) for d in input_shape)
        self.seed = seed
        self._maps: dict[tuple, list[str]] = {}

    def export(self, module: nn.Module, path: str) -> MnnGraph:
        """Write ``module`` (a sub-model or a dense model) to ``path`` as an MNN training graph."""
        form, extras, principal = export_form(module)
        state = form.state_dict()
        signature = tuple((k, tuple(v.shape)) for k, v in state.items())
        if signature not in self._maps:
            self._maps[signature] = self._probe(form, state, module, path)
        _convert(form, self.input_shape, path)
        keys = self._maps[signature]
        sigma = {name: state[f"net.{name}.sigma"].detach().clone() for name in principal}
        shapes = {k: state[k].shape for k in keys}
        return MnnGraph(path, keys, shapes, principal, sigma, self.input_shape)

    def _probe(self, form: nn.Module, state: Mapping[str, Tensor], module: nn.Module, path: str) -> list[str]:
        import numpy as np

        probe = copy.deepcopy(form)
        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for tensor in probe.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
        values = {k: v.detach().numpy().ravel() for k, v in probe.state_dict().items() if v.is_floating_point()}
        probe_path = path + ".probe"
        _convert(probe, self.input_shape, probe_path)
        try:
            params = read_parameters(probe_path)
        finally:
            os.remove(probe_path)
        keys = []
        for i, arr in enumerate(params):
            flat = arr.ravel()
            hits = [k for k, v in values.items() if v.size == flat.size and np.allclose(v, flat, rtol=1e-6, atol=1e-7)]
            if len(hits) != 1:
                raise RuntimeError(f"MNN parameter #{i} (shape {list(arr.shape)}) matches {hits or 'no'} state "
                                   "entries: the exported graph cannot be mapped back")
            keys.append(hits[0])
        trainable = {f"net.{k}" for k, _ in module.named_parameters()}
        missing = sorted(trainable - set(keys))
        if missing:
            raise RuntimeError(f"parameters {missing[:5]} are not trainable in the MNN graph (folded by the converter)")
        return keys


def read_trained(path: str, graph: MnnGraph, sent: Mapping[str, Tensor],
                 limits: ParseLimits | None = None) -> OrderedDict[str, Tensor]:
    """The ``up`` payload of a trained copy of ``graph``: ``sent`` (the sub-model's ``up`` payload as
    sent) with every parameter the device trained replaced by its trained value.

    The file is a device's upload: it is parsed in a child process with ``limits``
    (:func:`~fedml_prism.runtimes.cross_device.mnn_sandbox.read_isolated`). ``ValueError`` (an
    :class:`~fedml_prism.runtimes.cross_device.mnn_sandbox.UnreadableGraph` for parser failures) names what is wrong: another
    number of parameters or of values than the graph sent, or non-finite values."""
    params = read_isolated(path, [tuple(graph.shapes[k]) for k in graph.keys], limits)
    values: dict[str, Tensor] = {}
    for key, arr in zip(graph.keys, params, strict=True):
        value = torch.from_numpy(arr).reshape(graph.shapes[key])
        if not torch.isfinite(value).all():
            raise ValueError(f"parameter {key[len('net.'):]!r} has non-finite values")
        values[key[len("net."):]] = value
    for name, has_bias in graph.principal.items():
        v_bias = values.pop(name + V_BIAS)
        if has_bias:  # U σ (V x + v_b) + b  =  U σ V x + (b + U σ v_b)
            values[name + ".bias"] = values[name + ".bias"] + (values[name + ".u"] * graph.sigma[name]) @ v_bias
    out = OrderedDict((k, v.clone()) for k, v in sent.items())
    for key, value in values.items():
        if key in out and not key.startswith("prism::"):
            out[key] = value.to(out[key].dtype)
    return out


# ---------------------------------------------------------------------------------- on the device
def train_graph(
    path: str,
    batches: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    learning_rate: float,
    momentum: float = 0.1,
    epochs: int = 1,
) -> tuple[int, float]:
    """Train an MNN graph in place as the Android SDK's trainer does (``FedMLMNNTrainer.cpp``): SGD
    (momentum 0.1, no weight decay), ``cross_entropy(prob, one_hot)``, then save the graph from a
    ``[1, C, H, W]`` NC4HW4 placeholder named ``data`` with output ``prob`` in training mode.

    Expression evaluation must be lazy for MNN's Python optimizer to see the graph: with MNN 3.6's
    default (eager) mode ``SGD.step`` finds no gradient and returns ``False``. Returns ``(samples seen
    in one epoch, mean loss of the last epoch)``.
    """
    import numpy as np

    mnn = _mnn()
    expr = mnn.expr
    expr.lazy_eval(True)
    module = load_module(path, True)
    optimizer = mnn.optim.SGD(module, float(learning_rate), float(momentum), 0.0)
    module.train(True)
    batches = list(batches)
    samples, losses = 0, []
    for _ in range(epochs):
        samples, losses = 0, []
        for x, y in batches:
            xs = expr.const(x.numpy().astype(np.float32), list(x.shape), expr.NCHW)
            target = expr.one_hot(expr.const(y.numpy().astype(np.int32), [len(y)], expr.NCHW, expr.int),
                                  num_classes, 1.0, 0.0)
            loss = mnn.nn.loss.cross_entropy(module.forward(xs), target)
            if not optimizer.step(loss):
                raise RuntimeError(f"{path}: MNN's optimizer found no trainable parameter")
            losses.append(float(np.array(loss.read())))
            samples += len(y)
    shape = [1, *batches[0][0].shape[1:]] if batches else [1]
    placeholder = expr.placeholder(shape, expr.NC4HW4)
    placeholder.name = INPUT
    prob = module.forward(placeholder)
    prob.name = OUTPUT
    expr.save([prob], path)
    return samples, float(np.mean(losses)) if losses else float("nan")


def _forward(module, x: Tensor) -> Tensor:
    import numpy as np

    expr = _mnn().expr
    out = module.forward(expr.const(x.numpy().astype(np.float32), list(x.shape), expr.NCHW))
    return torch.from_numpy(np.array(out.read(), dtype=np.float32).copy())


def predict(path: str, x: Tensor, training: bool = True) -> Tensor:
    """The graph's output (probabilities) on ``x``; ``training`` selects MNN's training mode (batch
    statistics, as static BN uses)."""
    module = load_module(path, True)
    module.train(training)
    return _forward(module, x)


def evaluate_graph(path: str, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of a graph on labelled batches.

    Stands in for FedML 0.9.6 ``cross_device/server_mnn/fedml_aggregator.py:255`` (``loss.read()`` on
    an integer one-hot loss fails under MNN 3.x): the loss is computed here from the probabilities."""
    module = load_module(path, True)
    module.train(True)
    correct = total = 0
    nll = 0.0
    for x, y in batches:
        prob = _forward(module, x)
        correct += int((prob.argmax(1) == y).sum())
        nll += float(-torch.log(prob.gather(1, y.view(-1, 1)).clamp_min(1e-12)).sum())
        total += len(y)
    return (correct / total, nll / total) if total else (float("nan"), float("nan"))
