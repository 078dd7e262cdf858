"""Where an MQTT_S3 party finds its broker and bucket: ``customized_training_mqtt_config`` (host, port,
credentials, TLS files) and ``customized_training_s3_config`` (bucket, endpoint, region, keys), each a
mapping in the yaml or the path of a yaml file holding one, checked before any connection. Connecting is
:mod:`fedml_prism.runtimes.cross_silo.mqtt_broker`'s.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

MQTT_SECTION = "customized_training_mqtt_config"
S3_SECTION = "customized_training_s3_config"
#: fields of the two sections that hold credentials (user names are not secret, and short ones would mangle logs)
SECRET_FIELDS = ("MQTT_PWD", "CN_S3_SAK", "CN_S3_AKI")


def config_section(value: Any, name: str, base_dir: str) -> dict[str, Any]:
    """``customized_training_{mqtt,s3}_config``: a mapping in the yaml, or the path of a yaml file holding one
    (relative to ``base_dir``, the job's folder). FedML falls back to its cloud's settings when it is
    missing; PriSM does not."""
    if isinstance(value, str) and value and not os.path.isabs(value):
        value = os.path.join(base_dir, value)
    if isinstance(value, str) and value:
        try:
            with open(value) as f:
                value = yaml.safe_load(f)
        except OSError as err:
            raise ValueError(f"{name}={value!r} is invalid: {err.strerror}") from None
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"{name} is invalid ({type(value).__name__}): backend MQTT_S3 needs its mapping in comm_args "
                         "(see config/mqtt_s3/fedml_config.yaml)")
    return dict(value)


def _text(config: Mapping[str, Any], section: str, key: str, required: bool = False) -> str | None:
    value = config.get(key)
    if value in (None, ""):
        if required:
            raise ValueError(f"{section}.{key} is missing: allowed a non-empty string")
        return None
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise ValueError(f"{section}.{key} ({type(value).__name__}) is invalid: allowed a string")
    return str(value)


def _number(config: Mapping[str, Any], section: str, key: str, default: float, low: float, high: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{section}.{key}={value!r} is invalid: allowed a number in [{low:g}, {high:g}]")
    return value


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to reach the MQTT broker (``customized_training_mqtt_config``)."""

    host: str
    port: int
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive: int = 180
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    connect_timeout_s: float = 30.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any], base_dir: str, rank: int) -> BrokerSettings:
        s = MQTT_SECTION
        host = _text(config, s, "BROKER_HOST", required=True)
        port = int(_number(config, s, "BROKER_PORT", 1883, 1, 65535))
        keepalive = int(_number(config, s, "MQTT_KEEPALIVE", 180, 5, 65535))
        timeout = float(_number(config, s, "MQTT_CONNECT_TIMEOUT_S", 30.0, 1, 3600))
        user, password = _text(config, s, "MQTT_USER"), _text(config, s, "MQTT_PWD")
        if password is not None and user is None:
            raise ValueError(f"{s}.MQTT_PWD is set but MQTT_USER is not: allowed both or neither")

        def path(key: str) -> str | None:
            value = _text(config, s, key)
            if value is None:
                return None
            full = value.replace("{rank}", str(rank))
            full = full if os.path.isabs(full) else os.path.join(base_dir, full)
            if not os.path.isfile(full):
                raise ValueError(f"{s}.{key}={value!r} is invalid: {full} does not exist")
            return full

        ca, cert, key = path("MQTT_TLS_CA"), path("MQTT_TLS_CERT"), path("MQTT_TLS_KEY")
        if (cert is None) != (key is None):
            raise ValueError(f"{s}.MQTT_TLS_CERT and MQTT_TLS_KEY are invalid: allowed both set (a client certificate) "
                             "or both unset")
        tls_flag = config.get("MQTT_TLS", False)
        if not isinstance(tls_flag, bool):
            raise ValueError(f"{s}.MQTT_TLS={tls_flag!r} is invalid: allowed true or false")
        tls = tls_flag or ca is not None or cert is not None
        return cls(host, port, user, password, keepalive, tls, ca, cert, key, timeout)

    def configure(self, client: Any) -> None:
        """Credentials and TLS on a paho ``mqtt.Client`` (before it connects)."""
        if self.user is not None:
            client.username_pw_set(self.user, self.password)
        if self.tls:
            client.tls_set(ca_certs=self.ca, certfile=self.cert, keyfile=self.key, cert_reqs=ssl.CERT_REQUIRED)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}{' (TLS)' if self.tls else ''}"


@dataclass(frozen=True)
class S3Settings:
    """The bucket messages with tensors go through (``customized_training_s3_config``, FedML's keys)."""

    bucket: str
    endpoint: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> S3Settings:
        s = S3_SECTION
        return cls(_text(config, s, "BUCKET_NAME", required=True), _text(config, s, "CN_S3_ENDPOINT"),
                   _text(config, s, "CN_REGION_NAME"), _text(config, s, "CN_S3_AKI"), _text(config, s, "CN_S3_SAK"))

    def client(self) -> Any:
        """A boto3 S3 client (no credentials given: boto3's usual chain, e.g. an instance role)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            config=Config(signature_version="s3v4", connect_timeout=10, read_timeout=120,
                                          retries={"max_attempts": 3}))
