"""Limits of the sandboxed parse of a device's MNN graph (cross-device): ``mnn_parse_timeout_s`` and
``mnn_parse_memory_mb`` (see :mod:`fedml_prism.runtimes.cross_device.mnn_sandbox`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParseLimits:
    """Limits of one parse: wall-clock seconds, address space of the child (MiB), and the largest
    parameter file it may write (bytes)."""

    timeout_s: float = 20.0
    memory_mb: int = 2048
    max_output_bytes: int = 1 << 30

    @classmethod
    def from_flat(cls, flat: dict) -> ParseLimits:
        """``mnn_parse_timeout_s`` / ``mnn_parse_memory_mb`` of a job's flat config, checked."""
        timeout = flat.get("mnn_parse_timeout_s", cls.timeout_s)
        memory = flat.get("mnn_parse_memory_mb", cls.memory_mb)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 600:
            raise ValueError(f"mnn_parse_timeout_s={timeout!r} is invalid: allowed a number of seconds in (0, 600]")
        if isinstance(memory, bool) or not isinstance(memory, int) or not 256 <= memory <= 1 << 20:
            raise ValueError(f"mnn_parse_memory_mb={memory!r} is invalid: allowed an integer in [256, 1048576]")
        return cls(float(timeout), memory)
