"""Tools of a rogue peer for the hostile-peer tests: payloads that would run code if ever unpickled, and
PriSM frames with forged fields."""

from __future__ import annotations

import builtins
import hashlib
import hmac
import json
import pickle
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from fedml_prism.runtimes.wire import MAGIC, VERSION, _canonical, tensors_to_bytes


class _Marker:
    """Unpickling this creates ``path`` (``open(path, "w")``): proof that someone unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return builtins.open, (self.path, "w")


def marker_pickle(path: Path) -> bytes:
    """A pickle whose loading creates the file ``path``."""
    return pickle.dumps({"model_params": _Marker(path), "msg_type": 3, "sender": 1, "receiver": 0})


def frame(header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None, key: bytes | None = None,
          digest: str | None = None) -> bytes:
    """A PriSM frame with exactly ``header``'s fields (defaults filled in), signed with ``key`` when given."""
    blob = tensors_to_bytes(OrderedDict(tensors)) if tensors is not None else b""
    h = {"run": "t", "session": "", "seq": 1, "round": 0, "sender": 1, "receiver": 0, "type": "3", "params": {},
         "tensors": tensors is not None, **header}
    h["digest"] = digest if digest is not None else hashlib.sha256(blob).hexdigest()
    h["mac"] = hmac.new(key, _canonical(h), hashlib.sha256).hexdigest() if key else header.get("mac", "")
    head = json.dumps(h, separators=(",", ":")).encode()
    return MAGIC + bytes([VERSION]) + struct.pack(">I", len(head)) + head + blob


def reframe(data: bytes, key: bytes | None = None, **changes: Any) -> bytes:
    """A copy of frame ``data`` with header fields changed (re-signed with ``key`` when given: a peer
    that holds a key forging what it may not; unsigned: the old MAC no longer matches)."""
    (size,) = struct.unpack(">I", data[5:9])
    header = json.loads(data[9:9 + size])
    blob = data[9 + size:]
    header.update(changes)
    if key is not None:
        header["mac"] = hmac.new(key, _canonical(header), hashlib.sha256).hexdigest()
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + bytes([VERSION]) + struct.pack(">I", len(head)) + head + blob


def header_of(data: bytes) -> dict[str, Any]:
    (size,) = struct.unpack(">I", data[5:9])
    return json.loads(data[9:9 + size])


# ------------------------------------------------------------------------------ a rogue worker's uploads
def honest_upload(cfg_path: str, bundle: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """What an honest worker of job ``cfg_path`` uploads for ``bundle`` (it trains it on the job's data)."""
    from fedml_prism.engine.server import PrismClient
    from fedml_prism.job import build_job, load_data
    from fedml_prism.workloads.models import create_model

    job = build_job(cfg_path)
    data = load_data(job).fedml_dataset(job.settings.batch_size)
    torch.manual_seed(job.prism.seed)
    model = create_model(job.model, init=job.model_init, **job.model_kwargs)
    return PrismClient(model, job.prism, job.settings, data[5], "cpu").train_bundle(bundle)


def defective_uploads(upload: OrderedDict[str, torch.Tensor]) -> list[tuple[str, OrderedDict[str, torch.Tensor], str]]:
    """One defect per PriSM client of ``upload`` (a well-formed frame carries them; the server's checks
    must catch each): ``(name, bundle, reason the server logs)``. Uses as many clients as there are
    defects, in order; clients beyond the defects are left out of the bundle."""
    from fedml_prism.engine.server import NUM_SAMPLES, pack_bundle, unpack_bundle

    def first_float(p: dict[str, torch.Tensor]) -> str:
        return next(k for k, v in p.items() if v.is_floating_point() and v.dim() >= 1 and not k.startswith("prism::"))

    def wrong_dtype(p):
        k = first_float(p)
        p[k] = p[k].double()
        return "has dtype torch.float64"

    def nan(p):
        k = first_float(p)
        p[k] = p[k].clone()
        p[k].view(-1)[0] = float("nan")
        return "has non-finite values"

    def two_counts(p):
        p[NUM_SAMPLES] = torch.tensor([5, 5])
        return "must be a one-element real tensor"

    def huge_count(p):
        p[NUM_SAMPLES] = torch.tensor(2**62)
        return "is not a sample count"

    def traversal_key(p):
        p["../../../../tmp/prism_evil"] = torch.zeros(1)
        return "unexpected keys"

    defects = [("wrong_dtype", wrong_dtype), ("nan", nan), ("two_element_count", two_counts),
               ("huge_count", huge_count), ("traversal_key", traversal_key)]
    out = []
    for (cid, payload), (name, spoil) in zip(unpack_bundle(upload).items(), defects, strict=False):
        p = dict(payload)
        reason = spoil(p)
        out.append((name, pack_bundle({cid: p}), reason))
    return out
