"""The calm-rt wire protocol (version 1): pure encode/decode, no sockets.

Every message is a ZeroMQ multipart message::

    [topic, header, buffer_0, buffer_1, ...]

* ``topic``: ASCII bytes (``frame``, ``traces``, ``forecast``, ``behavior``,
  ``trigger``, ``status``); PUB/SUB filters on it.
* ``header``: UTF-8 JSON object with at least ``v`` (protocol version),
  ``type`` (the topic), ``seq`` (the input frame's sequence number) and
  ``buffers``: one ``{"name", "dtype", "shape"}`` per raw buffer that follows.
  Times are float seconds since the epoch: ``t_acq`` (acquisition, by the
  scope), ``t_arrival`` (the server received it), ``t_publish`` (the server
  sent the answer).
* buffers: raw little-endian C-contiguous array bytes, exactly
  ``prod(shape) * itemsize`` long.

No pickle anywhere: only JSON and raw numeric bytes are ever interpreted.
A message that breaks any rule raises :class:`~calm_rt.errors.ProtocolError`
with the reason; servers count it and carry on. See docs/protocol.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calm_rt.errors import ProtocolError

__all__ = [
    "ALLOWED_DTYPES",
    "MAX_ELEMENTS",
    "PROTOCOL_VERSION",
    "TOPICS",
    "Message",
    "decode",
    "encode",
]

PROTOCOL_VERSION = 1
TOPICS = ("frame", "traces", "forecast", "behavior", "trigger", "status")
ALLOWED_DTYPES = (
    "uint8",
    "uint16",
    "int16",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
    "bool",
)
MAX_ELEMENTS = 1 << 26  # 64 M elements per buffer: a 8192 x 8192 frame
MAX_PLANES = 1024  # planes of a multi-plane stream
MAX_HEADER_BYTES = 1 << 16


@dataclass
class Message:
    """A decoded message: topic, header dict and named arrays (read-only views)."""

    topic: str
    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def seq(self) -> int:
        return int(self.header["seq"])


def _le(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("<") if dtype.byteorder not in ("|", "<", "=") else dtype


def encode(
    topic: str, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None
) -> list[bytes | memoryview]:
    """Build the multipart frames of one message.

    ``header`` must hold ``seq``; ``v``, ``type`` and ``buffers`` are filled
    in. Arrays are sent without copying when already C-contiguous.
    """
    if topic not in TOPICS:
        raise ProtocolError(f"unknown topic {topic!r}; expected one of {TOPICS}")
    if "seq" not in header:
        raise ProtocolError("header needs 'seq', the input frame's sequence number")
    buffers: list[dict[str, Any]] = []
    payload: list[bytes | memoryview] = []
    for name, arr in (arrays or {}).items():
        a = np.asarray(arr)
        if a.dtype.name not in ALLOWED_DTYPES:
            raise ProtocolError(
                f"buffer {name!r}: dtype {a.dtype} is not allowed; use one of {ALLOWED_DTYPES}"
            )
        a = np.asarray(a, dtype=_le(a.dtype))
        if not a.flags.c_contiguous:
            a = a.copy(order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
        buffers.append({"name": str(name), "dtype": a.dtype.name, "shape": list(a.shape)})
        payload.append(memoryview(a).cast("B") if a.size else b"")
    head = {**header, "v": PROTOCOL_VERSION, "type": topic, "buffers": buffers}
    try:
        head_bytes = json.dumps(head, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"header is not JSON-serialisable without NaN/inf: {exc}") from exc
    return [topic.encode("ascii"), head_bytes, *payload]


def _as_bytes(frame: Any) -> memoryview:
    """A zmq.Frame, bytes or memoryview as a flat byte view (no copy)."""
    buf = getattr(frame, "buffer", frame)
    try:
        return memoryview(buf).cast("B")
    except TypeError as exc:
        raise ProtocolError(f"message part of type {type(frame).__name__} is not bytes") from exc


def decode(frames: Sequence[Any]) -> Message:
    """Parse and validate one multipart message (bytes or ``zmq.Frame`` parts).

    Arrays are zero-copy, read-only views onto the received buffers.
    """
    if len(frames) < 2:
        raise ProtocolError(f"a message has a topic and a JSON header; got {len(frames)} part(s)")
    topic_bytes = bytes(_as_bytes(frames[0]))
    try:
        topic = topic_bytes.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProtocolError("topic is not ASCII") from exc
    if topic not in TOPICS:
        raise ProtocolError(f"unknown topic {topic[:32]!r}; expected one of {TOPICS}")
    head_view = _as_bytes(frames[1])
    if len(head_view) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(head_view)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(bytes(head_view).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not UTF-8 JSON: {exc}") from exc
    except RecursionError as exc:  # "[[[[...": 64 KiB of brackets nest deeper than Python recurses
        raise ProtocolError("header JSON is nested too deeply") from exc
    except ValueError as exc:  # an integer of more digits than Python converts
        raise ProtocolError(f"header is not acceptable JSON: {str(exc)[:120]}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version!r} is not supported; this server speaks v{PROTOCOL_VERSION}"
        )
    if header.get("type") != topic:
        raise ProtocolError(f"header type {header.get('type')!r} does not match topic {topic!r}")
    seq = header.get("seq")
    # Bounded: a recording stores seq as int64.
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**63:
        raise ProtocolError(
            f"'seq' must be a non-negative integer below 2**63, got {str(seq)[:40]}"
        )
    _check_plane_fields(topic, header)
    for key in ("t_acq", "t_sent", "t_arrival", "t_publish"):
        if key in header and not (
            isinstance(header[key], (int, float))
            and not isinstance(header[key], bool)
            and abs(header[key]) < 1e15  # also keeps a 400-digit integer out of float()
        ):
            raise ProtocolError(
                f"{key!r} must be a finite number of seconds, got {str(header[key])[:40]}"
            )
    specs = header.get("buffers")
    if not isinstance(specs, list):
        raise ProtocolError("'buffers' must be a list of {name, dtype, shape}")
    if len(specs) != len(frames) - 2:
        raise ProtocolError(
            f"header describes {len(specs)} buffer(s) but {len(frames) - 2} followed"
        )
    arrays: dict[str, np.ndarray] = {}
    for spec, frame in zip(specs, frames[2:]):
        name, arr = _decode_buffer(spec, frame)
        if name in arrays:
            raise ProtocolError(f"buffer name {name!r} appears twice")
        arrays[name] = arr
    return Message(topic, header, arrays)


def _check_plane_fields(topic: str, header: dict[str, Any]) -> None:
    """A plane frame of a multi-plane stream names ``plane`` and ``volume`` together.

    Answers for a volume carry ``volume`` alone (additive fields).
    """
    if topic == "frame" and ("plane" in header) != ("volume" in header):
        raise ProtocolError("a multi-plane frame carries both 'plane' and 'volume', or neither")
    plane, volume = header.get("plane", 0), header.get("volume", 0)
    if not isinstance(plane, int) or isinstance(plane, bool) or not 0 <= plane < MAX_PLANES:
        raise ProtocolError(
            f"'plane' must be an integer in 0..{MAX_PLANES - 1}, got {str(plane)[:40]}"
        )
    if not isinstance(volume, int) or isinstance(volume, bool) or not 0 <= volume < 2**63:
        raise ProtocolError(
            f"'volume' must be a non-negative integer below 2**63, got {str(volume)[:40]}"
        )


def _decode_buffer(spec: Any, frame: Any) -> tuple[str, np.ndarray]:
    if not isinstance(spec, dict) or not {"name", "dtype", "shape"} <= set(spec):
        raise ProtocolError(f"buffer spec {str(spec)[:80]} needs name, dtype and shape")
    name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
    if not isinstance(name, str) or not name:
        raise ProtocolError("buffer name must be a non-empty string")
    if dtype not in ALLOWED_DTYPES:
        raise ProtocolError(
            f"buffer {name!r}: dtype {str(dtype)[:32]!r} is not allowed; use one of {ALLOWED_DTYPES}"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > 4
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_ELEMENTS for d in shape
        )
    ):
        raise ProtocolError(
            f"buffer {name!r}: shape {str(shape)[:80]} must be a list of at most 4 sizes >= 0"
        )
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise ProtocolError(f"buffer {name!r}: {count} elements exceed the limit of {MAX_ELEMENTS}")
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
    data = _as_bytes(frame)
    if len(data) != count * dt.itemsize:
        raise ProtocolError(
            f"buffer {name!r}: {len(data)} bytes do not match dtype {dtype} and shape {shape} "
            f"({count * dt.itemsize} bytes expected)"
        )
    arr = np.frombuffer(data, dtype=dt).reshape(shape)
    if dt.byteorder == "<" and not dt.isnative:  # pragma: no cover - big-endian hosts only
        arr = arr.astype(dt.newbyteorder("="))
    arr.flags.writeable = False
    return name, arr
