"""Built-in models (the paper's architectures, with width options for CPU runs) and a resolver for
``NAME`` or ``package.module:callable`` so users can bring their own model."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

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


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18_cifar": resnet18_cifar,
    "resnet_tiny": resnet_tiny,
    "cnn": cnn,
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


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """A built-in model by name, or ``package.module:callable(**kwargs)``."""
    factory = MODELS.get(name) or resolve_callable(name)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} returned a {type(model).__name__}, not an nn.Module")
    return model
