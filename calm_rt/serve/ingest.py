"""The ingest thread: frames from the scope, decoded and stamped, into the inbox.

SUB (connect to the scope's PUB, like ScanImage's) or PULL (bind, the scope
PUSHes). Ingest never waits on compute: a malformed message is rejected
with a reason and counted; a good one is stamped with its arrival time and
queued.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import zmq

from calm_rt.errors import ProtocolError
from calm_rt.serve.compute import Counters, Inbox
from calm_rt.wire import decode

__all__ = ["Ingest"]

INPUT_TOPICS = ("frame", "traces")


class Ingest:
    """Owner of the ingest socket. ``arrivals`` holds recent arrival times (the input rate)."""

    def __init__(
        self, inbox: Inbox, counters: Counters, socket: Callable[[], zmq.Socket], mode: str
    ) -> None:
        self.inbox, self.counters, self.mode = inbox, counters, mode
        self._make_socket = socket
        self.arrivals: deque[float] = deque(maxlen=300)

    def run(self, ready: Callable[[], None], stop: threading.Event) -> None:
        sock = self._make_socket()
        if self.mode == "sub":
            for topic in INPUT_TOPICS:
                sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        sock.setsockopt(zmq.RCVHWM, 1000)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:  # the socket is closed however we leave, or the context never terminates
            ready()
            while not stop.is_set():
                if not poller.poll(50):
                    continue
                parts = sock.recv_multipart(copy=False)
                arrival = time.time()
                t0 = time.perf_counter()
                try:
                    msg = decode(parts)
                    if msg.topic not in INPUT_TOPICS:
                        raise ProtocolError(
                            f"the ingest socket takes 'frame' or 'traces', not {msg.topic!r}"
                        )
                except ProtocolError as exc:
                    self.counters.reject(str(exc))
                    continue
                msg.header["t_arrival"] = arrival
                self.counters.stages.add(decode=(time.perf_counter() - t0) * 1e3)
                self.counters.received += 1
                self.arrivals.append(arrival)
                self.inbox.put(msg)
        finally:
            sock.close()

    @property
    def fps_in(self) -> float:
        arrivals = list(self.arrivals)
        if len(arrivals) > 2 and arrivals[-1] > arrivals[0]:
            return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
        return 0.0
