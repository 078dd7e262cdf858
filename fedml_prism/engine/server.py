"""Rounds of a PriSM job, independent of any transport (no FedML import).

``PrismServer`` selects clients, hands out sub-model payloads (one per client, or bundled per worker
process so one process can train several clients a round), aggregates, evaluates, logs one line per
round, writes ``metrics.csv`` / ``metrics.json`` and checkpoints. ``PrismClient`` trains payloads.
The FedML glue (:mod:`fedml_prism.runtimes.fedml_glue`) wraps these two; every runtime goes through them.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from . import vectorized
from .attention import convert_attention
from .config import PrismConfig, RunSettings  # noqa: F401 - RunSettings re-exported (its old home)
from .layers import convert_static_bn
from .principal import AggregateReport, ClientUpdate, PrincipalModel
from .rounds import (
    CHECKPOINT,
    CHECKPOINT_SCHEMA,
    RunLog,
    checkpoints,
    client_batches,
    evaluates,
    read_checkpoint,
    round_lr,
    write_checkpoint,
)
from .sampling import make_generator
from .submodel import SubModel, meta_skeleton
from .train import TrainStats, evaluate, local_train

log = logging.getLogger("fedml_prism")

NUM_SAMPLES = "prism::num_samples"
TRAIN_LOSS = "prism::train_loss"
START_LOSS = "prism::start_loss"


def select_clients(seed: int, round_idx: int, total: int, per_round: int) -> list[int]:
    """The round's clients: ``per_round`` of ``total``, uniformly, seeded by (seed, round)."""
    perm = torch.randperm(total, generator=make_generator(seed, "select", round_idx))
    return sorted(perm[:per_round].tolist())


def assign_to_workers(clients: list[int], workers: int) -> list[list[int]]:
    """Round-robin: worker ``w`` trains ``clients[w::workers]``."""
    return [clients[w::workers] for w in range(workers)]


def pack_bundle(payloads: Mapping[int, Mapping[str, Tensor]]) -> OrderedDict[str, Tensor]:
    """Several clients' payloads in one flat ``dict[str, Tensor]``: keys ``c<id>/<key>``."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    for cid, payload in payloads.items():
        for key, value in payload.items():
            out[f"c{cid}/{key}"] = value
    return out


def unpack_bundle(bundle: Mapping[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    """Inverse of :func:`pack_bundle`; raises ``ValueError`` on a malformed key."""
    out: dict[int, dict[str, Tensor]] = {}
    for key, value in bundle.items():
        head, sep, rest = key.partition("/")
        if not sep or not head.startswith("c") or not head[1:].isdigit():
            raise ValueError(f"bundle key {key!r} is not of the form c<client id>/<entry>")
        out.setdefault(int(head[1:]), {})[rest] = value
    return out


#: the largest sample count a client may claim (``weighting: samples`` weighs updates by it)
MAX_SAMPLES = 10**9


def _scalar(value: Any, key: str, integer: bool = False) -> float:
    """One number a client reports (``prism::num_samples`` / losses), checked: a one-element real
    tensor; a sample count must be an integer in ``[1, MAX_SAMPLES]``; a missing loss is NaN."""
    if value is None:
        if integer:
            raise ValueError(f"{key!r} is missing")
        return float("nan")
    if not isinstance(value, Tensor) or value.is_meta or value.numel() != 1 or value.is_complex():
        raise ValueError(f"{key!r} must be a one-element real tensor")
    number = float(value.detach().cpu().reshape(()).double())
    if integer and not (math.isfinite(number) and number == int(number) and 1 <= number <= MAX_SAMPLES):
        raise ValueError(f"{key!r}={number!r} is not a sample count in [1, {MAX_SAMPLES}]")
    return number


def payload_bytes(payload: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in payload.values())


class Deadline:
    """One re-armable timer (daemon thread): arming it again replaces the pending call."""

    def __init__(self) -> None:
        self._timer: threading.Timer | None = None

    def arm(self, func: Any, seconds: float) -> None:
        self.cancel()
        self._timer = threading.Timer(seconds, func)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class PrismServer:
    """The server's side of a job: one object per run, whatever the transport."""

    def __init__(
        self,
        model: nn.Module,
        config: PrismConfig,
        settings: RunSettings,
        test_data: Iterable | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config, self.settings = config, settings
        self.pm = PrincipalModel(model, config)
        self.test_data, self.device = test_data, device
        self.run_log = RunLog(settings.output_dir, config.strategy, nested=("layers",))  # per-layer: metrics.json only
        self.selected: list[int] = []
        self._bytes_down = 0
        self._dense_client_loss = float("nan")
        self._round_start = time.time()

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The metrics rows of the rounds played so far."""
        return self.run_log.rows

    @property
    def round_idx(self) -> int:
        """The round being played (= rounds aggregated so far)."""
        return self.pm.rounds_done

    @property
    def finished(self) -> bool:
        return self.round_idx >= self.settings.comm_round

    # ---------------------------------------------------------------- handing out sub-models
    def open_round(self) -> list[int]:
        """Select this round's clients; returns their ids."""
        s = self.settings
        self.selected = select_clients(self.config.seed, self.round_idx, s.client_num_in_total, s.client_num_per_round)
        self._bytes_down = 0
        self._dense_client_loss = float("nan")
        self._round_start = time.time()
        return self.selected

    def record_dense_client_loss(self, loss: float) -> None:
        """The dense global model's mean loss on the round's client data (a simulation can measure
        it; a deployed server cannot see client data)."""
        self._dense_client_loss = float(loss)

    def payload_for(self, client_id: int) -> dict[str, Tensor]:
        """The ``down`` payload of one selected client (the server remembers what it sent)."""
        payload = self.pm.sample_submodel(client_id, self.round_idx).to_payload("down")
        self._bytes_down += payload_bytes(payload)
        return payload

    def count_bytes_down(self, nbytes: int) -> None:
        """Account for bytes sent in another form than a payload (e.g. an MNN graph)."""
        self._bytes_down += int(nbytes)

    def bundles(self, workers: int) -> dict[int, OrderedDict[str, Tensor]]:
        """Open a round and give each of ``workers`` processes the payloads of its clients."""
        self.open_round()
        return {
            w: pack_bundle({cid: self.payload_for(cid) for cid in clients})
            for w, clients in enumerate(assign_to_workers(self.selected, workers))
        }

    # ---------------------------------------------------------------- closing a round
    def updates_from_bundles(self, bundles: Iterable[Mapping[str, Tensor]]) -> list[ClientUpdate]:
        """Turn uploaded bundles into updates; entries of clients not selected are dropped."""
        updates = []
        for bundle in bundles:
            try:
                per_client = unpack_bundle(bundle)
            except (ValueError, AttributeError, TypeError) as err:
                log.warning("round %d: dropped a malformed bundle: %s", self.round_idx + 1, err)
                continue
            for cid, payload in per_client.items():
                if cid not in self.selected:
                    log.warning("round %d: dropped an update for client %d, which was not selected", self.round_idx + 1, cid)
                    continue
                try:
                    num = _scalar(payload.pop(NUM_SAMPLES, None), NUM_SAMPLES, integer=True)
                    loss = _scalar(payload.pop(TRAIN_LOSS, None), TRAIN_LOSS)
                    start = _scalar(payload.pop(START_LOSS, None), START_LOSS)
                except ValueError as err:
                    log.warning("round %d: dropped the update of client %d: %s", self.round_idx + 1, cid, err)
                    continue
                updates.append(ClientUpdate(cid, payload, int(num), loss, start))
        return updates

    def close_round(self, updates: list[ClientUpdate]) -> dict[str, Any]:
        """Aggregate, evaluate, log, write metrics, checkpoint. Returns the round's metrics row."""
        r = self.round_idx
        s = self.settings
        valid = [u for u in updates if u.client_id in self.selected]
        distinct = self.pm.distinct_selections()
        if len({u.client_id for u in valid}) < s.min_clients_per_round:
            log.warning("round %d: %d updates < min_clients_per_round=%d; the global model is kept",
                        r + 1, len(valid), s.min_clients_per_round)
            report = self.pm.aggregate([])
        else:
            report = self.pm.aggregate(valid)
        accepted = [u for u in valid if u.client_id in report.accepted]
        row = self.run_log.add(r, self._round_start, **self._metrics_fields(r, report, accepted), distinct_submodels=distinct)
        if checkpoints(s, r):
            self.save_checkpoint()
        log.info(
            "round %d/%d | acc %s | loss %s | train %.4f | clients %d/%d | down %.2f MB up %.2f MB | %.1f s",
            r + 1, s.comm_round, _fmt(row["test_acc"]), _fmt(row["test_loss"]), row["train_loss"],
            row["clients"], len(self.selected), row["bytes_down"] / 1e6, row["bytes_up"] / 1e6, row["round_s"],
        )
        return row

    def _metrics_fields(self, r: int, report: AggregateReport, accepted: list[ClientUpdate]) -> dict[str, Any]:
        acc = loss = float("nan")
        if self.test_data is not None and evaluates(self.settings, r):
            acc, loss = evaluate(self.pm.dense_model(self.device), self.test_data, self.device)
        losses = [u.train_loss for u in accepted if u.train_loss == u.train_loss]
        starts = [u.start_loss for u in accepted if u.start_loss == u.start_loss]
        return {
            "test_acc": acc,
            "test_loss": loss,
            "train_loss": sum(losses) / len(losses) if losses else float("nan"),
            "start_loss": sum(starts) / len(starts) if starts else float("nan"),
            "dense_client_loss": self._dense_client_loss,
            "clients": len(report.accepted),
            "rejected": len(report.rejected),
            "coverage": report.coverage,
            "bytes_down": self._bytes_down,
            "bytes_up": sum(payload_bytes(u.payload) for u in accepted),
            "layers": report.layers,
        }

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.settings.output_dir, CHECKPOINT)

    def save_checkpoint(self) -> None:
        # the identity is the config inside the server's state, compared with tolerance for new keys below
        write_checkpoint(self.settings.output_dir, self.config.strategy, {}, self.round_idx, self.metrics,
                         {"server": self.pm.state_dict()})

    def load_checkpoint(self) -> bool:
        """Continue from ``checkpoint.pt`` in the output dir; ``False`` if there is none."""
        state = read_checkpoint(self.settings.output_dir, self.config.strategy, None, upgrade=_upgrade_checkpoint)
        if state is None:
            return False
        saved = state["server"]["config"]
        # a key the checkpoint lacks is an option added since it was written: the layer check of
        # PrincipalModel.load_state_dict still refuses a checkpoint of another layer set
        current = {k: v for k, v in self.config.to_dict().items() if k in saved}
        if saved != current:
            diff = sorted(k for k in saved if saved[k] != current.get(k))
            raise ValueError(f"checkpoint {self.checkpoint_path} was written with other prism_args ({', '.join(diff)}): {saved}")
        self.pm.load_state_dict(state["server"])
        self.run_log = RunLog(self.settings.output_dir, self.config.strategy, list(state["metrics"]), nested=("layers",))
        log.info("resumed from %s after round %d", self.checkpoint_path, self.round_idx)
        return True


class PrismClient:
    """Trains sub-model payloads on the local data of the clients this process hosts."""

    def __init__(
        self,
        model: nn.Module,
        config: PrismConfig,
        settings: RunSettings,
        client_data: Mapping[int, Dataset | DataLoader],
        device: torch.device | str = "cpu",
    ) -> None:
        template = convert_attention(copy.deepcopy(model))  # as PrincipalModel prepares it
        self.template = meta_skeleton(convert_static_bn(template) if config.static_bn else template)
        self.config, self.settings = config, settings
        self.client_data, self.device = client_data, device
        self._vectorized_notes: set[str] = set()

    def _batches(self, client_id: int, round_idx: int) -> Iterable:
        data = self.client_data[client_id]
        dataset = data.dataset if isinstance(data, DataLoader) else data
        if not isinstance(dataset, Dataset):
            return data  # a plain iterable of batches: used as given
        return client_batches(dataset, self.settings, self.config.seed, round_idx, client_id)

    def learning_rate(self, round_idx: int) -> float:
        """The round's learning rate (:func:`~fedml_prism.engine.rounds.round_lr`)."""
        return round_lr(self.settings, round_idx)

    def eval_batches(self, client_id: int) -> Iterable:
        """The client's data in order, in training-size batches (static BN normalizes per batch):
        what the loss diagnostics evaluate on."""
        data = self.client_data[client_id]
        dataset = data.dataset if isinstance(data, DataLoader) else data
        if not isinstance(dataset, Dataset):
            return data
        return DataLoader(dataset, batch_size=self.settings.batch_size, shuffle=False)

    def diagnose_round(self, round_idx: int) -> bool:
        """Whether round ``round_idx`` (0-based) records the loss diagnostics (evaluation rounds)."""
        return self.settings.diagnostics and evaluates(self.settings, round_idx)

    def train(self, payload: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int, float, float]:
        """Train one ``down`` payload; returns the ``up`` payload, sample count, mean training loss
        and (diagnostics rounds, else NaN) the received sub-model's loss on the data before training."""
        return self._train_sub(self._received(payload))

    def _train_sub(self, sub: SubModel) -> tuple[dict[str, Tensor], int, float, float]:
        start = self._start_loss(sub)
        s = self.settings
        stats = local_train(
            sub.module, self._batches(sub.client_id, sub.round_idx), epochs=s.epochs,
            lr=self.learning_rate(sub.round_idx),
            momentum=s.momentum, weight_decay=s.weight_decay, reg_lambda=self.config.reg_lambda,
            clip_norm=s.clip_grad_norm or None, device=self.device,
            momentum_buffers=sub.momentum if self.config.optimizer_state == "aggregate" else None,
            activation_memory=self.config.activation_memory,
        )
        return self._trained(sub, stats, start)

    def _received(self, payload: Mapping[str, Tensor]) -> SubModel:
        sub = SubModel.from_payload(payload, self.template, self.device)
        if sub.client_id not in self.client_data:
            raise ValueError(f"this process holds no data for client {sub.client_id}")
        return sub

    def _start_loss(self, sub: SubModel) -> float:
        if self.diagnose_round(sub.round_idx):
            return evaluate(sub.module, self.eval_batches(sub.client_id), self.device)[1]
        return float("nan")

    @staticmethod
    def _trained(sub: SubModel, stats: TrainStats, start: float) -> tuple[dict[str, Tensor], int, float, float]:
        sub.momentum = stats.momentum
        return sub.to_payload("up"), stats.samples, stats.loss, start

    def train_bundle(self, bundle: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
        """Train every client in a bundle, one after the other; returns the upload bundle."""
        return pack_bundle({cid: _upload(*self.train(payload)) for cid, payload in unpack_bundle(bundle).items()})

    def vectorized_problem(self, sub: SubModel) -> str | None:
        """Why ``sub`` cannot train in a batched group (None: it can)."""
        data = self.client_data[sub.client_id]
        dataset = data.dataset if isinstance(data, DataLoader) else data
        if type(dataset) is not TensorDataset:
            return f"a client's data is a {type(dataset).__name__}, not a TensorDataset"
        return vectorized.problem(sub.module)

    def train_bundles_vectorized(self, bundles: Mapping[int, Mapping[str, Tensor]]) -> dict[int, OrderedDict[str, Tensor]]:
        """Train a round's bundles (by worker index) with the clients of equal sub-model shapes and equal
        sample counts as one batched computation each (:mod:`~fedml_prism.engine.vectorized`); a client
        that cannot be batched, or has no partner, trains sequentially (one log line per reason)."""
        per_worker = {w: unpack_bundle(b) for w, b in bundles.items()}
        subs = {cid: self._received(p) for clients in per_worker.values() for cid, p in clients.items()}
        groups: dict[Any, list[int]] = {}
        for cid, sub in subs.items():
            if reason := self.vectorized_problem(sub):
                if reason not in self._vectorized_notes:
                    self._vectorized_notes.add(reason)
                    log.info("parallel_clients: vectorized: %s; such clients train one after the other", reason)
                groups[("sequential", cid)] = [cid]
                continue
            data = self.client_data[cid]
            size = len(data.dataset if isinstance(data, DataLoader) else data)
            groups.setdefault((vectorized.shape_key(sub.module), size, sub.round_idx), []).append(cid)
        done: dict[int, tuple[dict[str, Tensor], int, float, float]] = {}
        s = self.settings
        if self.config.activation_memory != "full" and "activation_memory" not in self._vectorized_notes:
            self._vectorized_notes.add("activation_memory")
            log.info("parallel_clients: vectorized: a batched group trains with plain autograd (the same loss and "
                     "gradients as activation_memory=%s; it holds the group's activations)", self.config.activation_memory)
        for cids in groups.values():
            if len(cids) == 1:
                done[cids[0]] = self._train_sub(subs[cids[0]])
                continue
            members = [subs[c] for c in cids]
            starts = [self._start_loss(sub) for sub in members]
            aggregate = self.config.optimizer_state == "aggregate"
            stats = vectorized.train_together(
                [sub.module for sub in members], [self._batches(c, subs[c].round_idx) for c in cids], epochs=s.epochs,
                lr=self.learning_rate(members[0].round_idx), momentum=s.momentum, weight_decay=s.weight_decay,
                reg_lambda=self.config.reg_lambda, clip_norm=s.clip_grad_norm or None, device=self.device,
                momentum_buffers=[sub.momentum for sub in members] if aggregate else None,
            )
            for cid, sub, st, start in zip(cids, members, stats, starts, strict=True):
                done[cid] = self._trained(sub, st, start)
        return {w: pack_bundle({cid: _upload(*done[cid]) for cid in clients}) for w, clients in per_worker.items()}


def _upload(up: dict[str, Tensor], num: int, loss: float, start: float) -> dict[str, Tensor]:
    """A trained client's ``up`` payload with its sample count and losses."""
    up[NUM_SAMPLES] = torch.tensor(num)
    up[TRAIN_LOSS] = torch.tensor(loss)
    up[START_LOSS] = torch.tensor(start)
    return up


def _upgrade_checkpoint(state: dict[str, Any]) -> dict[str, Any] | None:
    """A PriSM checkpoint of schema 1 (``{"server", "metrics"}``) in today's layout; its identity, the
    config in the server's state, is compared by :meth:`PrismServer.load_checkpoint`."""
    if set(state) != {"server", "metrics"}:
        return None
    return {"schema": CHECKPOINT_SCHEMA, "method": state["server"]["config"]["strategy"], "identity": {},
            "round": int(state["server"]["rounds_done"]), **state}


def _fmt(x: float) -> str:
    return "  n/a " if x != x else f"{x:.4f}"

