"""Malformed or hostile updates are rejected with a reason and never raise out of the server:
two-element or non-finite sample counts, meta / sparse tensors, wrong dtypes, another client's or an
earlier round's update (``prism::meta``), NaN and huge integers (issue 11, item 6)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import TensorDataset

from fedml_prism import PrismConfig
from fedml_prism.engine.server import NUM_SAMPLES, PrismClient, PrismServer, RunSettings, pack_bundle, unpack_bundle
from fedml_prism.workloads.models import cnn


def _job(tmp_path, strategy: str = "prism"):
    torch.manual_seed(0)
    model = cnn(num_classes=3, in_channels=1, image_size=8, width=0.5)
    cfg = PrismConfig(strategy=strategy, keep_ratio=0.5, seed=0, weighting="samples")
    settings = RunSettings(comm_round=3, client_num_in_total=3, client_num_per_round=3, batch_size=4,
                           output_dir=str(tmp_path))
    data = {c: TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for c in range(3)}
    return PrismServer(model, cfg, settings), PrismClient(model, cfg, settings, data)


def _round(server: PrismServer, client: PrismClient) -> dict[int, dict[str, torch.Tensor]]:
    """One round's honest uploads, per client."""
    bundles = server.bundles(workers=3)
    return {cid: payload for b in bundles.values() for cid, payload in unpack_bundle(client.train_bundle(b)).items()}


def _close(server: PrismServer, uploads: dict[int, dict[str, torch.Tensor]]) -> dict:
    return server.close_round(server.updates_from_bundles([pack_bundle({c: p}) for c, p in uploads.items()]))


def _tamper(kind: str, payload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    bad = dict(payload)
    weight = next(k for k, v in bad.items() if not k.startswith("prism::") and v.is_floating_point())
    if kind == "two_sample_counts":
        bad[NUM_SAMPLES] = torch.tensor([8, 8])
    elif kind == "nan_sample_count":
        bad[NUM_SAMPLES] = torch.tensor(float("nan"))
    elif kind == "huge_sample_count":
        bad[NUM_SAMPLES] = torch.tensor(2**62)
    elif kind == "inf_sample_count":
        bad[NUM_SAMPLES] = torch.tensor(float("inf"))
    elif kind == "meta_tensor":
        bad[weight] = torch.empty(bad[weight].shape, device="meta")
    elif kind == "sparse_tensor":
        bad[weight] = bad[weight].to_sparse()
    elif kind == "wrong_dtype":
        bad[weight] = bad[weight].double()
    elif kind == "nan_weight":
        bad[weight] = torch.full_like(bad[weight], float("nan"))
    elif kind == "huge_index":
        index = next(k for k in bad if k.startswith("prism::index::"))
        bad[index] = torch.full_like(bad[index], 2**62)
    elif kind == "not_a_tensor":
        bad[weight] = [1.0, 2.0]
    return bad


KINDS = ["two_sample_counts", "nan_sample_count", "huge_sample_count", "inf_sample_count", "meta_tensor",
         "sparse_tensor", "wrong_dtype", "nan_weight", "huge_index", "not_a_tensor"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_update_is_left_out_and_the_round_goes_on(tmp_path, kind, caplog) -> None:
    server, client = _job(tmp_path)
    uploads = _round(server, client)
    uploads[1] = _tamper(kind, uploads[1])
    with caplog.at_level(logging.WARNING, logger="fedml_prism"):
        row = _close(server, uploads)
    assert row["clients"] == 2  # the two honest clients
    assert any("client 1" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("strategy", ["prism", "orthdrop", "full"])
def test_a_replayed_update_of_an_earlier_round_is_refused(tmp_path, strategy, caplog) -> None:
    """``full`` and ``orthdrop`` send the same shapes and indices every round: only ``prism::meta``
    tells an old update from a new one."""
    server, client = _job(tmp_path, strategy)
    first = _round(server, client)
    _close(server, first)
    second = _round(server, client)
    second[2] = first[2]  # client 2's round-1 update, replayed in round 2
    with caplog.at_level(logging.WARNING):
        row = _close(server, second)
    assert row["clients"] == 2
    assert any("earlier round" in r.getMessage() for r in caplog.records)


def test_an_update_sent_as_another_clients_is_refused(tmp_path, caplog) -> None:
    server, client = _job(tmp_path, "full")
    uploads = _round(server, client)
    uploads[0] = dict(uploads[1])  # client 1's update submitted for client 0
    with caplog.at_level(logging.WARNING):
        row = _close(server, uploads)
    assert row["clients"] == 2
    assert any("another client's" in r.getMessage() for r in caplog.records)


def test_honest_round_is_unaffected(tmp_path) -> None:
    server, client = _job(tmp_path)
    row = _close(server, _round(server, client))
    assert row["clients"] == 3 and row["rejected"] == 0


def test_each_prism_client_is_bound_to_the_worker_it_was_sent_to(tmp_path) -> None:
    """A worker cannot submit another worker's client first (and get the honest update rejected as a
    duplicate): the aggregator's ``bundle_problem`` refuses a bundle holding clients not sent to it."""
    from types import SimpleNamespace

    from fedml_prism.runtimes.fedml_glue import PrismServerAggregator

    server, client = _job(tmp_path)
    agg = PrismServerAggregator(server.pm.dense_model(), SimpleNamespace(), server, workers=3)
    bundles = agg.get_model_params()
    uploads = {w: client.train_bundle(b) for w, b in bundles.items()}
    for w, up in uploads.items():
        assert agg.bundle_problem(w, up) is None
    stolen = uploads[1]
    problem = agg.bundle_problem(0, stolen)
    assert problem is not None and "not sent to this worker" in problem
    assert "not sent to this worker" in agg.bundle_problem(7, uploads[0])  # no such worker
    assert "malformed bundle" in agg.bundle_problem(0, {"evil": torch.zeros(1)})
