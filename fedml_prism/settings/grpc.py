"""A gRPC job's addresses: ``grpc_ipconfig_path``, FedML's CSV (``eid,rank,grpc_server_ip,grpc_server_port
[,ingress_ip]``), one row per party, checked before anything starts."""

from __future__ import annotations

import csv
import os
from typing import Any, NamedTuple

REQUIRED_COLUMNS = ("eid", "grpc_server_ip", "grpc_server_port")
#: gRPC's caps are max_message_mb plus this, so a frame a little too large reaches the codec (logged)

class GrpcAddress(NamedTuple):
    """One party's row of ``grpc_ipconfig_path``: where it listens and where others reach it."""

    rank: int
    host: str
    port: int
    ingress: str | None = None

    @property
    def bind(self) -> str:
        return _host_port(self.host, self.port)

    @property
    def target(self) -> str:
        """Where peers connect (FedML's order: ``ingress_ip`` first); a wildcard host means this machine."""
        host = self.ingress or self.host
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return _host_port(host, self.port)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def read_ipconfig(path: str) -> dict[int, GrpcAddress]:
    """The parties of a gRPC ipconfig CSV (``eid,rank,grpc_server_ip,grpc_server_port[,ingress_ip]``,
    keyed by ``eid`` as FedML keys it); ``ValueError`` naming every bad row."""
    if not os.path.isfile(path):
        raise ValueError(f"grpc_ipconfig_path={path!r} is invalid: the file does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if missing := [c for c in REQUIRED_COLUMNS if c not in columns]:
            raise ValueError(f"grpc_ipconfig_path={path!r} is invalid: columns {missing} are missing "
                             f"(allowed header: eid,rank,grpc_server_ip,grpc_server_port[,ingress_ip])")
        rows = [{(k or "").strip(): (v or "").strip() if isinstance(v, str) else v for k, v in row.items()}
                for row in reader]
    table: dict[int, GrpcAddress] = {}
    problems = []
    for line, row in enumerate(rows, start=2):
        eid, host, port = row.get("eid"), row.get("grpc_server_ip"), row.get("grpc_server_port")
        if not eid or not eid.isdigit():
            problems.append(f"line {line}: eid={eid!r} (allowed an integer >= 0)")
            continue
        if not host:
            problems.append(f"line {line}: grpc_server_ip is empty (allowed an IP address or host name)")
            continue
        if not port or not port.isdigit() or not 1 <= int(port) <= 65535:
            problems.append(f"line {line}: grpc_server_port={port!r} (allowed an integer in [1, 65535])")
            continue
        if int(eid) in table:
            problems.append(f"line {line}: eid {eid} appears twice (allowed one row per party)")
            continue
        table[int(eid)] = GrpcAddress(int(eid), host, int(port), row.get("ingress_ip") or None)
    seen: dict[str, int] = {}
    for addr in table.values():
        if (other := seen.setdefault(addr.target, addr.rank)) != addr.rank:
            problems.append(f"ranks {other} and {addr.rank} share the address {addr.target} (allowed one party each)")
    if problems:
        raise ValueError(f"grpc_ipconfig_path={path!r} is invalid: " + "; ".join(problems))
    return table


def check_ipconfig(path: Any, base_dir: str, worker_num: int) -> dict[int, GrpcAddress]:
    """The job's gRPC addresses, checked before anything starts: every party 0..``worker_num`` needs
    its own row (FedML would bind 0.0.0.0:8890+rank instead); ``ValueError`` naming what is wrong."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"grpc_ipconfig_path={path!r} is invalid: backend GRPC needs a CSV with one row per party "
                         f"(eid,rank,grpc_server_ip,grpc_server_port; ranks 0..{worker_num})")
    full = path if os.path.isabs(path) else os.path.join(base_dir, path)
    table = read_ipconfig(full)
    if missing := [r for r in range(worker_num + 1) if r not in table]:
        raise ValueError(f"grpc_ipconfig_path={path!r} is invalid: no row for rank(s) {missing} "
                         f"(allowed: one row per party, the server 0 and workers 1..{worker_num})")
    return table
