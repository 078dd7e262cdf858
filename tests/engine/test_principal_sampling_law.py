"""The sampling law as the model applies it: over many (client, round) draws of
``PrincipalModel.sample_submodel``, each component's inclusion rate is the without-replacement inclusion
probability of ``p ∝ σ^κ`` for the configured κ (issue 23, item 1). ``tests/engine/test_sampling.py`` checks
the sampler alone; this fails if the model hands the sampler another κ (e.g. 0: uniform)."""

from __future__ import annotations

import pytest
import torch
from spectrum_utils import linear_with_spectrum

from fedml_prism import PrincipalModel, PrismConfig
from fedml_prism.engine.sampling import importance, inclusion_probabilities, keep_count

SIGMA = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5])  # steep: κ moves the top component's rate far from uniform
KEEP_RATIO = 0.4
ROUNDS, CLIENTS = 40, 50


@pytest.mark.parametrize(("strategy", "kappa", "law_kappa"), [("prism", 1.0, 1.0), ("prism", 4.0, 4.0),
                                                              ("uniform", 4.0, 0.0)])
def test_inclusion_rates_follow_the_configured_kappa(strategy: str, kappa: float, law_kappa: float) -> None:
    cfg = PrismConfig(strategy=strategy, keep_ratio=KEEP_RATIO, kappa=kappa, seed=5, factorize_include=("0",))
    pm = PrincipalModel(linear_with_spectrum(SIGMA), cfg)
    assert pm.layers == ["0"]
    sigma = pm.factors["0"].sigma
    assert torch.allclose(sigma, SIGMA, rtol=1e-4)
    keep = keep_count(KEEP_RATIO, len(SIGMA))
    counts = torch.zeros(len(SIGMA), dtype=torch.float64)
    for round_idx in range(ROUNDS):
        for client in range(CLIENTS):
            idx = pm.sample_submodel(client, round_idx).components["0"]
            assert len(set(idx.tolist())) == keep
            counts[idx] += 1
    draws = ROUNDS * CLIENTS
    rate = counts / draws
    expected = inclusion_probabilities(importance(sigma, law_kappa), keep)
    sd = torch.sqrt(expected * (1 - expected) / draws)
    assert torch.all((rate - expected).abs() <= 4.5 * sd + 1e-9), (rate, expected)
    uniform = keep / len(SIGMA)  # κ = 0's inclusion probability of every component
    if law_kappa > 0:
        assert float(expected[0]) - uniform > 0.25  # the laws are far apart, so the test can tell them apart
        assert float(rate[0]) - uniform > 20 * float(sd[0])
    else:
        assert abs(float(rate[0]) - uniform) <= 4.5 * float(sd[0])
