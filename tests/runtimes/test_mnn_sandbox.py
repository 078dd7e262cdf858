"""The sandbox of the MNN graph parser (issue 18, item 6): a stand-in parser, run by the same launcher as
the real one (``mnn_sandbox._sandboxed`` with a test script in place of the parse), tries what a graph that
exploits MNN's loader would try: read a key file of the server's (mode 0600) and a world-readable config,
read the server's environment through /proc, signal the server, open TCP and UDP sockets to listeners this
test runs on 127.0.0.1 and resolve a name, fork many processes and leave ``setsid()`` grandchildren running
past the timeout. Each attempt must fail, by every layer that claims to stop it; after the run no process
of its process group or sandbox uid remains. Layers this machine lacks are skipped by name."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from fedml_prism.runtimes.cross_device import mnn_sandbox
from fedml_prism.runtimes.cross_device.mnn_sandbox import LAYERS, ParseLimits, UnreadableGraph, _read_output, _sandboxed

pytestmark = pytest.mark.timeout(60)

STAND_IN = textwrap.dedent('''
    import encodings.idna, errno, json, os, socket, sys, time  # imported before confinement, as the parser's

    def attempt(fn):
        try:
            return "ok: " + str(fn())
        except OSError as err:
            return errno.errorcode.get(err.errno, str(err.errno)) if err.errno else type(err).__name__

    def read(path):
        with open(path) as f:
            return f.read()

    def tcp(port):
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"leak")
        return "sent"

    def udp(port):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return s.sendto(b"leak", ("127.0.0.1", port))

    def say(**kw):
        print(json.dumps(kw), file=sys.stderr, flush=True)

    def forks(n):
        done, why = 0, None
        for _ in range(n):
            try:
                pid = os.fork()
            except OSError as err:
                why = errno.errorcode.get(err.errno)
                break
            if pid == 0:
                os.setsid()  # out of the process group: the group kill alone does not reach it
                try:
                    grandchild = os.fork()
                except OSError:
                    os._exit(1)
                if grandchild == 0:
                    time.sleep(60)
                    os._exit(0)
                say(grandchild=grandchild)
                os._exit(0)
            done += 1
        return done, why

    def main(args):
        key, config, tcp_port, udp_port, server, mode, n = args
        if mode == "probe":
            say(key=attempt(lambda: read(key)), config=attempt(lambda: read(config)),
                environ=attempt(lambda: len(read(f"/proc/{server}/environ"))),
                signal=attempt(lambda: os.kill(int(server), 0)),
                tcp=attempt(lambda: tcp(int(tcp_port))), udp=attempt(lambda: udp(int(udp_port))),
                dns=attempt(lambda: socket.getaddrinfo("example.com", 80)),
                symlink=attempt(lambda: os.symlink(key, "params.safetensors")))
        done, why = forks(int(n))
        say(forks=done, fork_error=why)
        if mode == "linger":
            time.sleep(60)
        else:  # last: where it works the stand-in becomes /bin/true and says nothing more
            say(exec=attempt(lambda: os.execv("/bin/true", ["/bin/true"])))
        return 0
''')


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """The server's secrets and listeners: a 0600 key file, a world-readable config in a world-readable
    folder, a TCP listener and a UDP socket on 127.0.0.1."""
    base = tmp_path_factory.mktemp("server")
    key = base / "party0.key"
    key.write_text("SECRET-KEY")
    key.chmod(0o600)
    shared = Path(tempfile.mkdtemp(prefix="prism_test_shared_"))  # under /tmp: reachable by any uid
    shared.chmod(0o755)
    config = shared / "job.yaml"
    config.write_text("s3_secret: SECRET-CONFIG")
    config.chmod(0o644)
    script = base / "stand_in.py"
    script.write_text(STAND_IN)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    yield {"key": str(key), "config": str(config), "script": str(script), "tcp": tcp, "udp": udp}
    tcp.close()
    udp.close()
    shutil.rmtree(shared)


def _run(targets, mode: str, *, layers=LAYERS, forks: int = 0, timeout: float = 10.0, inside=None):
    """The stand-in's run and what it said; ``inside(run)`` is called while its folder still exists."""
    args = (targets["key"], targets["config"], str(targets["tcp"].getsockname()[1]),
            str(targets["udp"].getsockname()[1]), str(os.getpid()), mode, str(forks))
    with _sandboxed(None, ParseLimits(timeout_s=timeout, memory_mb=1024), 1 << 20, layers=layers,
                    script=targets["script"], args=args) as run:
        lines = [json.loads(x) for x in run.stderr.splitlines() if x.startswith("{")]
        out = {k: v for line in lines for k, v in line.items() if k != "grandchild"}
        out["grandchildren"] = [line["grandchild"] for line in lines if "grandchild" in line]
        if inside is not None:
            inside(run)
        return run, out


def _reached(targets) -> tuple[int, int]:
    """TCP connections and UDP datagrams that reached the test's listeners since the last call."""
    tcp = udp = 0
    while True:
        try:
            targets["tcp"].accept()[0].close()
            tcp += 1
        except BlockingIOError:
            break
    while True:
        try:
            targets["udp"].recv(64)
            udp += 1
        except BlockingIOError:
            return tcp, udp


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _processes(uid: int | None, pgid: int) -> list[int]:
    """Live processes of ``uid`` (when given) or of process group ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not _alive(int(entry)):
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                real_uid = int(next(x for x in f if x.startswith("Uid:")).split()[1])
            group = os.getpgid(int(entry))
        except (OSError, StopIteration):
            continue
        if group == pgid or (uid is not None and real_uid == uid):
            found.append(int(entry))
    return found


def test_stand_in_parser_gets_no_file_network_signal_or_process(targets) -> None:
    """The full sandbox as read_isolated runs it on this machine: every attempt fails."""
    _reached(targets)
    run, out = _run(targets, "probe", forks=20)
    assert run.returncode == 0, run.stderr
    held = run.report["held"]
    assert "seccomp" in held, run.report  # every x86_64 / aarch64 Linux with seccomp filters
    if os.geteuid() == 0:
        assert "uid" in held and "netns" in held, run.report
    if "uid" in held or "landlock" in held:  # else (non-root without Landlock) the docstring says it can
        assert out["key"] == "EACCES" and out["environ"] == "EACCES" and "SECRET-KEY" not in run.stderr, out
    assert out["config"] == ("EACCES" if "landlock" in held else "ok: s3_secret: SECRET-CONFIG"), out
    assert out["signal"] == "EPERM" and out["exec"] == "EPERM", out
    assert out["tcp"] == out["udp"] == "EPERM" and not out["dns"].startswith("ok"), out
    assert out["symlink"] in ("EACCES", "EPERM") or "landlock" not in held, out
    assert out["forks"] == 0 and out["fork_error"] == "EPERM" and not out["grandchildren"], out
    assert not _processes(run.uid, run.pgid)
    assert _reached(targets) == (0, 0)


@pytest.mark.parametrize("layer", ["uid", "landlock", "seccomp", "netns"])
def test_each_layer_alone_stops_what_it_claims(targets, layer) -> None:
    """One layer at a time (plus the always-on rlimits, no_new_privs and group kill): what the module
    docstring says that layer stops, it stops without the others (without uid: a non-root server)."""
    _reached(targets)
    run, out = _run(targets, "probe", layers=frozenset({layer}))
    assert run.returncode == 0, run.stderr
    if layer not in run.report["held"]:
        pytest.skip(f"{layer} is not available here: {run.report['missing'].get(layer)}")
    if layer == "uid":  # another uid: no 0600 file, no /proc of the server, no signal; world-readable stays
        assert (out["key"], out["environ"], out["signal"]) == ("EACCES", "EACCES", "EPERM"), out
        assert out["config"] == "ok: s3_secret: SECRET-CONFIG", out
    elif layer == "landlock":  # the server's uid: still no file outside the Python and system libraries
        abi = int(run.report["held"]["landlock"].split()[1].rstrip(":"))
        assert (out["key"], out["config"], out["environ"]) == ("EACCES", "EACCES", "EACCES"), out
        assert out["symlink"] == "EACCES", out
        if abi >= 4:
            assert out["tcp"] == "EACCES", out
        if abi >= 6:
            assert out["signal"] == "EPERM", out
    elif layer == "seccomp":
        assert out["tcp"] == out["udp"] == out["signal"] == out["exec"] == "EPERM", out
        assert _reached(targets) == (0, 0)
    else:  # netns: a network namespace whose loopback is down
        assert out["tcp"] == out["udp"] == "ENETUNREACH" and not out["dns"].startswith("ok"), out
        assert _reached(targets) == (0, 0)


def test_timeout_kills_the_whole_group(targets) -> None:
    """A stand-in that outlives the wall-clock limit is killed with everything it started."""
    start = time.monotonic()
    run, out = _run(targets, "linger", forks=20, timeout=2.0)
    assert run.timed_out and time.monotonic() - start < 8 and "seccomp" in run.report["held"]
    assert out["forks"] == 0 and out["fork_error"] == "EPERM", out
    assert not _processes(run.uid, run.pgid)


def test_without_seccomp_the_sandbox_uid_caps_and_reaps_setsid_grandchildren(targets) -> None:
    """Seccomp off, as root: the fork loop stops at RLIMIT_NPROC, and the grandchildren that left the
    process group with setsid() die with the rest at the timeout (every process of the sandbox uid is
    killed)."""
    if os.geteuid() != 0:
        pytest.skip("the sandbox uid needs a server running as root")
    run, out = _run(targets, "linger", layers=frozenset({"uid", "netns", "landlock"}), forks=100, timeout=3.0)
    if "uid" not in run.report["held"]:
        pytest.skip(f"no sandbox uid here: {run.report['missing'].get('uid')}")
    assert run.timed_out
    assert 0 < out["forks"] < 100 and out["fork_error"] == "EAGAIN", out
    assert out["grandchildren"]
    time.sleep(0.2)
    assert not [g for g in out["grandchildren"] if _alive(g)]
    assert not _processes(run.uid, run.pgid)


def test_output_is_read_only_as_a_regular_file_of_the_child(tmp_path, targets) -> None:
    """A link (or anything but a regular file of the child's) in place of the parameters is refused."""
    def read(run) -> None:
        with pytest.raises(UnreadableGraph, match="cannot be opened: Too many levels of symbolic links"):
            _read_output(os.path.join(run.work, "params.safetensors"), run.uid, 1 << 20)

    run, out = _run(targets, "probe", layers=frozenset({"uid", "seccomp"}), inside=read)
    assert out["symlink"] == "ok: None", out  # without Landlock the child may make links in its folder
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UnreadableGraph, match="not a regular file"):
        _read_output(str(fifo), None, 1 << 20)


def test_a_missing_layer_is_logged_once(targets, monkeypatch, caplog) -> None:
    """Without the uid layer (what a non-root server gets) the first run says so in one warning."""
    monkeypatch.setattr(mnn_sandbox, "_sandbox_uid", lambda: (None, "the server runs as uid 1000, not root"))
    monkeypatch.setattr(mnn_sandbox, "_said", set())
    with caplog.at_level(logging.INFO, logger=mnn_sandbox.__name__):
        for _ in range(2):
            run, out = _run(targets, "probe")
            assert run.uid is None and out["key"] == ("EACCES" if "landlock" in run.report["held"] else "ok: SECRET-KEY")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "uid: the server runs as uid 1000, not root" in warnings[0], warnings
