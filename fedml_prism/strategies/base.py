"""What the other methods (``layerwise``, ``fedgkt``, ``superfed``) share besides their rounds, so that
``fedml-prism bench`` compares them with PriSM on the same footing: one-line option errors, the summary
row, and client costs measured rather than counted (trained parameters, forward MACs, and the peak
resident memory of a training step in a fresh process). Their rounds (the same client selection per
round as PriSM's runs, the same metrics rows and files, checkpoints for ``--resume``) are the round
driver's, :func:`~fedml_prism.strategies.driver.drive`, on :mod:`fedml_prism.engine.rounds`.

A method module provides ``run(model, data, settings, options, seed, *, resume=False,
progress=False) -> MethodRun`` (its method class under ``drive``) and a ``SETTING`` label (what travels,
what a client trains).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.utils.checkpoint

#: the "setting" column of bench tables: what a method shares and what a client trains
WEIGHTS_ONLY = "weights only"
SHARES_ACTIVATIONS = "shares features, logits and labels"
TRAINS_FULL_MODEL = "one client trains the full model"


@dataclass
class MethodRun:
    """A finished (or resumed-to-the-end) run of a method: its per-round metrics rows and summary."""

    metrics: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)


def options_from(cls: type, values: Mapping[str, Any] | None, section: str = "method_args") -> Any:
    """A frozen options dataclass from a config mapping; unknown keys raise ``ValueError`` listing the
    known ones (each dataclass checks its values in ``__post_init__``)."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{section} has unknown key(s) {unknown} for this method: allowed keys are {sorted(known)}")
    return cls(**values)


def check_range(name: str, value: Any, lo: float, hi: float, *, integer: bool = False, low_open: bool = False) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is a number in [lo, hi] (``(lo, hi]`` with
    ``low_open``), an integer when ``integer``."""
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (lo < value if low_open else lo <= value) and value <= hi
    if not ok:
        bracket = "(" if low_open else "["
        what = "an integer" if integer else "a number"
        raise ValueError(f"{name}={value!r} is invalid: allowed {what} in {bracket}{lo:g}, {hi:g}]")


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors as they travel (dense, their own dtype)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def summary_of(rows: list[dict[str, Any]], **costs: Any) -> dict[str, Any]:
    """Final / best accuracy and bytes per round of a run's rows, plus the method's client costs
    (``client_params``, ``client_macs``, ``peak_train_mb``, ``setting``, …)."""
    accs = [r["test_acc"] for r in rows if r["test_acc"] == r["test_acc"]]
    rounds = max(len(rows), 1)
    return {
        "final_acc": accs[-1] if accs else float("nan"),
        "best_acc": max(accs) if accs else float("nan"),
        "bytes_per_round": sum(r["bytes_down"] + r["bytes_up"] for r in rows) / rounds,
        "wall_s": rows[-1]["elapsed_s"] if rows else 0.0,
        **costs,
    }


def peak_train_memory_mb(build: Callable[[], tuple[torch.nn.Module, Callable[[], torch.Tensor]]],
                         timeout_s: float = 300.0) -> float:
    """Peak resident memory (MB) of building a client's trainable state and taking two training steps,
    measured in a fresh process like ``benchmarks/step_time.py`` (Linux ``VmHWM`` after resetting it
    right before ``build``). ``build`` returns the module and a function computing one step's loss;
    it must be picklable by reference (a module-level function or ``functools.partial`` of one)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_measure, args=(build, send), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            raise RuntimeError(f"peak memory measurement did not finish within {timeout_s:.0f} s")
        result = receive.recv()
    except EOFError:
        raise RuntimeError(f"peak memory measurement failed (child exit code {child.exitcode})") from None
    finally:
        child.join(timeout=5)
        if child.is_alive():
            child.kill()
    if isinstance(result, str):
        raise RuntimeError(f"peak memory measurement failed: {result}")
    return float(result)


def _measure(build: Callable[[], tuple[torch.nn.Module, Callable[[], torch.Tensor]]], send: Any) -> None:
    try:
        send.send(_peak_mb(build))
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
        send.send(f"{type(err).__name__}: {err}")


def _peak_mb(build: Callable[[], tuple[torch.nn.Module, Callable[[], torch.Tensor]]]) -> float:
    torch.set_num_threads(1)
    # load the kernels, the autograd engine and the optimizer before the baseline, so the figure is the
    # model's and its training step's, not the runtime's first use
    warm = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    warm(torch.zeros(1, 1, 5, 5)).sum().backward()
    torch.optim.SGD(warm.parameters(), lr=0.1, momentum=0.9).step()
    # and checkpointing's first use (activation_memory: principal), which imports torch._dynamo: a fixed
    # cost of the runtime that `import fedml` pays in every FedML process anyway
    x = torch.zeros(2, 2, requires_grad=True)
    torch.utils.checkpoint.checkpoint(torch.sin, x, use_reentrant=False).sum().backward()
    del warm, x

    reset_peak_rss()
    base = proc_status_kb("VmRSS")
    module, loss_fn = build()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
    return (proc_status_kb("VmHWM") - base) / 1024


def proc_status_kb(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (Linux): ``VmRSS`` now, ``VmHWM`` the peak since the last reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak_rss() -> None:
    """Linux: writing 5 to ``clear_refs`` resets the peak RSS (``VmHWM``) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
