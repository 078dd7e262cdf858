"""What devices send the cross-device server, and the checks on it that need no FedML: the device
topics and message types, the S3 keys a device uploads under, the sample count it claims, and the
removal of a downloaded upload (only inside the model cache). Used by
:class:`~fedml_prism.runtimes.cross_device.comm_manager.PrismMnnCommManager` and
:class:`~fedml_prism.runtimes.cross_device.server_manager.PrismMNNServerManager` (see
:mod:`fedml_prism.runtimes.cross_device` for the whole protocol).
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any

from ...engine.server import MAX_SAMPLES

log = logging.getLogger("fedml_prism")

DEVICE_LAST_WILL_TOPIC = "flclient_agent/last_will_msg"  # the Android SDK's (EdgeCommunicator.java)

MAX_JSON_BYTES = 1 << 16  # a device's messages are small JSON objects
MAX_KEY_CHARS = 256
PRISM_ROUND = "prism::round"  # set by the server on an admitted upload (never taken from a device)
MSG_MODEL, MSG_STATUS = 3, 5  # what a device sends (FedML's MyMessage C2S_SEND_MODEL_TO_SERVER, C2S_CLIENT_STATUS)
_UPLOAD_KEY = re.compile(r"fedml_(?P<run>[^_/]+)_(?P<server>\d+)_(?P<edge>\d+)-[0-9a-f]{32}")


class Rejected(ValueError):
    """A device message the server refuses; the text is the logged reason."""


def upload_key_pattern(run_id: Any, server_id: Any, edge: int) -> re.Pattern:
    """The S3 keys device ``edge`` uploads under: the topic it downloads on, ``-``, 32 hex digits
    (the Android SDK's ``topic + "-" + UUID`` without dashes;
    :class:`~fedml_prism.runtimes.cross_device.device.ReferenceDevice`)."""
    return re.compile(re.escape(f"fedml_{run_id}_{server_id}_{edge}-") + "[0-9a-f]{32}")


def sample_count_problem(value: Any) -> str | None:
    """Why a claimed ``num_samples`` is unusable (``None``: an integer in ``[1, MAX_SAMPLES]``), as
    :func:`fedml_prism.engine.server._scalar` checks the tensors of cross-silo clients."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"num_samples={_short(value)} is invalid: allowed an integer in [1, {MAX_SAMPLES}]"
    if not (math.isfinite(value) and value == int(value) and 1 <= value <= MAX_SAMPLES):
        return f"num_samples={_short(value)} is not a sample count in [1, {MAX_SAMPLES}]"
    return None


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` of a value a peer chose, cut short for the log."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"…({len(text)} chars)"


def _int_field(body: dict, key: str) -> int | None:
    """An integer field of a device message (a JSON number or decimal string; SDK versions differ);
    ``None`` when absent; :class:`Rejected` otherwise."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdecimal() and len(value) < 20:
        return int(value)
    raise Rejected(f"{key}={_short(value)} is invalid: allowed an integer")


def _discard(path: Any, folder: str) -> None:
    """Delete a downloaded upload; only a file inside the model cache ``folder`` (after resolving links)."""
    if not isinstance(path, str) or not path:
        return
    real, root = os.path.realpath(path), os.path.realpath(folder)
    if real == root or os.path.commonpath([real, root]) != root:
        log.warning("refused to delete %s: it is outside the model cache %s", _short(path), folder)
        return
    if os.path.isfile(real):
        os.remove(real)

