"""SuperFed (weight-shared supernet): the laws of sub-network extraction, the tracking sandwich, the
weight-shared aggregation against a slow per-element reference, the parameter cap, and tiny runs
(metrics, summary, resume equal to an uninterrupted run)."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os

import pytest
import torch
from data_utils import Interrupted, interrupt_at_round
from torch import nn

from fedml_prism.engine.rounds import read_checkpoint
from fedml_prism.engine.server import RunSettings
from fedml_prism.strategies import base
from fedml_prism.strategies import superfed as sf
from fedml_prism.workloads.data import load_federated
from fedml_prism.workloads.models import ResNetCifar, cnn, resnet_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(blocks: tuple[int, ...] = (2, 2), in_channels: int = 1) -> ResNetCifar:
    torch.manual_seed(0)
    return ResNetCifar(blocks, num_classes=4, in_channels=in_channels, width=0.125)


def _space(model: nn.Module, **options) -> tuple[nn.Module, sf.SubnetSpace]:
    opts = sf.Options(**options)
    supernet = sf.prepare_supernet(model, opts.bn)
    return supernet, sf.build_space(supernet, opts, sf.count_params(model))


@pytest.mark.parametrize("bn", ["static", "none"])
def test_largest_subnet_is_the_supernet(bn: str) -> None:
    """Uncapped, the largest sub-network is the whole supernet: same tensors, same output."""
    model = _model()
    supernet, space = _space(model, bn=bn)
    largest = space.largest()
    assert largest.depth == (2, 2) and all(w == 1.0 for ws in largest.width for w in ws)
    sub = sf.extract_subnet(supernet, largest)
    assert sf.count_params(sub) == space.params(largest) == sf.count_params(supernet)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(sub(x), supernet(x))


def _masked_reference(supernet: nn.Module, arch: sf.Arch, space: sf.SubnetSpace) -> nn.Module:
    """The supernet with the dropped blocks skipped and every block's dropped inner channels
    zero-masked (conv2 ignores them)."""
    ref = copy.deepcopy(supernet)
    with torch.no_grad():
        for i, stage in enumerate(ref.layers):
            for j in range(len(stage)):
                if j >= arch.depth[i]:
                    stage[j] = nn.Identity()
                else:
                    k = space.keep(i, j, arch.width[i][j])
                    stage[j].conv2.weight[:, k:] = 0
    return ref


@pytest.mark.parametrize("bn", ["static", "none"])
def test_extraction_law_skipped_blocks_and_masked_channels(bn: str) -> None:
    """A sub-network is physically smaller (its tensors are the leading blocks of the supernet's,
    its parameter count is the space's formula) and computes what the supernet computes with the
    dropped blocks skipped and the dropped channels zero-masked."""
    model = _model((2, 3))
    supernet, space = _space(model, bn=bn, widths=[0.25, 0.5, 1.0])
    archs = [sf.Arch((1, 2), ((0.5,), (0.25, 1.0))), sf.Arch((2, 1), ((0.25, 1.0), (0.5,))), space.smallest()]
    archs += [space.random(torch.Generator().manual_seed(s)) for s in range(4)]
    x = torch.randn(6, 1, 8, 8)
    full = supernet.state_dict()
    for arch in archs:
        sub = sf.extract_subnet(supernet, arch)
        assert sf.count_params(sub) == space.params(arch)
        assert arch == space.largest() or space.params(arch) < sf.count_params(supernet)
        for key, value in sub.state_dict().items():
            assert torch.equal(value, full[key][sf.leading(value.shape)])
            assert value.data_ptr() != full[key].data_ptr()  # its own storage
        n_blocks = sum(1 for k in sub.state_dict() if k.endswith("conv1.weight") and k.startswith("layers."))
        assert n_blocks == sum(arch.depth)
        torch.testing.assert_close(sub(x), _masked_reference(supernet, arch, space)(x), rtol=1e-5, atol=1e-5)


def test_tracking_sandwich_roles_are_balanced_and_deterministic() -> None:
    """Each round one client trains the largest, another the smallest, the rest random sub-networks
    drawn from (seed, round, client); the largest goes to whoever trained it least (ties: lowest id)."""
    supernet, space = _space(_model((2, 2)), widths=[0.25, 0.5, 1.0])
    clients = [1, 3, 4, 7]
    plan, counts = sf.tracking_sandwich(clients, {}, 0, 5, space)
    roles = {c: role for c, _, role in plan}
    assert roles == {1: "largest", 3: "smallest", 4: "random", 7: "random"}
    assert [c for c, _, _ in plan] == clients
    assert plan[0][1] == space.largest() and plan[1][1] == space.smallest()
    again, counts_again = sf.tracking_sandwich(clients, {}, 0, 5, space)
    assert again == plan and counts_again == counts
    assert counts[1][0] >= 1 and counts[3][1] >= 1
    for c, arch, _ in plan[2:]:  # drawn from (seed, round, client)
        assert arch == space.random(sf.make_generator(5, "superfed-arch", 0, c))
    other_seed, _ = sf.tracking_sandwich(clients, {}, 0, 6, space)
    other_round, _ = sf.tracking_sandwich(clients, {}, 1, 5, space)
    assert [a for _, a, _ in other_seed[2:]] != [a for _, a, _ in plan[2:]] or \
        [a for _, a, _ in other_round[2:]] != [a for _, a, _ in plan[2:]]
    # over four rounds of the same clients every client trains the largest once
    counts, largest = {}, []
    for r in range(4):
        plan, counts = sf.tracking_sandwich(clients, counts, r, 5, space)
        largest.append(next(c for c, _, role in plan if role == "largest"))
        assert sum(role == "smallest" for _, _, role in plan) == 1
    assert sorted(largest) == clients
    # a single client trains the largest
    plan, _ = sf.tracking_sandwich([2], {}, 0, 5, space)
    assert [role for _, _, role in plan] == ["largest"]


def _slow_aggregate(state, updates, weights):
    """Per element: Σ w·θ / Σ w over the updates whose leading block covers it, else unchanged."""
    out = {}
    for key, old in state.items():
        new = old.clone()
        for idx in itertools.product(*(range(n) for n in old.shape)):
            num = den = 0.0
            for u, w in zip(updates, weights, strict=True):
                t = u.get(key)
                if t is not None and all(i < n for i, n in zip(idx, t.shape, strict=True)):
                    num += float(t[idx]) * w
                    den += w
            if den > 0:
                value = num / den
                new[idx] = round(value) if not old.is_floating_point() else value
        out[key] = new
    return out


def test_aggregate_shared_matches_slow_reference_and_keeps_untouched_bits() -> None:
    g = torch.Generator().manual_seed(0)
    state = {
        "conv": torch.randn(4, 3, 2, 2, generator=g),
        "bias": torch.randn(5, generator=g),
        "head": torch.randn(3, 3, generator=g),
        "count": torch.tensor(7),
        "nobody": torch.randn(2, 2, generator=g),
    }
    state["conv"][3, 2, 1, 1] = 1e-40  # a subnormal: must survive bit for bit
    updates = [
        {"conv": torch.randn(4, 3, 2, 2, generator=g), "bias": torch.randn(5, generator=g),
         "head": torch.randn(3, 3, generator=g), "count": torch.tensor(9)},
        {"conv": torch.randn(2, 1, 2, 2, generator=g), "bias": torch.randn(2, generator=g), "count": torch.tensor(4)},
        {"conv": torch.randn(3, 2, 2, 2, generator=g), "head": torch.randn(3, 1, generator=g)},
    ]
    weights = [0.7, 0.1, 0.2]
    fast = sf.aggregate_shared(state, updates[1:], weights[1:])  # nobody holds conv[3], bias[2:], head[:, 1:]
    slow = _slow_aggregate(state, updates[1:], weights[1:])
    for key in state:
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-6, atol=0)
    assert torch.equal(fast["conv"][3].view(torch.int32), state["conv"][3].view(torch.int32))
    assert torch.equal(fast["bias"][2:], state["bias"][2:]) and torch.equal(fast["head"][:, 1:], state["head"][:, 1:])
    assert torch.equal(fast["nobody"], state["nobody"])
    full = sf.aggregate_shared(state, updates, weights)
    slow_full = _slow_aggregate(state, updates, weights)
    for key in state:
        torch.testing.assert_close(full[key], slow_full[key], rtol=1e-6, atol=0)
    same = sf.aggregate_shared(state, [updates[0], updates[0]], [0.9, 0.1])  # identical updates come back
    assert torch.equal(same["conv"], updates[0]["conv"]) and torch.equal(same["count"], updates[0]["count"])
    with pytest.raises(ValueError, match="leading block"):
        sf.aggregate_shared(state, [{"bias": torch.zeros(6)}], [1.0])
    with pytest.raises(ValueError, match="weights"):
        sf.aggregate_shared(state, [updates[0]], [0.0])


def test_beta_schedule_and_weights() -> None:
    """β starts at beta_init, follows the cosine down to beta_final at beta_rounds and stays; the
    largest's client gets β, the others share 1-β."""
    b = [sf.beta_at(t, init=0.9, final=0.125, rounds=10) for t in range(14)]
    assert b[0] == pytest.approx(0.9) and b[10] == pytest.approx(0.125) and b[13] == pytest.approx(0.125)
    assert b[5] == pytest.approx(0.9 * ((1 - 0.125 / 0.9) * 0.5 + 0.125 / 0.9))
    assert all(x >= y for x, y in zip(b[:-1], b[1:], strict=True))
    w = sf.round_weights(["random", "largest", "smallest", "random"], 0.7)
    assert w[1] == 0.7 and w[0] == w[2] == w[3] == pytest.approx(0.1) and math.isclose(sum(w), 1.0)
    assert sf.round_weights(["largest", "random"], None) == [1.0, 1.0]
    assert sf.round_weights(["largest"], 0.9) == [1.0]


def test_capped_mode_never_exceeds_the_budget() -> None:
    model = ResNetCifar((2, 2, 2), num_classes=10, in_channels=3, width=0.25)
    dense = sf.count_params(model)
    supernet, space = _space(model, cap=True, max_params_ratio=0.2, widths=[0.125, 0.25, 0.5, 1.0])
    assert space.budget == math.floor(0.2 * dense)
    largest = space.largest()
    assert space.params(largest) <= space.budget < dense
    assert space.params(largest) > space.params(space.middle()) > space.params(space.smallest())
    draws = [space.random(torch.Generator().manual_seed(s)) for s in range(300)]
    assert all(space.params(a) <= space.budget for a in draws)
    assert len(set(draws)) > 10
    for _, arch in space.grid():
        assert space.params(arch) <= space.budget
    for arch in [largest, *draws[:5]]:
        assert sf.count_params(sf.extract_subnet(supernet, arch)) == space.params(arch)
    plan, _ = sf.tracking_sandwich(list(range(6)), {}, 0, 0, space)
    assert all(space.params(a) <= space.budget for _, a, _ in plan)
    with pytest.raises(ValueError, match="max_params_ratio"):
        _space(resnet_tiny(num_classes=10, in_channels=1), cap=True, max_params_ratio=0.2)


@pytest.mark.parametrize(
    "options, key",
    [({"widths": [0, 0.5]}, "widths"), ({"widths": [0.5, 0.5]}, "widths"), ({"widths": "0.5"}, "widths"),
     ({"depths": []}, "depths"), ({"depths": [0, 1]}, "depths"), ({"cap": "yes"}, "cap"),
     ({"max_params_ratio": 0}, "max_params_ratio"), ({"max_params_ratio": 1.5}, "max_params_ratio"),
     ({"beta_schedule": "linear"}, "beta_schedule"), ({"beta_init": 0}, "beta_init"),
     ({"beta_final": 2}, "beta_final"), ({"beta_rounds": 0}, "beta_rounds"), ({"bn": "batch"}, "bn"),
     ({"measure_memory": 1}, "measure_memory"), ({"device": "tpu"}, "device"), ({"typo": 1}, "typo")],
)
def test_bad_options_name_the_key(options, key) -> None:
    with pytest.raises(ValueError, match=key):
        base.options_from(sf.Options, options)


def test_unsupported_models_and_depths_raise() -> None:
    with pytest.raises(ValueError, match="model"):
        sf.prepare_supernet(cnn(num_classes=4, in_channels=1, image_size=8, width=0.125))
    with pytest.raises(ValueError, match="depths"):
        _space(resnet_tiny(num_classes=4, in_channels=1), depths=[2])
    _, space = _space(resnet_tiny(num_classes=4, in_channels=1), depths=[1, 2])  # depths that exist are used
    assert space.depths == ((1,), (1,))


def _settings(tmp, rounds: int, **kw) -> RunSettings:
    return RunSettings(comm_round=rounds, client_num_in_total=4, client_num_per_round=3, epochs=1, batch_size=16,
                       learning_rate=0.05, frequency_of_the_test=1, output_dir=str(tmp), **kw)


def _digits():
    return load_federated("digits", 4, "iid", 0.5, seed=0, samples_per_client=48)


@pytest.mark.parametrize("cap", [False, True])
def test_tiny_run_writes_metrics_and_summary(tmp_path, cap: bool) -> None:
    data = _digits()
    torch.manual_seed(0)
    model = resnet_tiny(num_classes=10, in_channels=1, width=0.25)
    options = {"cap": cap, "max_params_ratio": 0.3, "widths": [0.125, 0.5, 1.0], "measure_memory": cap}
    result = sf.run(model, data, _settings(tmp_path, 3), options, seed=1)
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert len(rows) == 3 and rows == json.loads(json.dumps(result.metrics))
    assert os.path.exists(tmp_path / "metrics.csv") and os.path.exists(tmp_path / "checkpoint.pt")
    assert all(r["clients"] == 3 and r["bytes_down"] == r["bytes_up"] > 0 for r in rows)
    assert all(0 <= r["test_acc"] <= 1 for r in rows)
    assert rows[0]["beta"] == pytest.approx(0.9)
    s = result.summary
    dense = sf.count_params(model)
    assert s["dense_params"] == dense
    assert s["setting"] == (base.WEIGHTS_ONLY if cap else base.TRAINS_FULL_MODEL)
    names = [n["name"] for n in s["subnets"]]
    assert names[:3] == ["smallest", "middle", "largest"]
    assert all(0 <= n["accuracy"] <= 1 and n["params"] > 0 and n["macs"] > 0 for n in s["subnets"])
    assert s["client_macs"] > 0
    if cap:
        assert s["client_params"] <= 0.3 * dense and s["budget_params"] == math.floor(0.3 * dense)
        assert all(r["max_client_params"] <= 0.3 * dense for r in rows)
        assert s["peak_train_mb"] > 0
    else:
        assert s["client_params"] == dense == rows[0]["max_client_params"]
        # the largest trained per round is the full supernet: its bytes go down once per round at least
        assert rows[0]["bytes_down"] > base.tensor_bytes(sf.prepare_supernet(model).state_dict().values())


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch) -> None:
    data = _digits()
    options = {"depths": [1, 2], "widths": [0.25, 0.5, 1.0], "measure_memory": False}

    def model():
        torch.manual_seed(0)
        return ResNetCifar((2, 1), num_classes=10, in_channels=1, width=0.125)

    whole = sf.run(model(), data, _settings(tmp_path / "whole", 4), options, seed=3)

    interrupt_at_round(monkeypatch, sf, 2)
    with pytest.raises(Interrupted):
        sf.run(model(), data, _settings(tmp_path / "split", 4), options, seed=3)
    assert read_checkpoint(str(tmp_path / "split"), "superfed", None)["round"] == 2
    monkeypatch.undo()
    resumed = sf.run(model(), data, _settings(tmp_path / "split", 4), options, seed=3, resume=True)

    a, b = read_checkpoint(str(tmp_path / "whole"), "superfed", None), read_checkpoint(str(tmp_path / "split"), "superfed", None)
    assert a["supernet"].keys() == b["supernet"].keys()
    assert all(torch.equal(a["supernet"][k], b["supernet"][k]) for k in a["supernet"])
    assert a["counts"] == b["counts"]
    keys = ("test_acc", "test_loss", "train_loss", "bytes_down", "bytes_up", "beta", "max_client_params")
    assert [[r[k] for k in keys] for r in whole.metrics] == [[r[k] for k in keys] for r in resumed.metrics]
    assert whole.summary["subnets"] == resumed.summary["subnets"]
    with pytest.raises(ValueError, match="widths"):
        sf.run(model(), data, _settings(tmp_path / "split", 4), {**options, "widths": [0.5, 1.0]}, seed=3, resume=True)


def test_a_capped_space_with_a_single_subnetwork_is_refused_naming_budget_and_sizes() -> None:
    """resnet_tiny (one block per stage) under a 20 % cap admits only its smallest sub-network: every
    client would train the same model, which is not SuperFed (issue 22)."""
    model = resnet_tiny(num_classes=10, in_channels=3, width=0.25)
    dense = sf.count_params(model)
    widths = [0.125, 0.25, 0.5, 0.75, 1.0]
    uncapped = sf.build_space(sf.prepare_supernet(copy.deepcopy(model)), sf.Options(widths=widths), dense)
    small, second = uncapped.params(uncapped.smallest()), sf.next_smallest_params(uncapped)
    budget = math.floor(0.2 * dense)
    assert small <= budget < second  # one sub-network fits, the next does not
    with pytest.raises(ValueError) as err:
        _space(model, cap=True, max_params_ratio=0.2, widths=widths)
    message = str(err.value)
    assert "max_params_ratio=0.2" in message and f"{budget:,}" in message
    assert f"{small:,}" in message and f"{second:,}" in message and "single sub-network" in message
    # the next smallest is one step up: the cheapest single widening or deepening
    steps = [sf.Arch((1, 1), ((0.25,), (0.125,))), sf.Arch((1, 1), ((0.125,), (0.25,)))]
    assert second == min(uncapped.params(a) for a in steps)
    # a budget that admits two sub-networks is accepted, with a largest above the smallest
    ratio = (second + 1) / dense
    _, space = _space(model, cap=True, max_params_ratio=ratio, widths=widths)
    assert space.params(space.largest()) > space.params(space.smallest())
    # a two-block-per-stage model under the same 20 % cap holds many
    deep = ResNetCifar((2, 2, 2, 2), num_classes=10, in_channels=3, width=0.125)
    _, space = _space(deep, cap=True, max_params_ratio=0.2, widths=widths)
    assert len({space.random(torch.Generator().manual_seed(s)) for s in range(50)}) > 5


def test_a_config_whose_cap_admits_one_subnetwork_exits_2_before_any_work(tmp_path, monkeypatch, capsys) -> None:
    from fedml_prism.tools.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "fedml_config.yaml").write_text(
        "common_args: {training_type: simulation}\ncomm_args: {backend: sp}\ndata_args: {dataset: digits}\n"
        "model_args: {model: resnet_tiny, model_kwargs: {in_channels: 1, width: 0.25, num_classes: 10}}\n"
        "train_args: {client_num_in_total: 4, client_num_per_round: 2, comm_round: 2, batch_size: 32}\n"
        "prism_args: {strategy: superfed}\n"
        "method_args: {superfed: {widths: [0.125, 0.25, 0.5, 1.0], cap: true, max_params_ratio: 0.2}}\n")
    assert main(["run", "--cf", "fedml_config.yaml"]) == 2
    err = capsys.readouterr().err
    assert "max_params_ratio=0.2 is invalid for this model" in err and "admits a single sub-network" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fedml_config.yaml"]  # nothing written, nothing trained
