"""Samplers: without-replacement inclusion probabilities, determinism, baselines."""

from __future__ import annotations

import pytest
import torch

from fedml_prism import PrincipalModel, PrismConfig
from fedml_prism.engine.sampling import (
    draw_capacity,
    importance,
    inclusion_probabilities,
    keep_count,
    make_generator,
    rolling_channels,
    sample_components,
)
from fedml_prism.workloads.models import resnet_tiny


@pytest.mark.parametrize(("kappa", "keep"), [(2.5, 2), (1.0, 3), (0.0, 2)])
def test_frequencies_match_without_replacement_inclusion(kappa, keep) -> None:
    sigma = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5])
    draws = 20000
    g = make_generator(123, "freq")
    counts = torch.zeros(5, dtype=torch.float64)
    for _ in range(draws):
        idx = sample_components(sigma, keep, kappa, g)
        assert len(set(idx.tolist())) == keep  # no repeats
        counts[idx] += 1
    expected = inclusion_probabilities(importance(sigma, kappa), keep)
    assert torch.isclose(expected.sum(), torch.tensor(float(keep), dtype=torch.float64))
    freq = counts / draws
    bound = 4.5 * torch.sqrt(expected * (1 - expected) / draws) + 1e-9
    assert torch.all((freq - expected).abs() <= bound), (freq, expected)
    if kappa > 0:
        # with-replacement-style inclusion (keep * p) is a different law; make sure we are not it
        naive = (keep * importance(sigma, kappa)).clamp(max=1)
        assert (freq - naive).abs().max() > 5 * bound.max()


def test_importance_is_proportional_to_sigma_power() -> None:
    sigma = torch.tensor([4.0, 2.0, 1.0])
    p = importance(sigma, 2.0)
    assert torch.allclose(p, torch.tensor([16.0, 4.0, 1.0], dtype=torch.float64) / 21)
    assert torch.allclose(importance(sigma, 0.0), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_keep_count_is_ceil() -> None:
    assert keep_count(0.2, 64) == 13 and keep_count(0.2, 10) == 2 and keep_count(0.01, 10) == 1
    assert keep_count(1.0, 7) == 7


def _components(pm: PrincipalModel, client: int, rnd: int) -> dict[str, list[int]]:
    return {k: v.tolist() for k, v in pm.sample_submodel(client, rnd).components.items()}


def test_same_seed_same_submodels_and_clients_differ() -> None:
    torch.manual_seed(0)
    model = resnet_tiny(width=0.5)
    cfg = PrismConfig(keep_ratio=0.3, seed=7)
    a, b = PrincipalModel(model, cfg), PrincipalModel(model, cfg)
    sub_a, sub_b = a.sample_submodel(4, 2), b.sample_submodel(4, 2)
    assert {k: v.tolist() for k, v in sub_a.components.items()} == {k: v.tolist() for k, v in sub_b.components.items()}
    for (ka, va), (kb, vb) in zip(sub_a.module.state_dict().items(), sub_b.module.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert _components(a, 4, 2) != _components(a, 5, 2)
    assert _components(a, 4, 2) != _components(a, 4, 3)
    other_seed = PrincipalModel(model, PrismConfig(keep_ratio=0.3, seed=8))
    assert _components(other_seed, 4, 2) != _components(a, 4, 2)


def test_orthdrop_takes_top_components_for_everyone() -> None:
    pm = PrincipalModel(resnet_tiny(width=0.5), PrismConfig(strategy="orthdrop", keep_ratio=0.25))
    first = _components(pm, 0, 0)
    assert first == _components(pm, 9, 3)
    for name, idx in first.items():
        assert idx == list(range(keep_count(0.25, len(pm.factors[name].sigma))))


def test_rolex_window_rolls_each_round() -> None:
    assert rolling_channels(8, 3, 0).tolist() == [0, 1, 2]
    assert rolling_channels(8, 3, 1).tolist() == [1, 2, 3]
    assert rolling_channels(8, 3, 7).tolist() == [0, 1, 7]
    pm = PrincipalModel(resnet_tiny(width=0.5), PrismConfig(strategy="rolex", keep_ratio=0.5))
    r0, r1 = pm.sample_submodel(0, 0), pm.sample_submodel(0, 1)
    assert r0.rows["conv1"].tolist() != r1.rows["conv1"].tolist()
    assert r1.rows["conv1"].tolist() == (r0.rows["conv1"] + 1).tolist()


def test_capacities_are_drawn_once_per_client_with_given_probabilities() -> None:
    caps = {0.2: 0.5, 0.4: 0.3, 0.6: 0.2}
    draws = [draw_capacity(caps, 0, c) for c in range(4000)]
    assert draws[:50] == [draw_capacity(caps, 0, c) for c in range(50)]
    for ratio, prob in caps.items():
        assert abs(draws.count(ratio) / 4000 - prob) < 0.03
    pm = PrincipalModel(resnet_tiny(width=0.5), PrismConfig(capacities=caps))
    sizes = {}
    for c in range(12):
        sub = pm.sample_submodel(c, 0)
        rank = len(pm.factors["layers.0.0.conv1"].sigma)
        assert len(sub.components["layers.0.0.conv1"]) == keep_count(sub.keep_ratio, rank)
        sizes[sub.keep_ratio] = sum(p.numel() for p in sub.module.parameters())
    assert len(sizes) > 1 and sorted(sizes.values()) == [sizes[r] for r in sorted(sizes)]
