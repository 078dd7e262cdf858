"""``parallel_clients: vectorized``: a round's clients trained as one batched computation give the
sequential path's aggregate within 1e-5 (float32 rounding; later rounds' SVD refreshes amplify it), for
every strategy, with either optimizer state, several epochs and augmentation; what cannot be batched falls
back to the sequential path and says why."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from fedml_prism.engine import vectorized
from fedml_prism.engine.config import PrismConfig, RunSettings
from fedml_prism.engine.server import PrismClient, PrismServer
from fedml_prism.engine.vectorized import problem, train_together
from fedml_prism.workloads.models import create_model

CLIENTS = 6


@pytest.fixture
def batched_groups(monkeypatch) -> list[int]:
    """The sizes of the groups trained as one batched computation (a test asserts it happened)."""
    sizes: list[int] = []
    real = vectorized.train_together

    def spy(modules, batches, **kw):
        sizes.append(len(modules))
        return real(modules, batches, **kw)

    monkeypatch.setattr(vectorized, "train_together", spy)
    return sizes


def _round(cfg: PrismConfig, vectorized: bool, data: dict | None = None, model: str = "cnn",
           **settings_kw) -> tuple[dict[str, torch.Tensor], list[dict], PrismClient]:
    torch.manual_seed(0)
    net = create_model(model, **({"in_channels": 3, "image_size": 8, "width": 0.5, "hidden": 24, "num_classes": 10}
                                 if model == "cnn" else {"width": 0.125}))
    g = torch.Generator().manual_seed(3)
    data = data or {c: TensorDataset(torch.randn(20, 3, 8, 8, generator=g), torch.randint(0, 10, (20,), generator=g))
                    for c in range(CLIENTS)}
    settings = RunSettings(**{"comm_round": 1, "client_num_in_total": CLIENTS, "client_num_per_round": CLIENTS,
                              "batch_size": 8, "learning_rate": 0.05, **settings_kw})
    server, client = PrismServer(net, cfg, settings), PrismClient(net, cfg, settings, data)
    rows = []
    while not server.finished:
        bundles = server.bundles(CLIENTS)
        if vectorized:
            ups = client.train_bundles_vectorized(bundles)
        else:
            ups = {w: client.train_bundle(b) for w, b in bundles.items()}
        rows.append(server.close_round(server.updates_from_bundles(ups.values())))
    return server.pm.dense_model().state_dict(), rows, client


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), f"{key}: max diff {(a[key] - b[key]).abs().max():.2e}"


@pytest.mark.parametrize("strategy", ["prism", "uniform", "orthdrop", "origdrop", "rolex", "full"])
def test_a_vectorized_round_equals_the_sequential_round(strategy: str, batched_groups: list[int]) -> None:
    """The package default ``activation_memory: principal`` (selective recomputation) included: the
    batched group trains with plain autograd, the same loss and gradients."""
    cfg = PrismConfig(strategy=strategy, keep_ratio=0.3, optimizer_state="aggregate")
    assert cfg.activation_memory == "principal"
    seq, seq_rows, _ = _round(cfg, vectorized=False)
    assert batched_groups == []
    vec, vec_rows, _ = _round(cfg, vectorized=True)
    assert batched_groups == [CLIENTS]  # every client of the round in one batched group
    _assert_same(seq, vec)
    for a, b in zip(seq_rows, vec_rows, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
        assert b["clients"] == a["clients"] == CLIENTS


def test_reset_momentum_two_epochs_flip_crop_and_a_resnet_equal_the_sequential_path(batched_groups) -> None:
    cfg = PrismConfig(keep_ratio=0.25, optimizer_state="reset", activation_memory="full")
    seq, _, _ = _round(cfg, vectorized=False, model="resnet_tiny", epochs=2, augment="flip_crop")
    vec, _, _ = _round(cfg, vectorized=True, model="resnet_tiny", epochs=2, augment="flip_crop")
    assert batched_groups == [CLIENTS]
    _assert_same(seq, vec)


def test_capacities_train_per_group_and_unequal_sample_counts_split_the_groups(batched_groups) -> None:
    g = torch.Generator().manual_seed(5)
    sizes = [20, 20, 20, 12, 12, 7]  # the 7-sample client has no partner: it trains sequentially
    data = {c: TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
            for c, n in enumerate(sizes)}
    cfg = PrismConfig(capacities={0.2: 0.5, 0.5: 0.5})
    seq, _, _ = _round(cfg, vectorized=False, data=data)
    vec, _, _ = _round(cfg, vectorized=True, data=data)
    assert sum(batched_groups) >= 3 and all(n >= 2 for n in batched_groups), batched_groups
    assert max(batched_groups) < len(sizes)  # split by keep ratio and by sample count
    _assert_same(seq, vec)


def test_what_cannot_be_batched_trains_sequentially_with_one_log_line(caplog, batched_groups) -> None:
    class Plain(Dataset):  # not a TensorDataset: no batched indexing
        def __init__(self, base: TensorDataset) -> None:
            self.base = base

        def __len__(self) -> int:
            return len(self.base)

        def __getitem__(self, i: int):
            return self.base[i]

    g = torch.Generator().manual_seed(3)
    data = {c: Plain(TensorDataset(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)))
            for c in range(CLIENTS)}
    cfg = PrismConfig(keep_ratio=0.3)
    with caplog.at_level(logging.INFO, logger="fedml_prism"):
        vec, _, _ = _round(cfg, vectorized=True, data=data)
    notes = [r.message for r in caplog.records if "not a TensorDataset" in r.message]
    assert len(notes) == 1 and "train one after the other" in notes[0], notes
    assert batched_groups == []
    seq, _, _ = _round(cfg, vectorized=False, data=data)
    _assert_same(seq, vec, atol=0)  # the same sequential code ran


def test_problems_name_running_bn_dropout_and_recurrent_layers() -> None:
    assert "running statistics" in problem(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
    assert "dropout" in problem(torch.nn.Sequential(torch.nn.Dropout(0.5)))
    assert "recurrent" in problem(torch.nn.Sequential(torch.nn.LSTM(2, 2)))
    assert problem(torch.nn.Sequential(torch.nn.BatchNorm2d(3, track_running_stats=False), torch.nn.Linear(2, 2))) is None


def test_train_together_refuses_unequal_shapes_and_batches() -> None:
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(5, 3)
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="differ in layers or tensor shapes"):
        train_together([a, b], [[(x, torch.zeros(4, dtype=torch.long))]] * 2)
    c = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"batches differ in size \(\[2, 4\]\)"):
        train_together([a, c], [[(x, torch.zeros(4, dtype=torch.long))], [(x[:2], torch.zeros(2, dtype=torch.long))]])
