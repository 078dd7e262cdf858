"""Invalid settings raise ValueError naming field, value and allowed range."""

from __future__ import annotations

import pytest

from fedml_prism import PrismConfig


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"keep_ratio": 0.0}, "keep_ratio=0.0", "(0, 1]"),
        ({"keep_ratio": 1.5}, "keep_ratio=1.5", "(0, 1]"),
        ({"keep_ratio": "half"}, "keep_ratio='half'", "(0, 1]"),
        ({"kappa": -1}, "kappa=-1", ">= 0"),
        ({"strategy": "dropout"}, "strategy='dropout'", "prism, uniform, orthdrop, origdrop, rolex, full"),
        ({"weighting": "size"}, "weighting='size'", "uniform, samples"),
        ({"capacities": {0.2: 0.5, 0.4: 0.3}}, "capacities", "sum to 1"),
        ({"capacities": {0.0: 1.0}}, "capacities (key)=0.0", "(0, 1]"),
        ({"seed": -3}, "seed=-3", ">= 0"),
        ({"svd_dtype": "float16"}, "svd_dtype='float16'", "float32, float64"),
    ],
)
def test_invalid_settings_are_named(kwargs, field, allowed) -> None:
    with pytest.raises(ValueError) as err:
        PrismConfig(**kwargs)
    assert field in str(err.value) and allowed in str(err.value)


def test_from_mapping_rejects_unknown_keys_and_round_trips() -> None:
    with pytest.raises(ValueError, match="unknown key.*keep_ration"):
        PrismConfig.from_mapping({"keep_ration": 0.2})
    cfg = PrismConfig.from_mapping({"strategy": "orthdrop", "capacities": {"0.2": 0.5, "0.4": 0.5}})
    assert cfg.capacities == {0.2: 0.5, 0.4: 0.5} and cfg.max_keep_ratio == 0.4
    assert PrismConfig.from_mapping(cfg.to_dict()) == cfg


def test_uniform_strategy_means_kappa_zero() -> None:
    assert PrismConfig(strategy="uniform", kappa=2.5).kappa == 0.0
