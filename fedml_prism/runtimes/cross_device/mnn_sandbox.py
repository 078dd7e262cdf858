"""Reading a device's ``.mnn`` graph in a sandboxed child process.

An uploaded graph is bytes chosen by a device: MNN's C++ loader parses them, and a bug there must not be the
server's bug. So the server never loads an uploaded graph itself: :func:`read_isolated` runs
:mod:`~fedml_prism.runtimes.cross_device.mnn_sandbox_child` as a script (``python -I mnn_sandbox_child.py SPEC``;
the confinement layers below are its code; it imports neither ``fedml_prism`` nor torch, only numpy,
safetensors and MNN) and reads back only float32 arrays, as safetensors (no pickle), whose file type, size,
names, dtypes and shapes it checks. A crash, a timeout, a non-zero exit or bad output is an
:class:`UnreadableGraph` naming the reason.

The child imports numpy, safetensors and MNN first (trusted code, with the server's file access: the Python
install need not be readable by the sandbox uid), then, still before it opens the graph, confines itself
in layers. What holds, by layer:

* Always (any uid, any Linux): the graph is copied into a fresh, otherwise empty folder (mode 0700) that is
  the child's working directory and the only place its output is read from; the environment is scrubbed
  (no credentials), ``python -I``, no inherited descriptors but ``/dev/null`` and a stderr file of bounded
  size (``RLIMIT_FSIZE``); rlimits on address space, CPU time, file size, open files, no core file;
  ``no_new_privs``; the child leads its own session and process group, which is SIGKILLed whole at the
  wall-clock limit and after the child exits. The output is opened without following links and must be a
  regular file of the child's with one link and at most the expected size.
* ``seccomp`` (x86_64 and aarch64 kernels with seccomp filters, as Debian's and most distributions' are;
  the filter is written here, no package): the child cannot create sockets (no network, no Unix sockets),
  create processes (fork, vfork, clone without ``CLONE_THREAD``; threads are allowed), exec, ptrace or
  read/write another process's memory, signal any process but itself, or use io_uring, unshare/setns, bpf,
  perf_event_open, keyctl or userfaultfd. So no process outlives the child, and the process-group kill
  ends everything it runs.
* ``landlock`` (Linux >= 5.13 built with Landlock and booted with it in the LSM list, a choice of each
  distribution's kernel; the child probes it): the child reads only the Python installation's standard
  library, the site-packages folders of numpy, safetensors and MNN, the system library folders,
  ``/etc/ld.so.cache``, ``/proc/cpuinfo``, ``/sys/devices/system/cpu`` and ``/dev/null`` / ``/dev/urandom``,
  and writes (regular files only) in its own folder: nothing of the server's job folder, configs, keys or
  checkpoints, not even world-readable ones, and no ``/proc`` of another process. With Landlock ABI >= 4
  (Linux 6.7) no TCP bind or connect; with ABI >= 6 (Linux 6.12) no signal and no abstract Unix socket
  outside its own domain.
* ``uid`` (only when the server runs as root): the child runs as a fresh unprivileged uid/gid per parse
  (random in [1 600 000 000, + 2^20), no supplementary groups), so even without Landlock it reads only
  world-readable files and writes only where anyone may (``/tmp``), cannot signal or ptrace the server,
  and is limited to 32 tasks (``RLIMIT_NPROC``); after the child exits or times out every process of that
  uid is SIGKILLed, so even without seccomp a ``setsid()`` grandchild does not survive. A root whose
  ``/proc/self/uid_map`` does not map that range (a rootless container) runs the child as itself.
* ``netns``: the child gets its own network namespace (only a loopback that is down): as root directly,
  otherwise (or where root lacks ``CAP_SYS_ADMIN``) inside a new user namespace, where the kernel allows
  unprivileged user namespaces (Debian's default: yes; Ubuntu 24.04 with its AppArmor default: no).

Where a layer is unavailable the first parse logs one warning naming it and why. What that leaves open:
without ``uid`` (server not root) the child has the server's uid, so without Landlock it can read every
file the server can and, through ``/proc``, the server's memory; without seccomp it can fork, and as a
non-root user a ``setsid()`` grandchild escapes the process-group kill; without seccomp and ``netns`` it
has the server's network (Landlock ABI >= 4 closes TCP only).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ...settings.limits import ParseLimits
from . import mnn_sandbox_child
from .mnn_sandbox_child import _GRAPH_NAME, _OUT_NAME, _REPORT, _name

log = logging.getLogger(__name__)

_STDERR_TAIL = 300
LAYERS = frozenset({"uid", "netns", "landlock", "seccomp"})
_UID_BASE, _UID_SPAN = 1_600_000_000, 1 << 20
_said: set[str] = set()


class UnreadableGraph(ValueError):
    """An uploaded graph the child process could not turn into plain parameter arrays."""


def read_isolated(path: str, shapes: list[tuple[int, ...]], limits: ParseLimits | None = None) -> list:
    """The parameters of graph ``path`` as float32 numpy arrays, read by a sandboxed child process; each
    must have the number of values of the matching entry of ``shapes`` (the graph the server sent).
    Raises :class:`UnreadableGraph` with the reason otherwise."""
    import numpy as np

    limits = limits or ParseLimits()
    expected = sum(int(np.prod(s)) for s in shapes) * 4
    cap = min(limits.max_output_bytes, expected + (1 << 20))
    with _sandboxed(path, limits, cap) as run:
        if run.timed_out:
            raise UnreadableGraph(f"the MNN parser timed out after {limits.timeout_s:g} s")
        if run.returncode != 0:
            tail = run.stderr.strip().splitlines()
            why = tail[-1][:_STDERR_TAIL] if tail else "no message"
            how = f"was killed by signal {-run.returncode}" if run.returncode < 0 else f"exited with {run.returncode}"
            raise UnreadableGraph(f"the MNN parser {how} (limits {limits.timeout_s:g} s, {limits.memory_mb} MiB): {why}")
        data = _read_output(os.path.join(run.work, _OUT_NAME), run.uid, cap)
    try:
        from safetensors.numpy import load

        arrays = load(data)
    except Exception as err:  # noqa: BLE001 - any failure to read the child's file rejects the graph
        raise UnreadableGraph(f"the MNN parser's output is unreadable: {type(err).__name__}: {err}") from None
    names = sorted(arrays)
    if names != [_name(i) for i in range(len(names))]:
        raise UnreadableGraph(f"the MNN parser's output has unexpected entries {names[:5]}")
    if len(names) != len(shapes):
        raise UnreadableGraph(f"the graph has {len(names)} parameters, the graph sent had {len(shapes)}")
    params = []
    for i, (name, shape) in enumerate(zip(names, shapes, strict=True)):
        arr = arrays[name]
        if arr.dtype != np.float32:
            raise UnreadableGraph(f"parameter #{i} has dtype {arr.dtype}, expected float32")
        if arr.size != int(np.prod(shape)):
            raise UnreadableGraph(f"parameter #{i} has {arr.size} values, expected {int(np.prod(shape))} "
                                  f"(shape {list(shape)})")
        params.append(np.array(arr, dtype=np.float32, copy=True))
    return params


def _read_output(path: str, uid: int | None, cap: int) -> bytes:
    """The child's output file: opened without following a link or blocking on a FIFO, and only a regular
    file with one link (no hard link to another file), of the sandbox uid when there is one, and at most
    ``cap`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UnreadableGraph("the MNN parser wrote no parameters") from None
    except OSError as err:
        raise UnreadableGraph(f"the MNN parser's output cannot be opened: {err.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or (uid is not None and st.st_uid != uid):
            raise UnreadableGraph("the MNN parser's output is not a regular file of its own")
        if st.st_size > cap:
            raise UnreadableGraph(f"the MNN parser wrote {st.st_size} bytes, more than the {cap} expected")
        data = f.read(cap + 1)
    if len(data) > cap:
        raise UnreadableGraph(f"the MNN parser wrote more than the {cap} bytes expected")
    return data


# ------------------------------------------------------------------------------ the launcher
@dataclass
class _Run:
    """One sandboxed run: ``returncode`` (None when it timed out), the child's stderr (head and tail), the
    layers it reported, its uid (None: the server's), process group and working folder."""

    returncode: int | None
    stderr: str
    pgid: int
    uid: int | None
    work: str
    report: dict = field(default_factory=dict)

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def _sandbox_uid() -> tuple[int | None, str]:
    """A fresh uid for one child, or None and why not."""
    if os.geteuid() != 0:
        return None, f"the server runs as uid {os.geteuid()}, not root"
    for name in ("uid_map", "gid_map"):
        try:
            with open(f"/proc/self/{name}") as f:
                ranges = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
        except OSError as err:
            return None, f"/proc/self/{name}: {err.strerror}"
        if not any(lo <= _UID_BASE and _UID_BASE + _UID_SPAN <= lo + n for lo, _, n in ranges):
            return None, f"/proc/self/{name} maps no ids in [{_UID_BASE}, {_UID_BASE + _UID_SPAN})"
    return _UID_BASE + secrets.randbelow(_UID_SPAN), ""


@contextlib.contextmanager
def _sandboxed(graph: str | None, limits: ParseLimits, cap: int, *, layers: frozenset[str] = LAYERS,
               script: str | None = None, args: tuple[str, ...] = ()) -> Iterator[_Run]:
    """Run the child on a copy of ``graph`` in a fresh folder, confined by ``layers``; yield the finished
    run while its folder still exists. ``script`` (tests only: a stand-in parser) is a file whose top level
    runs before the child confines itself (imports, definitions), and whose ``main(args)`` then runs
    confined in place of the parse."""
    uid, why = _sandbox_uid() if "uid" in layers else (None, "not asked for")
    with tempfile.TemporaryDirectory(prefix="prism_mnn_", ignore_cleanup_errors=True) as work, \
            tempfile.TemporaryFile(prefix="prism_mnn_err_") as err:
        if graph is not None:
            try:
                shutil.copyfile(graph, os.path.join(work, _GRAPH_NAME))
            except OSError as e:
                raise UnreadableGraph(f"the graph cannot be copied for the MNN parser: {e.strerror}") from None
            os.chmod(os.path.join(work, _GRAPH_NAME), 0o400)
        if uid is not None:
            for p in (work, os.path.join(work, _GRAPH_NAME)):
                if os.path.exists(p):
                    os.chown(p, uid, uid)
        spec = {"memory_mb": limits.memory_mb, "max_output": cap, "cpu_s": int(limits.timeout_s) + 1,
                "uid": uid, "uid_why": why, "layers": sorted(layers), "script": script, "args": list(args)}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": work, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if os.environ.get("LD_LIBRARY_PATH"):
            env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
        cmd = [sys.executable, "-I", os.path.abspath(mnn_sandbox_child.__file__), json.dumps(spec)]
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, close_fds=True, start_new_session=True)
        try:
            code = _wait(proc, limits.timeout_s)
        finally:
            _end(proc, uid)
        run = _Run(code, _head_and_tail(err), proc.pid, uid, work)
        # the first such line is the child's own: anything the graph could make it print comes after it
        first = next((line for line in run.stderr.splitlines() if line.startswith(_REPORT)), None)
        if first is not None:
            with contextlib.suppress(ValueError):
                run.report = json.loads(first[len(_REPORT):])
                _say(run.report)
        yield run


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    """The child's exit status (None at the timeout), leaving it a zombie so its process group id stays
    reserved until the group is killed."""
    deadline = time.monotonic() + timeout
    while True:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def _end(proc: subprocess.Popen, uid: int | None) -> None:
    """SIGKILL the child's process group, reap the child, then SIGKILL every process of the sandbox uid."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if uid is not None:
        _kill_uid(uid)


def _kill_uid(uid: int) -> None:
    """SIGKILL every live process whose real uid is ``uid`` (zombies are dead already), until none is left."""
    for _ in range(200):  # a fork loop is bounded by RLIMIT_NPROC: each pass kills what it finds
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/status") as f:
                        fields = dict(line.split(":", 1) for line in f if line.startswith(("State:", "Uid:")))
                except (OSError, ValueError):
                    continue
                if fields.get("Uid", "").split()[:1] == [str(uid)] and fields.get("State", "").split()[:1] != ["Z"]:
                    found.append(int(entry))
        if not found:
            return
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)
    log.warning("MNN graph sandbox: processes of uid %d still appear after 200 SIGKILL passes", uid)


def _head_and_tail(f, size: int = 4096) -> str:
    f.seek(0, os.SEEK_END)
    total = f.tell()
    f.seek(0)
    if total <= 2 * size:
        return f.read().decode(errors="replace")
    head = f.read(size)
    f.seek(total - size)
    return (head + b"\n...\n" + f.read(size)).decode(errors="replace")


def _say(report: dict) -> None:
    """Log, once per process and kind, which layers held and which did not (and why)."""
    held, missing = report.get("held", {}), report.get("missing", {})
    key = json.dumps([sorted(held), missing], sort_keys=True)
    if key in _said:
        return
    _said.add(key)
    names = ", ".join(f"{k} ({v})" if k != "uid" else "uid (a fresh uid per parse)" for k, v in sorted(held.items()))
    if missing:
        lost = "; ".join(f"{k}: {v}" for k, v in sorted(missing.items()))
        log.warning("MNN graph sandbox: holds %s; NOT available: %s (see fedml_prism/runtimes/cross_device/mnn_sandbox.py "
                    "for what that leaves open)", names or "rlimits and the process-group kill only", lost)
    else:
        log.info("MNN graph sandbox: holds %s", names)
