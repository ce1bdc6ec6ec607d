"""The live ZeroMQ service: frames in, forecasts and behaviour out, within a frame.

Four threads, each the one owner of its socket (ZeroMQ sockets are not
thread-safe), joined by two queues::

    Ingest (SUB/PULL) --Inbox--> Compute --Outbox--> Publisher (XPUB)
                                   ^
    Control (REP) --commands-------'

* :class:`~calm_rt.serve.ingest.Ingest` decodes, stamps the arrival time,
  queues; it never waits.
* :class:`~calm_rt.serve.compute.Compute` answers frames in order through
  the :class:`~calm_rt.serve.session.LiveSession` (extract, engine step,
  triggers, recording) and runs control commands between frames, so the
  engine has a single owner.
* :class:`~calm_rt.serve.publish.Publisher` sends; a slow subscriber never
  stalls compute.
* :class:`~calm_rt.serve.control.Control` answers JSON requests
  (:mod:`calm_rt.serve.commands`).

Malformed input is rejected with a reason, counted and logged; the service
carries on. If a thread dies, the service stops loudly: the traceback is
logged, the recording is closed with every frame it had, a final ``status``
says why, and :attr:`Server.error` is set (``calm-rt serve`` then exits with
:data:`EXIT_CRASH`). Binding anything but loopback requires CURVE keys
(:mod:`calm_rt.wire.security`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import zmq

from calm_rt.errors import ConfigError
from calm_rt.model import CalM, load_checkpoint
from calm_rt.serve.compute import Compute, Counters, Inbox
from calm_rt.serve.config import ServiceConfig, default_torch_threads
from calm_rt.serve.control import MAX_REQUEST_BYTES, Control
from calm_rt.serve.ingest import Ingest
from calm_rt.serve.priority import claim_cpu
from calm_rt.serve.publish import Outbox, Publisher
from calm_rt.wire import CurveServer, encode

__all__ = ["EXIT_CRASH", "Server"]

log = logging.getLogger("calm_rt.serve")

# The exit status of `calm-rt serve` when a service thread died (BSD's EX_SOFTWARE):
# a supervisor must never mistake a crash for a clean end.
EXIT_CRASH = 70


class Server:
    """The calm-rt service. ``start()`` returns once sockets are bound; ``stop()`` joins all threads."""

    def __init__(
        self, config: ServiceConfig, model: CalM | None = None, meta: dict | None = None
    ) -> None:
        self.config = config
        if model is None:
            model, meta = load_checkpoint(config.checkpoint)
        self.ctx = zmq.Context()
        self.counters = Counters()
        self.inbox = Inbox(config, self.counters)
        self.outbox = Outbox()
        self.compute = Compute(config, model, meta or {}, self.counters, self.inbox, self.outbox,
                               self.status)  # fmt: skip
        self.ingest = Ingest(
            self.inbox, self.counters,
            lambda: self._socket(zmq.SUB if config.ingest_mode == "sub" else zmq.PULL,
                                 config.ingest, bind=config.ingest_mode == "pull"),
            config.ingest_mode,
        )  # fmt: skip
        self.publisher = Publisher(
            self.outbox,
            lambda: self._socket(zmq.XPUB, config.publish, True),
            self.counters.stages,
        )
        self.control = Control(
            self.inbox, self.counters,
            lambda: self._socket(zmq.REP, config.control, True, {zmq.MAXMSGSIZE: MAX_REQUEST_BYTES}),
            shutdown=lambda: self.request_stop("shutdown command"),
        )  # fmt: skip
        self._curve: CurveServer | None = None
        self._stop = threading.Event()  # ingest, compute and control end on it
        self._stop_publish = threading.Event()  # the publisher ends after the final status
        self._ready = threading.Barrier(4 + 1)
        self._threads: list[threading.Thread] = []
        self._stopped = False
        self._stop_lock = threading.Lock()
        self.stop_reason = ""
        self.error: str | None = None  # why a thread died, when one did

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> Server:
        torch.set_num_threads(self.config.torch_threads or default_torch_threads())
        if self.config.keys is not None:
            self._curve = CurveServer(self.ctx, self.config.keys)
        self.compute.prepare()
        ready = self._ready.wait
        parts: dict[str, Callable[[], None]] = {
            "ingest": lambda: self.ingest.run(ready, self._stop),
            "compute": lambda: (ready(), self.compute.run(self._stop)),
            "publish": lambda: self.publisher.run(ready, self._stop_publish),
            "control": lambda: self.control.run(ready, self._stop),
        }
        # The service threads inherit the priority and affinity of the thread that starts them.
        restore = claim_cpu(self.config.priority, self.config.cpus)
        try:
            for name, target in parts.items():
                t = threading.Thread(
                    target=self._guard(name, target), name=f"calm-rt-{name}", daemon=True
                )
                t.start()
                self._threads.append(t)
        finally:
            restore()
        try:
            self._ready.wait(timeout=10.0)
        except threading.BrokenBarrierError as exc:
            self.stop()
            raise ConfigError(f"the service could not start: {self.error or exc}") from exc
        return self

    def _guard(self, name: str, target: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except threading.BrokenBarrierError:
                pass  # another thread failed during start; it says why
            except BaseException as exc:  # a thread died: stop everything, loudly
                log.exception("the %s thread failed; the service stops", name)
                self.error = f"{name} thread failed: {type(exc).__name__}: {exc}"
                self._ready.abort()
                self.request_stop(self.error)

        return run

    def request_stop(self, reason: str) -> None:
        """Ask the service to stop (any thread, a signal handler); :meth:`wait` then returns."""
        if not self.stop_reason:
            self.stop_reason = reason
        self._stop.set()
        self.inbox.wake()

    def stop(self, reason: str = "stopped") -> None:
        """Stop all threads, close the recording, publish a final status, close the sockets."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.request_stop(reason)
        current = threading.current_thread()
        publisher = next((t for t in self._threads if t.name == "calm-rt-publish"), None)
        for t in self._threads:
            if t is not publisher and t is not current:
                t.join(timeout=5.0)
        try:
            self.compute.close()  # every appended frame reaches the file
        except Exception:
            log.exception("closing the recording failed")
            self.error = self.error or "closing the recording failed"
        self.outbox.put(
            encode("status", {"seq": self.compute.status_seq, **self.status(final=True)})
        )
        self._stop_publish.set()
        self.outbox.wake()
        if publisher is not None and publisher is not current:
            publisher.join(timeout=5.0)
        if self._curve is not None:
            self._curve.stop()
        self.ctx.term()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the service stops (shutdown command, a crash, stop()); True if it did."""
        return self._stop.wait(timeout)

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    @property
    def subscriptions(self) -> int:
        return self.publisher.subscriptions

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run a control command in-process (as the control socket would)."""
        return self.control.ask(request)

    def _socket(
        self, kind: int, endpoint: str, bind: bool, options: dict[int, int] | None = None
    ) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 200)
        for option, value in (options or {}).items():  # before bind: some act only on new peers
            sock.setsockopt(option, value)
        try:
            if self._curve is not None and bind:
                self._curve.secure(sock)
            (sock.bind if bind else sock.connect)(endpoint)
        except zmq.ZMQError:
            sock.close()  # e.g. the port is taken: stop() must still be able to end the context
            raise
        return sock

    # -- status ---------------------------------------------------------------------

    def status(self, final: bool = False) -> dict[str, Any]:
        c = self.counters
        lat = np.array(self.publisher.latencies_ms) if self.publisher.latencies_ms else np.zeros(1)
        session = self.compute.session
        cal = session.engine.calibration if session is not None else None
        out = {
            "received": c.received,
            "answered": c.answered,
            "rejected": c.rejected,
            "skipped": c.skipped,
            "lost": c.lost,
            "publish_dropped": self.outbox.dropped + self.publisher.send_failures,
            "triggers_fired": c.triggers,
            "fps_in": round(self.ingest.fps_in, 3),
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 3),
            "latency_p99_ms": round(float(np.percentile(lat, 99)), 3),
            "stages_ms": c.stages.summary(),
            "neurons": session.n_neurons if session is not None else None,
            "device": self.config.device,
            "compiled": session.engine.compiled if session is not None else None,
            "dtype": self.config.dtype,
            "priority": self.config.priority,
            "segmenting": self.compute.setup.segmenting,
            "rois": session.rois_source if session is not None else self.compute.setup.rois_source,
            "subscriptions": self.publisher.subscriptions,
            "recording": str(self.compute.recording) if self.compute.recording else None,
            "calibration": None
            if cal is None
            else {
                "frames": cal.frames,
                "target": cal.target_frames,
                "names": list(cal.names),
                "r2": cal.r2,
                "forecast_gain": cal.forecast_gain,
                "forecast_error": cal.forecast_error,
            },
            "forecast_calibrated": session is not None
            and session.engine.forecast_calibration is not None,
            "last_rejections": list(c.reasons)[-5:],
        }
        if final:
            out.update(stopped=self.stop_reason, error=self.error)
        return out
