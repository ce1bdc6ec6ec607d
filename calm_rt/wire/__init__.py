"""Bytes between machines: the versioned wire protocol and CURVE security.

:mod:`.protocol` is a pure ``encode``/``decode`` pair (topic, JSON header,
raw buffers; no pickle), tested without sockets; :mod:`.security` keeps
everything on loopback unless CURVE keys are given.
"""

from calm_rt.wire.protocol import (
    ALLOWED_DTYPES,
    MAX_ELEMENTS,
    PROTOCOL_VERSION,
    TOPICS,
    Message,
    decode,
    encode,
)
from calm_rt.wire.security import (
    CurveKeys,
    CurveServer,
    check_bind_policy,
    generate_keys,
    secure_client_socket,
)

__all__ = [
    "ALLOWED_DTYPES",
    "MAX_ELEMENTS",
    "PROTOCOL_VERSION",
    "TOPICS",
    "CurveKeys",
    "CurveServer",
    "Message",
    "check_bind_policy",
    "decode",
    "encode",
    "generate_keys",
    "secure_client_socket",
]
