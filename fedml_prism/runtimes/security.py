"""Security settings of a cross-silo job: message authentication keys, TLS files, size caps, and the
scrubbing of credentials from every log line.

The yaml section ``security_args`` (FedML flattens it onto ``args`` like any other section)::

    security_args:
      auth_key_file: "secrets/keys/party{rank}.key"  # server (rank 0): the master key; worker r: its own key
      require_auth: true                       # refuse to start without a key
      tls_ca: "secrets/tls/ca.crt"             # gRPC TLS: the CA every party trusts
      tls_cert: "secrets/tls/party{rank}.crt"  # this party's certificate and key ({rank} is replaced)
      tls_key: "secrets/tls/party{rank}.key"
      tls_mutual: true                         # the server also demands a client certificate
      max_message_mb: 256                      # a larger message or S3 object is rejected unread
      allow_unauthenticated: false             # true: run without a key although a party uses the network
      trust_peers: false                       # FedML-native driver only: allow FedML's pickle transports

Secure by default: a gRPC or MQTT_S3 party without a key refuses to start when it listens on or connects
to anything but this machine's loopback (``check_network_auth``), unless ``allow_unauthenticated: true``.
``fedml-prism keys --cf CONFIG`` creates the key files a config names when they are missing.

``run/make_certs.sh DIR K`` writes a CA and one certificate per party (``DIR/tls``) and the keys for K
workers (``DIR/keys``). The environment variable ``FEDML_PRISM_AUTH_KEY`` (hex, at least 16 bytes) wins
over ``auth_key_file``.

Keys: the server holds a master key M; worker ``w`` holds only ``K_w = HMAC-SHA256(M, "fedml-prism
worker w")`` (``fedml-prism keys``), so a worker cannot sign as another worker.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

from ..engine.files import write_private_bytes
from ..settings.mqtt import SECRET_FIELDS
from ..settings.security import KEY_ENV, KEYS, MIN_KEY_BYTES, KeyRing, SecuritySettings, parse_key, read_key, worker_key

__all__ = ["KEY_ENV", "KEYS", "MIN_KEY_BYTES", "KeyRing", "SecuritySettings", "check_network_auth", "ensure_keys",
           "is_loopback", "parse_key", "read_key", "scrub", "scrub_logs", "worker_key", "write_keys"]

REDACTED = "***"


def write_keys(out_dir: str, workers: int) -> list[str]:
    """A fresh master key (``party0.key``, the server's) and ``party<w>.key`` for workers 1..workers,
    each readable by its owner only. Returns the paths."""
    if workers < 1:
        raise ValueError(f"--workers {workers} is invalid: allowed 1 or more")
    os.makedirs(out_dir, exist_ok=True)
    master = secrets.token_bytes(32)
    paths = [os.path.join(out_dir, f"party{rank}.key") for rank in range(workers + 1)]
    for rank, path in enumerate(paths):
        write_private_bytes(path, _party_key(master, rank).hex() + "\n")
    return paths


def _party_key(master: bytes, rank: int) -> bytes:
    """The key party ``rank`` holds: the master for the server, a derived key for a worker."""
    return master if rank == 0 else worker_key(master, rank)


def ensure_keys(template: str, base_dir: str, workers: int) -> tuple[list[str], list[str]]:
    """The key files of ranks 0..``workers`` named by ``auth_key_file`` (``template`` with ``{rank}``,
    relative to ``base_dir``): the missing ones are created, a worker's from the master key in
    ``party0``'s file when it exists. Returns (created, kept)."""
    if workers < 1:
        raise ValueError(f"worker_num={workers} is invalid: allowed 1 or more")
    if "{rank}" not in template:
        raise ValueError(f"auth_key_file={template!r} is invalid: allowed a path with {{rank}} (the server holds the "
                         "master key, each worker its own)")
    paths = [os.path.join(base_dir, template.replace("{rank}", str(rank))) for rank in range(workers + 1)]
    missing = [p for p in paths if not os.path.exists(p)]
    if not missing:
        return [], paths
    if os.path.exists(paths[0]):
        master = read_key(paths[0])
    elif len(missing) < len(paths):
        raise ValueError(f"auth_key_file={template!r}: worker keys exist but the master key {paths[0]} does not; "
                         "restore it, or delete the worker keys to make a new set")
    else:
        master = secrets.token_bytes(32)
    for path in missing:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        write_private_bytes(path, _party_key(master, paths.index(path)).hex() + "\n")
    return missing, [p for p in paths if p not in missing]


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback only (``localhost``, 127.0.0.0/8, ::1). Wildcards
    (0.0.0.0, ::) and other names count as reachable from elsewhere."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_network_auth(settings: SecuritySettings, hosts: Mapping[str, str], rank: int) -> None:
    """Secure by default: a party without a key may only use loopback addresses. ``hosts`` maps what
    each address is (for the message) to its host; ``ValueError`` naming the first non-loopback one
    unless ``allow_unauthenticated`` is set."""
    if settings.auth_key is not None or settings.allow_unauthenticated:
        return
    for what, host in hosts.items():
        if not is_loopback(host):
            raise ValueError(
                f"party {rank} would use {what} {host!r} without message authentication: set security_args."
                f"auth_key_file (fedml-prism keys --cf CONFIG creates the keys) or {KEY_ENV}, or "
                "security_args.allow_unauthenticated: true to accept forged messages from anyone who reaches it"
            )


# ------------------------------------------------------------------------------ credential scrubbing
_secrets: set[str] = set()
_installed = False


# a secret field's value in a dict's repr, JSON, or key=value text, whatever its length or content
_FIELD = re.compile("((?:" + "|".join(SECRET_FIELDS) + r""")\\?['"]?\s*[:=]\s*)"""
                    r"""(?:(\\?['"])((?:\\.|(?!\2).)*?)\2|([^\s,;}\]'"]+))""")


def _field_redacted(match: re.Match[str]) -> str:
    quote = match.group(2)
    return f"{match.group(1)}{quote}{REDACTED}{quote}" if quote is not None else f"{match.group(1)}{REDACTED}"


def _spellings(text: str) -> set[str]:
    """``text`` as it may appear in a log line: plain, inside a ``repr`` and inside JSON."""
    return {text, repr(text)[1:-1], json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1]}


def scrub_logs(values: Iterable[str | bytes]) -> None:
    """Replace every value in ``values`` (and the hex of bytes values), in its plain, ``repr`` and JSON
    spellings, and the value of any ``MQTT_PWD`` / ``CN_S3_SAK`` / ``CN_S3_AKI`` field, by ``***`` in every
    log record this process creates from now on, whichever logger writes it (FedML's included)."""
    global _installed
    for v in values:
        text = v.hex() if isinstance(v, bytes) else str(v)
        if len(text) >= 4:  # shorter values are caught by their field name only: they would mangle ordinary text
            _secrets.update(_spellings(text))
    if _installed:
        return
    _installed = True
    make = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: leave it to the handler to report
            return record
        cleaned = scrub(text)
        if cleaned != text:
            record.msg, record.args = cleaned, None
        return record

    logging.setLogRecordFactory(factory)


def scrub(text: str) -> str:
    for s in sorted(_secrets, key=len, reverse=True):
        text = text.replace(s, REDACTED)
    return _FIELD.sub(_field_redacted, text)
