"""Disjoint Dirichlet partitions (``partition_disjoint``) and the authors' init (``model_init``)."""

from __future__ import annotations

import copy
import math
import subprocess

import numpy as np
import pytest
import torch
from runtime_utils import BASE, BIN, env_for, write_config
from torch import nn

from fedml_prism.job import job_from_sections, load_data
from fedml_prism.tools.cli import main
from fedml_prism.workloads.data import partition
from fedml_prism.workloads.models import create_model, init_weights


def _overlapping_reference(labels: np.ndarray, num_clients: int, alpha: float, per: int, seed: int) -> list[np.ndarray]:
    """The Dirichlet partition as it was before ``disjoint`` existed (pools shared by all clients)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {k: rng.permutation(np.flatnonzero(labels == k)) for k in classes}
    out = []
    for _ in range(num_clients):
        q = rng.dirichlet(np.full(len(classes), alpha))
        counts = rng.multinomial(per, q)
        chosen = [rng.choice(pools[k], size=c, replace=c > len(pools[k])) for k, c in zip(classes, counts, strict=True) if c]
        out.append(np.sort(np.concatenate(chosen)))
    return out


def _sections(**extra: dict) -> dict:
    sections = copy.deepcopy(BASE)
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    return sections


# --- partitions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.1, 0.5, 100.0])
def test_disjoint_dirichlet_no_sample_on_two_clients_and_equal_sizes(alpha: float) -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = partition(labels, 20, "dirichlet", alpha=alpha, samples_per_client=40, seed=2)
    assert [len(p) for p in parts] == [40] * 20
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat) == 800
    assert flat.min() >= 0 and flat.max() < len(labels)


def test_disjoint_dirichlet_is_the_default_and_can_use_every_sample() -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = partition(labels, 20, "dirichlet", alpha=0.1, seed=1)  # 20 x 50 = all 1000 samples
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))


def test_disjoint_dirichlet_follows_the_skew() -> None:
    labels = np.repeat(np.arange(10), 1000)  # pools large enough that few clients hit an empty class
    low = partition(labels, 20, "dirichlet", alpha=0.1, samples_per_client=100, seed=0)
    high = partition(labels, 20, "dirichlet", alpha=100.0, samples_per_client=100, seed=0)

    def major_classes(parts: list[np.ndarray]) -> list[int]:
        return [int((np.bincount(labels[p], minlength=10) >= 0.1 * len(p)).sum()) for p in parts]

    assert np.median(major_classes(low)) <= 3
    assert np.median(major_classes(high)) >= 4  # near-uniform q: about half the classes reach 10 %
    assert min(len(np.unique(labels[p])) for p in high) >= 9


def test_exhausted_class_draws_go_to_the_classes_left() -> None:
    labels = np.concatenate([np.zeros(5, dtype=int), np.ones(1000, dtype=int), np.full(1000, 2)])
    parts = partition(labels, 10, "dirichlet", alpha=100.0, samples_per_client=60, seed=4)
    assert [len(p) for p in parts] == [60] * 10
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat)
    assert (labels[flat] == 0).sum() == 5  # the small class is used up, not duplicated
    for p in parts[2:]:  # later clients still get both remaining classes in near-equal parts
        counts = np.bincount(labels[p], minlength=3)
        assert counts[0] == 0 and 15 <= counts[1] <= 45


def test_disjoint_dirichlet_is_deterministic_for_a_seed() -> None:
    labels = np.random.default_rng(7).integers(0, 10, 3000)
    a = partition(labels, 25, "dirichlet", alpha=0.3, samples_per_client=100, seed=5)
    b = partition(labels, 25, "dirichlet", alpha=0.3, samples_per_client=100, seed=5)
    c = partition(labels, 25, "dirichlet", alpha=0.3, samples_per_client=100, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("seed", [0, 1, 9])
def test_overlapping_dirichlet_is_unchanged(seed: int) -> None:
    labels = np.random.default_rng(3).integers(0, 5, 400)
    got = partition(labels, 8, "dirichlet", alpha=0.5, samples_per_client=70, seed=seed, disjoint=False)
    want = _overlapping_reference(labels, 8, 0.5, 70, seed)
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def test_overlapping_dirichlet_reuses_samples_of_a_small_pool() -> None:
    labels = np.repeat(np.arange(2), 10)  # 20 samples, 10 clients x 10 draws: overlap is unavoidable
    parts = partition(labels, 10, "dirichlet", alpha=1.0, samples_per_client=10, seed=0, disjoint=False)
    assert [len(p) for p in parts] == [10] * 10
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) < len(flat)


def test_disjoint_dirichlet_too_many_samples_is_an_error() -> None:
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(ValueError, match=r"client_num_in_total=10 x samples_per_client=10 .*20 training samples"):
        partition(labels, 10, "dirichlet", alpha=1.0, samples_per_client=10, seed=0)
    with pytest.raises(ValueError, match="partition_disjoint='yes' is invalid: allowed true or false"):
        partition(labels, 2, "dirichlet", disjoint="yes")  # type: ignore[arg-type]


def test_config_partition_disjoint(tmp_path) -> None:
    path, out = str(tmp_path / "c.yaml"), str(tmp_path / "out")
    with pytest.raises(ValueError, match="partition_disjoint='yes' is invalid: allowed true or false"):
        job_from_sections(_sections(data_args={"partition_disjoint": "yes"}), path, out)
    dirichlet = {"partition_method": "dirichlet", "partition_alpha": 0.3}
    job = job_from_sections(_sections(data_args=dirichlet), path, out)
    assert job.partition_disjoint is True
    flat = np.concatenate(load_data(job).client_indices)
    assert len(np.unique(flat)) == len(flat)
    job = job_from_sections(_sections(data_args={**dirichlet, "partition_disjoint": False}), path, out)
    assert job.partition_disjoint is False
    flat = np.concatenate(load_data(job).client_indices)
    assert len(np.unique(flat)) < len(flat)


# --- model init ---------------------------------------------------------------------------------


def test_kaiming_fan_out_on_resnet18() -> None:
    torch.manual_seed(0)
    default = create_model("resnet18_cifar", width=0.5)
    torch.manual_seed(0)
    model = create_model("resnet18_cifar", init="kaiming_fan_out", width=0.5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20
    for conv in convs:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.1)
        assert abs(conv.weight.mean().item()) < 0.2 * math.sqrt(2.0 / fan_out)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any()
    # nn.Linear keeps PyTorch's init: it is drawn before the re-initialisation, so it matches the default model
    assert torch.equal(model.linear.weight, default.linear.weight)
    assert torch.equal(model.linear.bias, default.linear.bias)
    # PyTorch's default conv init is much smaller than kaiming fan-out for these layers
    assert not torch.equal(model.conv1.weight, default.conv1.weight)


def test_init_is_deterministic_and_default_is_untouched() -> None:
    torch.manual_seed(3)
    a = create_model("cnn", init="kaiming_fan_out", in_channels=1, image_size=8, width=0.25)
    torch.manual_seed(3)
    b = create_model("cnn", init="kaiming_fan_out", in_channels=1, image_size=8, width=0.25)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not a.conv1.bias.any() and not a.conv2.bias.any()  # conv biases zeroed
    torch.manual_seed(3)
    c = create_model("cnn", in_channels=1, image_size=8, width=0.25)
    before = {k: v.clone() for k, v in c.state_dict().items()}
    assert init_weights(c, "default") is c
    assert all(torch.equal(before[k], v) for k, v in c.state_dict().items())


def test_init_applies_to_module_callable_models() -> None:
    conv = create_model("torch.nn:Conv2d", init="kaiming_fan_out", in_channels=4, out_channels=64, kernel_size=3)
    assert not conv.bias.any()
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / (64 * 9)), rel=0.1)


def test_unknown_init_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"model_init='xavier' is invalid: allowed default, kaiming_fan_out"):
        create_model("cnn", init="xavier")
    with pytest.raises(ValueError, match=r"model_init='xavier' is invalid"):
        init_weights(nn.Linear(2, 2), "xavier")
    path, out = str(tmp_path / "c.yaml"), str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"model_init='xavier' is invalid: allowed default, kaiming_fan_out"):
        job_from_sections(_sections(model_args={"model_init": "xavier"}), path, out)
    job = job_from_sections(_sections(model_args={"model_init": "kaiming_fan_out"}), path, out)
    assert job.model_init == "kaiming_fan_out"


def test_check_accepts_the_new_keys(tmp_path, capsys) -> None:
    cfg = write_config(tmp_path / "ok.yaml", model_args={"model_init": "kaiming_fan_out"},
                       data_args={"partition_method": "dirichlet", "partition_disjoint": False})
    assert main(["run", "--cf", str(cfg), "--check", "--output-dir", str(tmp_path / "out")]) == 0
    assert "config OK" in capsys.readouterr().out


def test_cli_check_rejects_a_bogus_model_init(tmp_path) -> None:
    cfg = write_config(tmp_path / "bad.yaml", model_args={"model_init": "bogus"})
    proc = subprocess.run(
        [str(BIN / "fedml-prism"), "run", "--cf", str(cfg), "--check", "--output-dir", str(tmp_path / "out")],
        cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "model_init='bogus' is invalid: allowed default, kaiming_fan_out" in proc.stderr
    assert not (tmp_path / "out").exists()
