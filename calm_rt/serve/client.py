"""The rig side: subscribe to a calm-rt server's outputs, with callbacks and latency statistics.

    from calm_rt.serve.client import RigClient

    def on_trigger(msg):
        stimulate(msg.header["rule"])

    with RigClient("tcp://127.0.0.1:5556", callbacks={"trigger": on_trigger}) as rig:
        rig.run(seconds=60)
    print(rig.stats())

ZeroMQ reconnects a dropped TCP connection by itself; the client also
rebuilds its socket when the server has been silent (no status message)
for ``silence_s`` seconds, which covers a restarted server.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from calm_rt.errors import ConfigError, ProtocolError
from calm_rt.wire.protocol import Message, decode
from calm_rt.wire.security import secure_client_socket

__all__ = ["Endpoints", "LatencyStats", "RigClient", "control_request"]

OUTPUT_TOPICS = ("forecast", "behavior", "trigger", "status")


@dataclass(frozen=True)
class Endpoints:
    """Where a running ``calm-rt serve`` publishes, takes commands, and where its scope streams.

    ``keys`` is a folder made by ``calm-rt keys`` (``client.key_secret`` and
    ``server.key``) when the server uses CURVE; ``scope`` (the microscope's
    PUB endpoint) is only needed to show the live image.
    """

    publish: str
    control: str | None = None
    scope: str | None = None
    keys: Path | None = None

    def curve(self) -> tuple[Path, Path] | tuple[None, None]:
        if self.keys is None:
            return None, None
        secret, public = Path(self.keys) / "client.key_secret", Path(self.keys) / "server.key"
        if not secret.exists() or not public.exists():
            raise ConfigError(
                f"{self.keys} needs client.key_secret and server.key (made by `calm-rt keys --out {self.keys}`)"
            )
        return secret, public


# Samples kept per topic: an hour at 30 Hz. Older ones fall out (a rig runs for days).
WINDOW = 100_000


@dataclass
class LatencyStats:
    """Per-topic receive statistics in milliseconds, over the last :data:`WINDOW` messages.

    Latency percentiles use the rolling window; ``received``, ``gaps`` and
    ``in_order`` count every message since the start (constant memory).
    """

    end_to_end_ms: deque = field(
        default_factory=lambda: deque(maxlen=WINDOW)
    )  # rig receive - scope acquisition
    server_ms: deque = field(default_factory=lambda: deque(maxlen=WINDOW))  # publish - arrival
    seqs: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    received: int = 0
    gaps: int = 0  # sequence numbers skipped between consecutive messages
    out_of_order: int = 0
    first_seq: int | None = None

    def add_seq(self, seq: int) -> None:
        """Count one message's sequence number."""
        if self.seqs:
            step = seq - self.seqs[-1]
            self.gaps += max(0, step - 1)
            self.out_of_order += step <= 0
        else:
            self.first_seq = seq
        self.seqs.append(seq)
        self.received += 1

    def summary(self, samples: bool = False) -> dict[str, Any]:
        e2e, srv = np.asarray(self.end_to_end_ms), np.asarray(self.server_ms)

        def pct(values: np.ndarray, q: float) -> float | None:
            return float(np.percentile(values, q)) if values.size else None

        return {
            "received": self.received,
            "first_seq": self.first_seq,
            "last_seq": int(self.seqs[-1]) if self.seqs else None,
            "gaps": self.gaps,
            "in_order": self.out_of_order == 0,
            "p50_ms": pct(e2e, 50),
            "p90_ms": pct(e2e, 90),
            "p99_ms": pct(e2e, 99),
            "max_ms": float(e2e.max()) if e2e.size else None,
            "server_p50_ms": pct(srv, 50),
            "server_p99_ms": pct(srv, 99),
            **({"latencies_ms": [round(float(v), 3) for v in e2e]} if samples else {}),
        }


class RigClient:
    """Subscribe to ``topics`` of a server's publish endpoint; call ``callbacks[topic](msg)``."""

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5556",
        topics: tuple[str, ...] = OUTPUT_TOPICS,
        callbacks: dict[str, Callable[[Message], None]] | None = None,
        silence_s: float = 5.0,
        client_secret: str | Path | None = None,
        server_public: str | Path | None = None,
    ) -> None:
        self.endpoint, self.topics = endpoint, tuple(topics)
        self.callbacks = dict(callbacks or {})
        self.silence_s = silence_s
        self._curve = (client_secret, server_public) if client_secret and server_public else None
        self.ctx = zmq.Context()
        self.stats_by_topic: dict[str, LatencyStats] = {t: LatencyStats() for t in self.topics}
        self.rejected = 0
        self.reconnects = 0
        self.last_status: dict[str, Any] | None = None
        self._sock = self._connect()
        self._last_heard = time.monotonic()

    def _connect(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        if self._curve:
            secure_client_socket(sock, *self._curve)
        for topic in self.topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        sock.connect(self.endpoint)
        return sock

    def poll_once(self, timeout_ms: int = 100) -> Message | None:
        """Receive and dispatch at most one message."""
        if not self._sock.poll(timeout_ms):
            if time.monotonic() - self._last_heard > self.silence_s:
                self._sock.close()
                self._sock = self._connect()  # server restarted or network hiccup
                self.reconnects += 1
                self._last_heard = time.monotonic()
            return None
        parts = self._sock.recv_multipart(copy=False)
        now = time.time()
        self._last_heard = time.monotonic()
        try:
            msg = decode(parts)
        except ProtocolError:
            self.rejected += 1
            return None
        st = self.stats_by_topic.get(msg.topic)
        if st is not None and msg.topic != "status":
            st.add_seq(msg.seq)
            if "t_acq" in msg.header:
                st.end_to_end_ms.append((now - msg.header["t_acq"]) * 1e3)
            if "t_publish" in msg.header and "t_arrival" in msg.header:
                st.server_ms.append((msg.header["t_publish"] - msg.header["t_arrival"]) * 1e3)
        if msg.topic == "status":
            self.last_status = msg.header
        callback = self.callbacks.get(msg.topic)
        if callback is not None:
            callback(msg)
        return msg

    def run(self, seconds: float | None = None, until: Callable[[], bool] | None = None) -> None:
        """Dispatch messages for ``seconds`` (forever when None) or until ``until()`` is true."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while (deadline is None or time.monotonic() < deadline) and not (until and until()):
            self.poll_once(50)

    def stats(self, samples: bool = False) -> dict[str, Any]:
        """Per-topic summaries; ``samples`` adds every end-to-end latency in ms."""
        out = {t: s.summary(samples) for t, s in self.stats_by_topic.items() if t != "status"}
        out["rejected"] = self.rejected
        out["reconnects"] = self.reconnects
        return out

    def close(self) -> None:
        self._sock.close()
        self.ctx.term()

    def __enter__(self) -> RigClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def control_request(
    endpoint: str,
    request: dict[str, Any],
    timeout_s: float = 5.0,
    client_secret: str | Path | None = None,
    server_public: str | Path | None = None,
) -> dict[str, Any]:
    """Send one JSON command to a server's control socket and return its reply.

    Raises ``TimeoutError`` when no reply comes (server down, or refused by CURVE).
    """
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    # A REQ socket with no peer blocks on send: once CURVE has refused us (or the
    # server is gone) that would be forever. The whole request keeps to timeout_s.
    sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout_s * 1000)))
    if client_secret and server_public:
        secure_client_socket(sock, client_secret, server_public)
    deadline = time.monotonic() + timeout_s
    try:
        sock.connect(endpoint)
        try:
            sock.send_json(request)
        except zmq.Again:
            raise TimeoutError(
                f"could not send to {endpoint} within {timeout_s} s (no server there, "
                "or it refused our keys)"
            ) from None
        if not sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            raise TimeoutError(f"no reply from {endpoint} within {timeout_s} s")
        return sock.recv_json()
    finally:
        sock.close()
