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

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..engine.files import write_private_bytes

KEY_ENV = "FEDML_PRISM_AUTH_KEY"
KEYS = ("auth_key_file", "require_auth", "tls_ca", "tls_cert", "tls_key", "tls_mutual", "max_message_mb",
        "allow_unauthenticated", "trust_peers")  # trust_peers: the FedML-native glue only (fedml_glue.py)
MIN_KEY_BYTES = 16
SECRET_FIELDS = ("MQTT_PWD", "CN_S3_SAK", "CN_S3_AKI")  # user names are not secret (and short ones mangle logs)
REDACTED = "***"


def worker_key(master: bytes, worker: int) -> bytes:
    """Worker ``worker``'s own key, derived from the run's master key."""
    return hmac.new(master, f"fedml-prism worker {int(worker)}".encode(), hashlib.sha256).digest()


def parse_key(text: str, source: str) -> bytes:
    """A key given as hex text by ``source`` (a key file, the environment); at least 16 bytes."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError(f"{source} is invalid: allowed hex digits (fedml-prism keys)") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{source} is invalid: allowed a key of at least {MIN_KEY_BYTES} bytes, got {len(key)}")
    return key


def read_key(path: str) -> bytes:
    """A key file: hex text (``fedml-prism keys`` writes 64 hex digits)."""
    with open(path) as f:
        return parse_key(f.read(), f"auth_key_file={path!r}")


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


@dataclass(frozen=True)
class KeyRing:
    """The HMAC keys one party uses: the server derives each worker's key from the master; a worker
    has its own key, which it shares with the server only."""

    rank: int
    key: bytes | None = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.key is not None

    def link_key(self, peer: int) -> bytes | None:
        """The key of the link between this party and ``peer`` (None: authentication off)."""
        if self.key is None:
            return None
        if self.rank == 0:
            return worker_key(self.key, peer)
        return self.key if peer == 0 else None  # workers only talk to the server


@dataclass(frozen=True)
class SecuritySettings:
    auth_key: bytes | None = field(default=None, repr=False)
    require_auth: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_mutual: bool = False
    max_message_mb: float = 256.0
    allow_unauthenticated: bool = False

    @property
    def max_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None or self.tls_ca is not None

    def keyring(self, rank: int) -> KeyRing:
        return KeyRing(rank, self.auth_key)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], base_dir: str, rank: int) -> SecuritySettings:
        """The settings of party ``rank`` from a job's flat config; ``ValueError`` naming the key, the value
        and what is allowed on anything wrong (missing files included)."""
        def path(key: str) -> str | None:
            value = flat.get(key)
            if value in (None, ""):
                return None
            if not isinstance(value, str):
                raise ValueError(f"{key}={value!r} is invalid: allowed a file path (may contain {{rank}})")
            full = value.replace("{rank}", str(rank))
            full = full if os.path.isabs(full) else os.path.join(base_dir, full)
            if not os.path.isfile(full):
                raise ValueError(f"{key}={value!r} is invalid: {full} does not exist (run/make_certs.sh makes them)")
            return full

        def flag(key: str) -> bool:
            value = flat.get(key, False)
            if not isinstance(value, bool):
                raise ValueError(f"{key}={value!r} is invalid: allowed true or false")
            return value

        key: bytes | None = None
        env = os.environ.get(KEY_ENV)
        if env:
            key = parse_key(env, KEY_ENV)
        elif (key_file := path("auth_key_file")) is not None:
            key = read_key(key_file)
        require = flag("require_auth")
        if require and key is None:
            raise ValueError(f"require_auth=true but no key: set auth_key_file or {KEY_ENV} (fedml-prism keys)")
        mb = flat.get("max_message_mb", 256.0)
        if isinstance(mb, bool) or not isinstance(mb, int | float) or not 0 < mb <= 2047:
            raise ValueError(f"max_message_mb={mb!r} is invalid: allowed a number in (0, 2047]")
        cert, tkey, ca = path("tls_cert"), path("tls_key"), path("tls_ca")
        mutual = flag("tls_mutual")
        if (cert is None) != (tkey is None):
            raise ValueError("tls_cert and tls_key are invalid: allowed both set (TLS) or both unset")
        if (cert or ca) and (ca is None or cert is None):
            raise ValueError("tls_ca, tls_cert and tls_key are invalid: TLS needs all three (run/make_certs.sh)")
        return cls(key, require, ca, cert, tkey, mutual, float(mb), flag("allow_unauthenticated"))


# ------------------------------------------------------------------------------ credential scrubbing
_secrets: set[str] = set()
_installed = False


def secret_values(flat: Mapping[str, Any]) -> list[str]:
    """Credentials found in a job's flat config: the broker's and S3's (FedML logs ``args.__dict__``)."""
    found = []
    for section in ("customized_training_mqtt_config", "customized_training_s3_config"):
        values = flat.get(section)
        if isinstance(values, Mapping):
            found += [str(values[k]) for k in SECRET_FIELDS if values.get(k) not in (None, "")]
    env = os.environ.get(KEY_ENV)
    if env:
        found.append(env.strip())
    return found


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
