"""Tiny CPU models shared by the engine tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedml_prism.workloads.models import char_lstm, cnn, lstm_imdb, resnet_tiny, vit_small


def _conv(kernel: int | tuple[int, int], stride: int = 1, padding: int = 0, dilation: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(4, 12, kernel, stride, padding, dilation),
        nn.ReLU(),
        nn.Flatten(),
    )


# name -> (factory, input shape of one sample)
TINY_MODELS = {
    "conv3x3": (lambda: _conv(3, padding=1), (4, 9, 9)),
    "conv5x5_stride2": (lambda: _conv(5, stride=2, padding=2), (4, 9, 9)),
    "conv3x3_dilation2": (lambda: _conv(3, padding=2, dilation=2), (4, 9, 9)),
    "conv_rect_1x3": (lambda: _conv((1, 3), padding=0), (4, 9, 9)),
    "linear": (lambda: nn.Sequential(nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 6)), (10,)),
    "tiny_cnn": (lambda: cnn(num_classes=4, in_channels=1, image_size=12, width=0.125, hidden=16), (1, 12, 12)),
    "tiny_resnet": (lambda: resnet_tiny(num_classes=4, width=0.125), (3, 8, 8)),
    "tiny_vit": (lambda: vit_small(image_size=8, patch=4, dim=16, depth=1, heads=2, num_classes=4), (3, 8, 8)),
}
# sequence models take token ids: name -> (factory, vocabulary size, sequence length)
TINY_SEQUENCE_MODELS = {
    "tiny_lstm_imdb": (lambda: lstm_imdb(vocab_size=30, embed_dim=8, hidden=12), 31, 7),
    "tiny_char_lstm": (lambda: char_lstm(vocab_size=15, embed_dim=4, hidden=12), 15, 9),
}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny(request: pytest.FixtureRequest) -> tuple[str, nn.Module, torch.Tensor]:
    """(name, model, a batch of 6 inputs) with fixed seeds."""
    factory, shape = TINY_MODELS[request.param]
    torch.manual_seed(0)
    model = factory()
    return request.param, model, torch.randn(6, *shape, generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=sorted(TINY_SEQUENCE_MODELS))
def tiny_sequence(request: pytest.FixtureRequest) -> tuple[str, nn.Module, torch.Tensor]:
    """(name, model, a batch of 6 token sequences, id 0 never used so no position is padding)."""
    factory, vocab, steps = TINY_SEQUENCE_MODELS[request.param]
    torch.manual_seed(0)
    return request.param, factory(), torch.randint(1, vocab, (6, steps), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: on a shared two-core machine two threads spin against each other
    (steps of tiny models up to 100x slower); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
