"""The child process of the MNN graph sandbox (:mod:`fedml_prism.runtimes.cross_device.mnn_sandbox`): the
script the launcher runs (``python -I mnn_sandbox_child.py SPEC``) to parse one uploaded graph, and the
confinement layers it applies to itself before it opens the graph (rlimits, network namespace, sandbox
uid, ``no_new_privs``, Landlock, seccomp; what each holds is in the launcher's module doc).

Run as a script it imports nothing of ``fedml_prism`` (``python -I`` puts no project folder on the path):
only the standard library here, then numpy, safetensors and MNN, all before it confines itself. Its
first stderr line reports the layers that held; the parameters go to a safetensors file in its folder.
The launcher imports the names both sides share (``graph_module``, the file names) from here.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import struct
import sys

INPUT, OUTPUT = "data", "prob"  # the names the Android SDK's trainer gives the graph it saves
_GRAPH_NAME, _OUT_NAME = "graph.mnn", "params.safetensors"
_REPORT = "prism-sandbox: "  # the child's first stderr line, written before it touches the graph
_NPROC = 32  # tasks (threads) of the sandbox uid
_NOFILE = 64


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



def _name(i: int) -> str:
    return f"p{i:05d}"



def _limit(memory_mb: int, max_output: int, cpu_s: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_output, max_output))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_NOFILE, (_NOFILE, _NOFILE))


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _errno_text() -> str:
    import ctypes

    return os.strerror(ctypes.get_errno())


# Landlock (linux/landlock.h): access rights by bit, syscalls 444-446 on x86_64 and aarch64
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_LL_REMOVE_FILE, _LL_MAKE_REG, _LL_TRUNCATE = 1 << 5, 1 << 8, 1 << 14
_LL_CREATE, _LL_ADD_RULE, _LL_RESTRICT = 444, 445, 446


def _landlock(work: str, read_paths: list[str], ctypes, libc) -> str:
    """Confine the file system (and TCP, signals and abstract sockets where the ABI has them); returns what
    held, raises OSError with why not."""
    abi = libc.syscall(_LL_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        raise OSError(ctypes.get_errno(), f"Landlock is unavailable ({_errno_text()})")
    fs = (1 << {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)) - 1  # every file-system right this ABI knows
    net = 0b11 if abi >= 4 else 0  # bind and connect TCP
    scoped = 0b11 if abi >= 6 else 0  # abstract Unix sockets and signals
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    attr = ctypes.create_string_buffer((fs.to_bytes(8, "little") + net.to_bytes(8, "little")
                                        + scoped.to_bytes(8, "little"))[:size])
    ruleset = libc.syscall(_LL_CREATE, attr, ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), f"landlock_create_ruleset: {_errno_text()}")
    read_dir, read_file = _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR, _LL_EXECUTE | _LL_READ_FILE
    write = _LL_READ_FILE | _LL_READ_DIR | _LL_WRITE_FILE | _LL_REMOVE_FILE | _LL_MAKE_REG | _LL_TRUNCATE
    rules = {work: write & fs, "/dev/null": (_LL_READ_FILE | _LL_WRITE_FILE) & fs, "/dev/urandom": _LL_READ_FILE,
             "/etc/ld.so.cache": _LL_READ_FILE, "/proc/cpuinfo": _LL_READ_FILE}
    for path in read_paths:
        rules.setdefault(path, read_dir)
    try:
        for path, access in rules.items():
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # not on this machine
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    access &= read_file | _LL_WRITE_FILE | _LL_TRUNCATE
                rule = ctypes.create_string_buffer(access.to_bytes(8, "little") + fd.to_bytes(4, "little", signed=True))
                if libc.syscall(_LL_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(1), rule, ctypes.c_uint32(0)):
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}: {_errno_text()}")
            finally:
                os.close(fd)
        if libc.syscall(_LL_RESTRICT, ctypes.c_int(ruleset), ctypes.c_uint32(0)):
            raise OSError(ctypes.get_errno(), f"landlock_restrict_self: {_errno_text()}")
    finally:
        os.close(ruleset)
    extra = (", no TCP bind/connect" if net else "") + (", signals and abstract sockets scoped" if scoped else "")
    return f"ABI {abi}: reads only the Python and system libraries, writes only its folder{extra}"


def _read_paths() -> list[str]:
    """Folders the child may read after it confines itself: the standard library, the site-packages of the
    modules it uses, system libraries and CPU information (never a folder of the server's job)."""
    import importlib.util
    import sysconfig

    paths = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"], os.path.dirname(os.__file__)}
    dynload = os.path.join(sysconfig.get_paths()["platstdlib"], "lib-dynload")
    paths.add(dynload)
    for name in ("numpy", "safetensors", "MNN"):
        spec = importlib.util.find_spec(name)
        if spec and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                paths.add(os.path.dirname(os.path.realpath(loc)))  # its site-packages, with vendored .libs
    paths.update(("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/sys/devices/system/cpu"))
    return sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)})


# seccomp: syscalls refused (EPERM) by architecture; clone is allowed for threads only, clone3 answers ENOSYS
# (glibc then uses clone), signals go only to the child itself
_SYSCALLS = {
    # arch: (audit arch, refused, clone, clone3, kill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo)
    "x86_64": (0xC000003E, {"socket": 41, "socketpair": 53, "fork": 57, "vfork": 58, "execve": 59, "ptrace": 101,
                            "tkill": 200, "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
                            "perf_event_open": 298, "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311,
                            "bpf": 321, "execveat": 322, "userfaultfd": 323, "pidfd_send_signal": 424,
                            "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "pidfd_open": 434,
                            "pidfd_getfd": 438},
               56, 435, 62, 234, 129, 297),
    "aarch64": (0xC00000B7, {"socket": 198, "socketpair": 199, "execve": 221, "ptrace": 117, "tkill": 130,
                             "add_key": 217, "request_key": 218, "keyctl": 219, "unshare": 97, "perf_event_open": 241,
                             "setns": 268, "process_vm_readv": 270, "process_vm_writev": 271, "bpf": 280,
                             "execveat": 281, "userfaultfd": 282, "pidfd_send_signal": 424, "io_uring_setup": 425,
                             "io_uring_enter": 426, "io_uring_register": 427, "pidfd_open": 434, "pidfd_getfd": 438},
                220, 435, 129, 131, 138, 240),
}


def _seccomp_program(machine: str, pid: int) -> bytes:
    """A classic-BPF seccomp filter (struct sock_filter array) for ``machine``."""
    arch, refused, clone, clone3, kill, tgkill, sigqueue, tgsigqueue = _SYSCALLS[machine]
    allow, kill_process = 0x7FFF0000, 0x80000000
    eperm, enosys = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JGE|K, JMP|JSET|K, RET|K
    prog: list[tuple[int, int, int, int]] = [
        (ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill_process),  # another ABI (i386 on x86_64): kill
        (ld, 0, 0, 0),
    ]
    if machine == "x86_64":
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, kill_process)]  # the x32 ABI
    for nr in sorted(refused.values()):
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 1, clone3), (ret, 0, 0, enosys)]
    # clone: arg 0 (flags, low word at offset 16) must have CLONE_THREAD
    prog += [(jeq, 0, 4, clone), (ld, 0, 0, 16), (jset, 0, 1, 0x00010000), (ret, 0, 0, allow), (ret, 0, 0, eperm),
             (ld, 0, 0, 0)]
    # kill(pid or 0, ...); tgkill / rt_sigqueueinfo / rt_tgsigqueueinfo(pid, ...): only this process
    prog += [(jeq, 0, 5, kill), (ld, 0, 0, 16), (jeq, 2, 0, pid), (jeq, 1, 0, 0), (ret, 0, 0, eperm), (ret, 0, 0, allow),
             (ld, 0, 0, 0)]
    for nr in (tgkill, sigqueue, tgsigqueue):
        prog += [(jeq, 0, 4, nr), (ld, 0, 0, 16), (jeq, 1, 0, pid), (ret, 0, 0, eperm), (ret, 0, 0, allow),
                 (ld, 0, 0, 0)]
    prog.append((ret, 0, 0, allow))
    return b"".join(struct.pack("<HBBI", *ins) for ins in prog)


class Fprog(ctypes.Structure):
    """``struct sock_fprog`` (linux/filter.h): the number of filter instructions and their address."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _seccomp(program: bytes | None, ctypes, libc) -> str:
    if program is None:
        raise OSError(0, f"no syscall table for {os.uname().machine}")
    buf = ctypes.create_string_buffer(program)
    fprog = Fprog(len(program) // 8, ctypes.addressof(buf))
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0):  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), f"prctl(PR_SET_SECCOMP): {_errno_text()}")
    return "no sockets, processes, exec, ptrace or signals to others"


def _confine(spec: dict) -> dict:
    """Confine this (single-threaded) process before it opens the graph; returns the layers that held and
    why the others did not. Everything it needs is imported or computed before it drops the uid: the Python
    installation may be unreadable by the sandbox uid."""
    import resource

    ctypes, libc = _libc()
    read_paths = _read_paths()
    program = _seccomp_program(os.uname().machine, os.getpid()) if os.uname().machine in _SYSCALLS else None
    layers, held, missing = set(spec["layers"]), {}, {}
    if len(os.listdir("/proc/self/task")) != 1:
        raise RuntimeError("the sandbox needs a single-threaded child (a library started a thread on import)")
    newuser, newnet, why_not = 0x10000000, 0x40000000, []
    if "netns" in layers and os.geteuid() == 0:
        if libc.unshare(ctypes.c_int(newnet)) == 0:
            held["netns"] = "own network namespace"
        else:
            why_not.append(f"unshare(CLONE_NEWNET): {_errno_text()}")
    uid = spec["uid"]
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        resource.setrlimit(resource.RLIMIT_NPROC, (_NPROC, _NPROC))
        held["uid"] = str(uid)
    elif "uid" in layers:
        missing["uid"] = spec["uid_why"]
    if "netns" in layers and "netns" not in held:  # not root, or root without CAP_SYS_ADMIN (a container)
        if libc.unshare(ctypes.c_int(newuser | newnet)) == 0:
            held["netns"] = "own network namespace, in a user namespace"
        else:
            missing["netns"] = "; ".join([*why_not, f"unshare(CLONE_NEWUSER | CLONE_NEWNET): {_errno_text()}"])
    if libc.prctl(38, 1, 0, 0, 0):  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), f"prctl(PR_SET_NO_NEW_PRIVS): {_errno_text()}")
    held["no_new_privs"] = "set"
    for name, step in (("landlock", lambda: _landlock(os.getcwd(), read_paths, ctypes, libc)),
                       ("seccomp", lambda: _seccomp(program, ctypes, libc))):
        if name in layers:
            try:
                held[name] = step()
            except OSError as err:
                missing[name] = err.strerror or str(err)
    return {"held": held, "missing": missing}


def _child(spec: dict) -> int:
    _limit(spec["memory_mb"], spec["max_output"], spec["cpu_s"])
    import MNN  # trusted imports, before the child confines itself
    import MNN.expr
    import MNN.nn
    import numpy as np
    from safetensors.numpy import save_file

    stand_in: dict = {}
    if spec["script"]:  # tests only: a stand-in parser; its imports and definitions run before confinement,
        with open(spec["script"]) as f:  # like the real parser's, then its main(args) runs confined
            exec(compile(f.read(), spec["script"], "exec"), stand_in)
    report = _confine(spec)
    print(_REPORT + json.dumps(report), file=sys.stderr, flush=True)
    if spec["script"]:
        return int(stand_in["main"](spec["args"]) or 0)
    module = graph_module(MNN, _GRAPH_NAME, True)
    arrays = {_name(i): np.ascontiguousarray(np.array(p.read(), dtype=np.float32))
              for i, p in enumerate(module.parameters)}
    save_file(arrays, _OUT_NAME)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(_child(json.loads(sys.argv[1])))
    except MemoryError:
        print("out of memory (mnn_parse_memory_mb)", file=sys.stderr)
        sys.exit(3)
    except Exception as err:  # noqa: BLE001 - the parent reports the last line
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)
