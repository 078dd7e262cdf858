"""A tiny CNN and seeded client data for the engine's unit tests (training details, variants)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedml_prism.workloads.models import cnn


def small_model() -> nn.Module:
    """The 8×8 grey CNN with a 24-unit hidden Linear, seeded."""
    torch.manual_seed(0)
    return cnn(num_classes=4, in_channels=1, image_size=8, width=0.25, hidden=24)


def client_data(n_clients: int) -> dict[int, TensorDataset]:
    """``n_clients`` clients of 12 random 8×8 images with 4 classes, seeded."""
    g = torch.Generator().manual_seed(5)
    return {c: TensorDataset(torch.randn(12, 1, 8, 8, generator=g), torch.randint(0, 4, (12,), generator=g))
            for c in range(n_clients)}
