"""The control thread: JSON requests on a REP socket, run by compute between frames.

``shutdown`` is answered here (it stops the service); every other request is
handed to the compute thread, which owns what commands change, and its reply
is sent back. A malformed request is answered ``ok: false`` with the reason.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import zmq

from calm_rt.serve.compute import Counters, Inbox

__all__ = ["Control"]

REPLY_TIMEOUT_S = 10.0


class Control:
    """Owner of the control socket."""

    def __init__(
        self,
        inbox: Inbox,
        counters: Counters,
        socket: Callable[[], zmq.Socket],
        shutdown: Callable[[], None],
    ) -> None:
        self.inbox, self.counters = inbox, counters
        self._make_socket = socket
        self._shutdown = shutdown

    def run(self, ready: Callable[[], None], stop: threading.Event) -> None:
        sock = self._make_socket()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            ready()
            while not stop.is_set():
                if not poller.poll(50):
                    continue
                request = self._parse(sock.recv())
                if "error" in request:
                    sock.send_json({"ok": False, "error": request["error"]})
                    continue
                if request["cmd"] == "shutdown":
                    sock.send_json({"ok": True, "stopping": True})
                    self._shutdown()
                    break
                sock.send_json(self.ask(request))
        finally:
            sock.close()

    def _parse(self, raw: bytes) -> dict[str, Any]:
        try:
            request = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            reason = f"bad request: not UTF-8 JSON ({type(exc).__name__})"
        else:
            if isinstance(request, dict) and isinstance(request.get("cmd"), str):
                return request
            reason = 'bad request: a control request is a JSON object with a "cmd" string'
        self.counters.reject(f"control: {reason}")
        return {"error": reason}

    def ask(self, request: dict[str, Any], timeout: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        """Have compute run ``request``; its reply (or a timeout error)."""
        future = self.inbox.command(request)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            return {"ok": False, "error": f"the compute thread did not answer within {timeout:g} s"}
