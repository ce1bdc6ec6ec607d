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

__all__ = ["MAX_REQUEST_BYTES", "Control"]

REPLY_TIMEOUT_S = 10.0
# A request is a small JSON object; ZeroMQ drops (and never buffers) anything larger,
# so a peer cannot make the server hold gigabytes.
MAX_REQUEST_BYTES = 1 << 20


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
        sock = self._make_socket()  # made with MAXMSGSIZE (it only acts when set before bind)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            ready()
            while not stop.is_set():
                if not poller.poll(50):
                    continue
                request = self._parse(sock.recv())
                if "error" in request:
                    self._reply(sock, {"ok": False, "error": request["error"]})
                    continue
                if request["cmd"] == "shutdown":
                    self._reply(sock, {"ok": True, "stopping": True})
                    self._shutdown()
                    break
                self._reply(sock, self.ask(request))
        finally:
            sock.close()

    @staticmethod
    def _reply(sock: zmq.Socket, reply: dict[str, Any]) -> None:
        """Send ``reply``; one that is not JSON still gets an answer (REP must answer each request)."""
        try:
            raw = json.dumps(reply).encode()
        except (TypeError, ValueError) as exc:
            raw = json.dumps(
                {"ok": False, "error": f"internal error: the reply is not JSON ({exc})"}
            ).encode()
        sock.send(raw)

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
