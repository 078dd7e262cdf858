"""Built-in models (the paper's architectures, with width options for CPU runs) and a resolver for
``NAME`` or ``package.module:callable`` so users can bring their own model."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """ResNet basic block; the shortcut is a 1×1 conv + BN when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        return (out + self.shortcut(x)).relu()


class ResNetCifar(nn.Module):
    """ResNet for 32×32 inputs (paper Table 2): 3×3 stride-1 first conv, no max-pool."""

    def __init__(
        self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3, width: float = 1.0
    ) -> None:
        super().__init__()
        planes = [max(1, round(p * width)) for p in (64, 128, 256, 512)][: len(blocks)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        layers, in_planes = [], planes[0]
        for i, (n, p) in enumerate(zip(blocks, planes, strict=True)):
            stage = []
            for j in range(n):
                stage.append(BasicBlock(in_planes, p, 2 if (i > 0 and j == 0) else 1))
                in_planes = p
            layers.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(self.bn1(self.conv1(x)).relu())
        return self.linear(self.pool(out).flatten(1))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNetCifar:
    """ResNet-18 of the paper (11.2 M parameters at width 1)."""
    return ResNetCifar((2, 2, 2, 2), num_classes, in_channels, width)


def resnet_tiny(num_classes: int = 10, in_channels: int = 3, width: float = 0.25) -> ResNetCifar:
    """A two-stage, one-block-per-stage ResNet for tests and quick runs."""
    return ResNetCifar((1, 1), num_classes, in_channels, width)


class CNN(nn.Module):
    """Paper Table 3: conv 5×5 (64) → pool → conv 3×3 (64) → pool → linear; grey or RGB input.

    ``hidden`` adds a hidden Linear before the classifier (factorizable), ``width`` scales channels.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        width: float = 1.0,
        hidden: int = 0,
    ) -> None:
        super().__init__()
        c = max(1, round(64 * width))
        self.conv1 = nn.Conv2d(in_channels, c, 5, padding=2)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.pool = nn.MaxPool2d(2)
        feat = c * (image_size // 4) ** 2
        self.hidden = nn.Linear(feat, hidden) if hidden else None
        self.fc = nn.Linear(hidden or feat, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.bn1(self.conv1(x)).relu())
        x = self.pool(self.bn2(self.conv2(x)).relu())
        x = x.flatten(1)
        if self.hidden is not None:
            x = self.hidden(x).relu()
        return self.fc(x)


def cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: float = 1.0, hidden: int = 0) -> CNN:
    """The paper's FEMNIST CNN (Table 3)."""
    return CNN(num_classes, in_channels, image_size, width, hidden)


class LSTMLayer(nn.Module):
    """One LSTM layer whose input-to-hidden (``ih``, 4H × in) and hidden-to-hidden (``hh``, 4H × H)
    matrices are ``nn.Linear`` modules, so PriSM can put both in principal form and a client's layer
    is physically smaller (``nn.LSTM`` keeps them in one fused kernel that cannot be factorized).
    Gate order i, f, g, o as in ``nn.LSTM``."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.ih = nn.Linear(input_size, 4 * hidden_size)
        self.hh = nn.Linear(hidden_size, 4 * hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, steps, _ = x.shape
        gates_x = self.ih(x)  # every time step at once
        h = x.new_zeros(batch, self.hidden_size)
        c = x.new_zeros(batch, self.hidden_size)
        outputs = []
        for t in range(steps):
            i, f, g, o = (gates_x[:, t] + self.hh(h)).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=1)


class LSTMStack(nn.Module):
    """Embedding then ``layers`` :class:`LSTMLayer` s; the base of the IMDB and Shakespeare models."""

    def __init__(self, vocab_rows: int, embed_dim: int, hidden: int, layers: int, padding_idx: int | None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_rows, embed_dim, padding_idx=padding_idx)
        dims = [embed_dim] + [hidden] * layers
        self.lstm = nn.ModuleList(LSTMLayer(dims[i], dims[i + 1]) for i in range(layers))

    def encode(self, x: Tensor) -> Tensor:
        h = self.embedding(x)
        for layer in self.lstm:
            h = layer(h)
        return h


class LSTMClassifier(LSTMStack):
    """Paper Table 4 (IMDB): embedding (vocab+1) × 64 → 2 LSTM layers of 256 → linear.

    The paper's head is 256 → 1 with a sigmoid; here it is 256 → ``num_classes`` with softmax
    cross-entropy (the same model for 2 classes). Sequences are right-padded with id 0; the last
    non-padding step's state is classified."""

    def __init__(self, vocab_size: int = 1000, embed_dim: int = 64, hidden: int = 256, layers: int = 2,
                 num_classes: int = 2) -> None:
        super().__init__(vocab_size + 1, embed_dim, hidden, layers, padding_idx=0)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encode(x)
        last = (x != 0).sum(1).clamp_min(1) - 1
        return self.fc(h[torch.arange(len(x)), last])


def lstm_imdb(vocab_size: int = 1000, embed_dim: int = 64, hidden: int = 256, layers: int = 2,
              num_classes: int = 2) -> LSTMClassifier:
    """The paper's IMDB LSTM (Table 4); shrink ``hidden`` for CPU runs."""
    return LSTMClassifier(vocab_size, embed_dim, hidden, layers, num_classes)


class CharLSTM(LSTMStack):
    """Next-character model for Shakespeare (FedML/TFF's: embedding 8 → 2 LSTM layers of 256 → linear).
    Returns logits as ``(batch, vocab, time)`` so ``F.cross_entropy(logits, targets)`` applies."""

    def __init__(self, vocab_size: int = 90, embed_dim: int = 8, hidden: int = 256, layers: int = 2) -> None:
        super().__init__(vocab_size, embed_dim, hidden, layers, padding_idx=None)
        self.fc = nn.Linear(hidden, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.encode(x)).transpose(1, 2)


def char_lstm(vocab_size: int = 90, embed_dim: int = 8, hidden: int = 256, layers: int = 2) -> CharLSTM:
    return CharLSTM(vocab_size, embed_dim, hidden, layers)


class Block(nn.Module):
    """Pre-norm transformer block: attention (``qkv``, ``proj``) and MLP (``fc1``, ``fc2``) are
    ``nn.Linear`` modules, all factorizable."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(att)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A small Vision Transformer (the journal version of PriSM trains DeiT-tiny). The patch
    embedding (a conv on raw pixels) and the head stay dense by the default rule."""

    def __init__(self, image_size: int = 32, patch: int = 4, in_channels: int = 3, num_classes: int = 10,
                 dim: int = 192, depth: int = 6, heads: int = 3, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if image_size % patch or dim % heads:
            raise ValueError(f"ViT: image_size={image_size} must be divisible by patch={patch} "
                             f"and dim={dim} by heads={heads}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        tokens = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_small(image_size: int = 32, patch: int = 4, in_channels: int = 3, num_classes: int = 10, dim: int = 192,
              depth: int = 6, heads: int = 3, mlp_ratio: float = 4.0) -> ViT:
    """DeiT-tiny-like ViT for 32×32 inputs (dim 192, depth 6, 3 heads by default)."""
    return ViT(image_size, patch, in_channels, num_classes, dim, depth, heads, mlp_ratio)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18_cifar": resnet18_cifar,
    "resnet_tiny": resnet_tiny,
    "cnn": cnn,
    "lstm_imdb": lstm_imdb,
    "char_lstm": char_lstm,
    "vit_small": vit_small,
}


def resolve_callable(spec: str) -> Callable[..., Any]:
    """``package.module:callable`` → the callable (clear errors for each failure)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model {spec!r} is neither a built-in ({', '.join(MODELS)}) nor 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {spec!r}: cannot import {module_name!r}: {err}") from err
    try:
        target = getattr(module, attr)
    except AttributeError as err:
        raise ValueError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}") from err
    if not callable(target):
        raise ValueError(f"model {spec!r}: {attr!r} is not callable")
    return target


INIT_SCHEMES = ("default", "kaiming_fan_out")
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def check_init_scheme(scheme: str) -> None:
    """Raise ValueError naming ``model_init`` unless ``scheme`` is one of :data:`INIT_SCHEMES`."""
    if not isinstance(scheme, str) or scheme not in INIT_SCHEMES:
        raise ValueError(f"model_init={scheme!r} is invalid: allowed {', '.join(INIT_SCHEMES)}")


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str = "default") -> nn.Module:
    """Re-initialise ``model`` in place by ``scheme`` and return it.

    - ``default``: PyTorch's own initialisation, untouched.
    - ``kaiming_fan_out``: as the PriSM authors' ResNets: every ``nn.Conv2d`` weight
      ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` and bias 0, every BatchNorm weight 1
      and bias 0; ``nn.Linear`` keeps PyTorch's default.

    Draws come from the global torch RNG, so ``torch.manual_seed`` makes the result reproducible.
    """
    check_init_scheme(scheme)
    if scheme == "default":
        return model
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, _BATCH_NORMS) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def create_model(name: str, init: str = "default", **kwargs: Any) -> nn.Module:
    """A built-in model by name, or ``package.module:callable(**kwargs)``, initialised by ``init``
    (one of :data:`INIT_SCHEMES`, see :func:`init_weights`)."""
    check_init_scheme(init)
    factory = MODELS.get(name) or resolve_callable(name)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} returned a {type(model).__name__}, not an nn.Module")
    return init_weights(model, init)
