"""Reading a device's ``.mnn`` graph in a child process with a time and a memory limit.

An uploaded graph is bytes chosen by a device: MNN's C++ loader parses them, and a bug there must
not be the server's bug. So the server never loads an uploaded graph itself: :func:`read_isolated`
runs this file as a script (``python -I mnn_sandbox.py GRAPH OUT MEMORY_MB``; it imports neither
``fedml_prism`` nor torch, only numpy, safetensors and MNN), in a fresh temporary folder, with a
scrubbed environment (no credentials), and these limits set in the child before MNN is imported:
address space (``RLIMIT_AS``), no core file, a file size cap on what it writes and a CPU-time cap;
the parent kills it at the wall-clock limit. The child writes only the graph's parameters, as
float32 arrays, to a safetensors file (no pickle); the parent checks that file's size, names,
dtypes and shapes before anything is used. A crash, a timeout, a non-zero exit or bad output is an
:class:`UnreadableGraph` naming the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

INPUT, OUTPUT = "data", "prob"  # the names the Android SDK's trainer gives the graph it saves
_OUT_NAME = "params.safetensors"
_STDERR_TAIL = 300


class UnreadableGraph(ValueError):
    """An uploaded graph the child process could not turn into plain parameter arrays."""


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


def graph_module(mnn, path: str, for_training: bool = True):
    """An MNN module of a graph file, with its parameters exposed (``for_training``; MNN 3.x exposes
    none otherwise). Input: the graph's only input (or ``data``); output: ``prob`` (or the only one)."""
    expr = mnn.expr
    var_map = expr.load_as_dict(path)
    inputs, outputs = expr.get_inputs_and_outputs(var_map)
    inp = inputs.get(INPUT) or (next(iter(inputs.values())) if len(inputs) == 1 else None)
    out = outputs.get(OUTPUT) or (next(iter(outputs.values())) if len(outputs) == 1 else None)
    if inp is None or out is None:
        raise ValueError(f"{os.path.basename(path)}: expected one input and an output named {OUTPUT!r}; "
                         f"inputs {sorted(inputs)[:5]}, outputs {sorted(outputs)[:5]}")
    return mnn.nn.load_module([inp], [out], for_training)


def read_isolated(path: str, shapes: list[tuple[int, ...]], limits: ParseLimits | None = None) -> list:
    """The parameters of graph ``path`` as float32 numpy arrays, read by a child process; each must
    have the number of values of the matching entry of ``shapes`` (the graph the server sent).
    Raises :class:`UnreadableGraph` with the reason otherwise."""
    import numpy as np
    from safetensors import safe_open

    limits = limits or ParseLimits()
    expected = sum(int(np.prod(s)) for s in shapes) * 4
    cap = min(limits.max_output_bytes, expected + (1 << 20))
    with tempfile.TemporaryDirectory(prefix="prism_mnn_") as work:
        out = os.path.join(work, _OUT_NAME)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1", "HOME": work, "LANG": "C.UTF-8"}
        if os.environ.get("LD_LIBRARY_PATH"):
            env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
        cmd = [sys.executable, "-I", os.path.abspath(__file__), os.path.abspath(path), out, str(limits.memory_mb),
               str(cap), str(int(limits.timeout_s) + 1)]
        try:
            done = subprocess.run(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=limits.timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise UnreadableGraph(f"the MNN parser timed out after {limits.timeout_s:g} s") from None
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip().splitlines()
            why = tail[-1][:_STDERR_TAIL] if tail else "no message"
            how = f"was killed by signal {-done.returncode}" if done.returncode < 0 else f"exited with {done.returncode}"
            raise UnreadableGraph(f"the MNN parser {how} (limits {limits.timeout_s:g} s, {limits.memory_mb} MiB): {why}")
        if not os.path.isfile(out):
            raise UnreadableGraph("the MNN parser wrote no parameters")
        size = os.path.getsize(out)
        if size > cap:
            raise UnreadableGraph(f"the MNN parser wrote {size} bytes, more than the {cap} expected")
        try:
            with safe_open(out, framework="numpy") as f:
                names = list(f.keys())
                if names != [_name(i) for i in range(len(names))]:
                    raise UnreadableGraph(f"the MNN parser's output has unexpected entries {names[:5]}")
                if len(names) != len(shapes):
                    raise UnreadableGraph(f"the graph has {len(names)} parameters, the graph sent had {len(shapes)}")
                params = []
                for name, shape in zip(names, shapes, strict=True):
                    arr = f.get_tensor(name)
                    if arr.dtype != np.float32:
                        raise UnreadableGraph(f"parameter #{int(name[1:])} has dtype {arr.dtype}, expected float32")
                    if arr.size != int(np.prod(shape)):
                        raise UnreadableGraph(f"parameter #{int(name[1:])} has {arr.size} values, expected "
                                              f"{int(np.prod(shape))} (shape {list(shape)})")
                    params.append(np.array(arr, dtype=np.float32, copy=True))
        except UnreadableGraph:
            raise
        except Exception as err:  # noqa: BLE001 - any failure to read the child's file rejects the graph
            raise UnreadableGraph(f"the MNN parser's output is unreadable: {type(err).__name__}: {err}") from None
    return params


def _name(i: int) -> str:
    return f"p{i:05d}"


# ------------------------------------------------------------------------------ the child
def _limit(memory_mb: int, max_output: int, cpu_s: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_output, max_output))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))


def _child(argv: list[str]) -> int:
    graph, out, memory_mb, max_output, cpu_s = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    _limit(memory_mb, max_output, cpu_s)
    import MNN
    import numpy as np
    from safetensors.numpy import save_file

    module = graph_module(MNN, graph, True)
    arrays = {_name(i): np.ascontiguousarray(np.array(p.read(), dtype=np.float32))
              for i, p in enumerate(module.parameters)}
    save_file(arrays, out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(_child(sys.argv[1:]))
    except MemoryError:
        print("out of memory (mnn_parse_memory_mb)", file=sys.stderr)
        sys.exit(3)
    except Exception as err:  # noqa: BLE001 - the parent reports the last line
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)
