"""The built-in datasets are batched by indexing their tensors (``TensorBatches``): the batches must be
the ones ``DataLoader(shuffle=True, generator=g)`` gives, bit for bit, pass after pass."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedml_prism.engine.config import RunSettings
from fedml_prism.engine.rounds import TensorBatches, client_batches


@pytest.mark.parametrize("n, batch", [(50, 8), (48, 8), (5, 32)])
def test_tensor_batches_equal_the_data_loaders_over_several_passes(n: int, batch: int) -> None:
    data = TensorDataset(torch.randn(n, 3, 4, 4), torch.randint(0, 10, (n,)))
    ours = TensorBatches(data, batch, torch.Generator().manual_seed(7))
    loader = DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(7))
    for _ in range(3):  # each pass draws from the same generator: the passes must stay in step
        got, want = list(ours), list(loader)
        assert len(got) == len(want) == len(ours)
        for (x, y), (wx, wy) in zip(got, want, strict=True):
            assert torch.equal(x, wx) and torch.equal(y, wy) and y.dtype == wy.dtype


def test_client_batches_with_augmentation_equal_the_data_loader_path() -> None:
    """Any dataset that is not exactly a ``TensorDataset`` goes through a DataLoader: both paths give
    the same augmented batches for the same (seed, round, client)."""

    class Wrapped(TensorDataset):
        pass

    x, y = torch.randn(40, 3, 8, 8), torch.randint(0, 10, (40,))
    settings = RunSettings(batch_size=16, augment="flip_crop")
    fast = client_batches(TensorDataset(x, y), settings, seed=3, round_idx=2, client_id=5)
    slow = client_batches(Wrapped(x, y), settings, seed=3, round_idx=2, client_id=5)
    assert isinstance(fast.loader, TensorBatches) and isinstance(slow.loader, DataLoader)
    for (a, b), (c, d) in zip(list(fast) + list(fast), list(slow) + list(slow), strict=True):  # two passes
        assert torch.equal(a, c) and torch.equal(b, d)
