"""The publish thread: sends every output on one XPUB socket, stamped as late as possible.

A slow subscriber only makes ZeroMQ drop messages for that subscriber (PUB
never blocks), so it can never stall compute. XPUB also hears
(un)subscriptions, so status can say who listens.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from calm_rt.serve.stages import StageTimes

__all__ = ["Outbox", "Publisher"]


class Outbox:
    """Encoded messages waiting to be sent (bounded: the oldest go first when full)."""

    def __init__(self, maxlen: int = 256) -> None:
        # (when queued, time.time(), or None when not timed; the multipart message)
        self._items: deque[tuple[float | None, list[Any]]] = deque(maxlen=maxlen)
        self._cv = threading.Condition()
        self.dropped = 0

    def put(self, parts: list[Any], timed: bool = False) -> None:
        """Queue one multipart message; ``timed`` ones get ``t_publish`` stamped when sent."""
        with self._cv:
            if len(self._items) == self._items.maxlen:
                self.dropped += 1
            self._items.append((time.time() if timed else None, parts))
            self._cv.notify()

    def take_all(self, timeout: float) -> list[tuple[float | None, list[Any]]]:
        with self._cv:
            if not self._items:
                self._cv.wait(timeout)
            batch = list(self._items)
            self._items.clear()
        return batch

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()


class Publisher:
    """Owner of the publish socket. ``latencies_ms`` holds arrival-to-publish of recent forecasts."""

    def __init__(
        self, outbox: Outbox, socket: Callable[[], zmq.Socket], stages: StageTimes | None = None
    ) -> None:
        self.outbox = outbox
        self.stages = stages if stages is not None else StageTimes()
        self._make_socket = socket
        self.subscriptions = 0
        self.send_failures = 0
        self.latencies_ms: deque[float] = deque(maxlen=3000)
        self.done = threading.Event()  # set when the last queued message has gone out

    def run(self, ready: Callable[[], None], stop: threading.Event) -> None:
        """Send until ``stop`` is set, then send what is still queued (the final status)."""
        sock = self._make_socket()
        sock.setsockopt(zmq.SNDHWM, 1000)
        try:
            ready()
            while True:
                stopping = stop.is_set()
                while sock.poll(0):
                    note = sock.recv()
                    if note[:1] == b"\x01":
                        self.subscriptions += 1
                    elif note[:1] == b"\x00":
                        self.subscriptions -= 1
                for queued, parts in self.outbox.take_all(timeout=0.0 if stopping else 0.02):
                    self._send(sock, queued, parts)
                if stopping:
                    break
        finally:
            self.done.set()
            sock.close()

    def _send(self, sock: zmq.Socket, queued: float | None, parts: list[Any]) -> None:
        forecast = queued is not None and parts[0] == b"forecast"
        if queued is not None:
            # Stamp the publish time into the header as late as possible.
            head = json.loads(bytes(parts[1]))
            head["t_publish"] = time.time()
            parts[1] = json.dumps(head, separators=(",", ":")).encode()
            if forecast:
                self.latencies_ms.append((head["t_publish"] - head["t_arrival"]) * 1e3)
                self.stages.add(handoff=(head["t_publish"] - queued) * 1e3)
        t0 = time.perf_counter()
        try:
            sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:  # PUB never blocks, but be explicit
            self.send_failures += 1
        if forecast:
            self.stages.add(send=(time.perf_counter() - t0) * 1e3)
