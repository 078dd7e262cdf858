"""The in-memory form every loader returns, and the image normalization the image loaders share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Arrays:
    """A dataset as whole tensors; ``natural_clients[i]`` indexes ``x_train`` rows of natural client ``i``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    natural_clients: list[np.ndarray] | None = None


def normalize_images(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 N×C×H×W → float32, scaled to [0, 1] then normalized per channel."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    x.div_(torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
    return x
