"""A party's security settings, read from the job's ``security_args`` (see
:mod:`fedml_prism.runtimes.security` for what they protect and how): message authentication keys (the
server's master key, a worker's derived key), TLS files and the size cap. No networking, no FedML.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KEY_ENV = "FEDML_PRISM_AUTH_KEY"
KEYS = ("auth_key_file", "require_auth", "tls_ca", "tls_cert", "tls_key", "tls_mutual", "max_message_mb",
        "allow_unauthenticated", "trust_peers")  # trust_peers: the FedML-native glue only (fedml_glue.py)
MIN_KEY_BYTES = 16

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
