"""Where PriSM's MQTT_S3 transport (:mod:`fedml_prism.runtimes.cross_silo.mqtt_transport`) finds its
broker and bucket, and how it connects: ``customized_training_mqtt_config`` (host, port, credentials,
TLS) and ``customized_training_s3_config`` (bucket, endpoint, region, keys), each a mapping in the yaml
or the path of a yaml file holding one, checked before any connection; :func:`connect` ends a party
with a :class:`BrokerError` naming the cause when the broker is unreachable, refuses it, or TLS fails.

Imports without FedML.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from ...settings.mqtt import MQTT_SECTION, S3_SECTION, BrokerSettings, S3Settings, config_section

__all__ = ["MQTT_SECTION", "S3_SECTION", "BrokerError", "BrokerSettings", "S3Settings", "config_section", "connect"]

class BrokerError(ValueError):
    """The MQTT broker cannot be used (unreachable, refused, TLS failed); the message says why and what to check."""



def connect(client: mqtt.Client, broker: BrokerSettings, connack: Callable[[], int | None]) -> None:
    """Connect ``client`` and wait for the broker's answer (``connack()``: its code once ``on_connect`` ran).
    ``BrokerError`` naming the cause when the broker is unreachable for ``connect_timeout_s``, refuses
    (credentials), or TLS fails; a refusal or a TLS failure is final at once."""
    deadline = time.monotonic() + broker.connect_timeout_s
    hint = "check BROKER_HOST / BROKER_PORT and that the broker runs"
    while True:
        try:
            client.connect(broker.host, broker.port, broker.keepalive)
            break
        except (ssl.SSLError, ssl.CertificateError) as err:
            raise BrokerError(f"TLS with the MQTT broker {broker.address} failed: {err} (check MQTT_TLS_CA, "
                              "MQTT_TLS_CERT, MQTT_TLS_KEY and the broker's certificate)") from None
        except OSError as err:
            if time.monotonic() > deadline:
                raise BrokerError(f"no MQTT broker at {broker.address} within {broker.connect_timeout_s:.0f} s "
                                  f"(MQTT_CONNECT_TIMEOUT_S): {err} ({hint})") from None
            time.sleep(0.5)
    while connack() is None:
        if time.monotonic() > deadline:
            raise BrokerError(f"the MQTT broker {broker.address} did not answer within {broker.connect_timeout_s:.0f} s "
                              f"(MQTT_CONNECT_TIMEOUT_S) ({hint})")
        rc = client.loop(timeout=0.2)
        if rc != mqtt.MQTT_ERR_SUCCESS and connack() is None:
            raise BrokerError(f"the MQTT broker {broker.address} closed the connection before accepting it "
                              f"({mqtt.error_string(rc)}): check MQTT_USER / MQTT_PWD and the TLS settings")
    code = connack()
    if code != 0:
        client.disconnect()
        raise BrokerError(f"the MQTT broker {broker.address} refused the connection: {mqtt.connack_string(code)} "
                          f"(check MQTT_USER / MQTT_PWD in {MQTT_SECTION})")
