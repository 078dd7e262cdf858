"""Files a run writes: atomically (a crash leaves the old file or the new one, never half of one) and
readable by their owner only (mode 600 whatever the umask: checkpoints hold the model, metrics the run,
key files the secrets).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

import torch

PRIVATE_MODE = 0o600


def write_private(path: str, fill: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through ``fill(binary file)``: into ``path + ".tmp"`` (mode 600, set with ``fchmod``
    since ``open``'s mode applies to new files only), then renamed over ``path``."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), PRIVATE_MODE)
        fill(f)
    os.replace(tmp, path)


def write_private_bytes(path: str, data: bytes | str) -> None:
    write_private(path, lambda f: f.write(data.encode() if isinstance(data, str) else data))


def save_private(path: str, obj: Any) -> None:
    """``torch.save(obj)`` to ``path``, atomically, mode 600."""
    write_private(path, lambda f: torch.save(obj, f))


def write_metrics(out_dir: str, rows: Sequence[Mapping[str, Any]], nested: Sequence[str] = ()) -> None:
    """``metrics.json`` (every field) and ``metrics.csv`` (the fields of the first row but ``nested``)."""
    write_private_bytes(os.path.join(out_dir, "metrics.json"), json.dumps(list(rows), indent=1))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=[k for k in rows[0] if k not in nested], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_private_bytes(os.path.join(out_dir, "metrics.csv"), text.getvalue())
