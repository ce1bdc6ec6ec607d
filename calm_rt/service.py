"""The live ZeroMQ service: frames in, forecasts and behaviour out, within a frame.

Four threads, each owning its sockets (ZeroMQ sockets are not thread-safe):

    ingest   SUB (connect to the scope's PUB) or PULL (bind): decode, stamp the
             arrival time, push into a bounded inbox; ingest never waits.
    compute  takes frames in order: extraction (raw frames) -> engine step ->
             triggers -> recording; queues the outputs. When a frame has
             waited longer than ``max_lag_ms`` it jumps to the newest frame,
             dropping the ones between unanswered (counted as ``skipped``),
             so latency stays bounded. Control commands run here too, between frames, so the
             engine has a single owner.
    publish  PUB (bind): sends outputs; a slow subscriber only makes ZeroMQ
             drop messages for that subscriber, never stalls compute.
    control  REP (bind): JSON commands, answered after the compute thread
             has run them.

Malformed input is rejected with a reason, counted and logged; the service
carries on. Binding anything but loopback requires CURVE keys
(see :mod:`calm_rt.security`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq

from calm_rt.engine import EngineConfig, Prediction, StreamingEngine
from calm_rt.errors import CalmError, ConfigError, DataError, ProtocolError
from calm_rt.extract import RoiExtractor
from calm_rt.model import CalM, load_checkpoint
from calm_rt.protocol import Message, decode, encode
from calm_rt.recording import Recorder
from calm_rt.security import CurveKeys, check_bind_policy, secure_server_socket, stop_authenticator
from calm_rt.segment import AutoSegmenter, Footprints, load_rois
from calm_rt.triggers import TriggerRule, TriggerSet, load_rules

__all__ = ["Server", "ServiceConfig", "default_torch_threads", "load_footprints"]

log = logging.getLogger("calm_rt.service")


@dataclass(frozen=True)
class ServiceConfig:
    """Where to listen and what to run. Addresses are ZeroMQ endpoints."""

    ingest: str = "tcp://127.0.0.1:5555"
    ingest_mode: str = "sub"  # "sub": connect to the scope's PUB; "pull": bind PULL
    publish: str = "tcp://127.0.0.1:5556"
    control: str = "tcp://127.0.0.1:5557"
    checkpoint: Path | None = None
    fps: float = 30.0
    kind: str = "F"
    horizon: int | None = None
    rois: Path | None = None  # footprints for raw frames (npz: footprints [R,H,W] or labels [H,W])
    auto_segment: bool = True  # raw frames without ROIs: segment the first seconds of the stream
    # When the oldest waiting frame has waited longer than this, compute is behind:
    # every waiting frame but the newest is dropped (counted), so latency stays
    # bounded - a stale forecast is no use to a closed loop. Shorter stalls (a
    # shared machine has some of 100-300 ms) are absorbed without losing a frame.
    max_lag_ms: float = 500.0
    max_backlog: int = 60  # hard cap on waiting frames (memory), oldest dropped first
    record: Path | None = None
    triggers: tuple[dict[str, Any], ...] = ()
    keys: CurveKeys | None = None
    status_every_s: float = 1.0
    # torch intra-op threads for the compute thread; None: all cores but one. The
    # spare core is for ingest/publish and for the scope and rig software beside
    # us: when they preempt one of torch's threads every op waits for it (on 2
    # cores, 2 threads gave a p99 4 ms worse than 1).
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if self.ingest_mode not in ("sub", "pull"):
            raise ConfigError(f"ingest_mode must be 'sub' or 'pull', got {self.ingest_mode!r}")
        if self.max_backlog < 1:
            raise ConfigError("max_backlog must be >= 1")
        if not self.max_lag_ms > 0:
            raise ConfigError(f"max_lag_ms must be > 0, got {self.max_lag_ms}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"torch_threads must be >= 1, got {self.torch_threads}")
        check_bind_policy(self, self.keys)


def default_torch_threads() -> int:
    """All the cores this process may use but one (at least one)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def load_footprints(path: str | Path, shape: tuple[int, int] | None = None) -> Footprints:
    """ROI footprints from any ROI file calm-rt reads (see :func:`calm_rt.segment.load_rois`).

    An ``.npz`` with ``footprints`` ``[R, H, W]`` or ``labels`` ``[H, W]``, a
    suite2p plane folder or ``stat.npy`` (with ``iscell.npy`` and
    ``ops.npy`` beside it), or ImageJ ``.roi``/``.zip`` (which needs
    ``shape=(H, W)``: the files do not store it). Returns sparse
    :class:`calm_rt.segment.Footprints` (``.dense()`` gives ``[R, H, W]``).
    """
    return load_rois(path, shape)


@dataclass
class Counters:
    received: int = 0
    answered: int = 0
    rejected: int = 0
    skipped: int = 0  # dropped unanswered because compute was behind (too old, or inbox full)
    lost: int = 0  # gaps in the scope's sequence numbers
    publish_dropped: int = 0
    triggers: int = 0
    segmenting: int = 0  # frames used to find ROIs (not answered)
    reasons: deque = field(default_factory=lambda: deque(maxlen=20))


class Server:
    """The calm-rt service. ``start()`` returns once sockets are bound; ``stop()`` joins all threads."""

    def __init__(
        self, config: ServiceConfig, model: CalM | None = None, meta: dict | None = None
    ) -> None:
        self.config = config
        if model is None:
            model, meta = load_checkpoint(config.checkpoint)
        self.model, self.meta = model, meta or {}
        self.ctx = zmq.Context()
        self.counters = Counters()
        self.latencies_ms: deque[float] = deque(maxlen=3000)
        self.arrivals: deque[float] = deque(maxlen=300)
        self.extractor = (
            RoiExtractor(load_footprints(config.rois), motion=True) if config.rois else None
        )
        self.engine: StreamingEngine | None = None
        self.segmenter: AutoSegmenter | None = None
        self.rois_source = str(config.rois) if config.rois else None
        self.triggers = TriggerSet()
        for rule in config.triggers:
            self.triggers.add(TriggerRule.from_dict(rule))
        self.recorder: Recorder | None = None
        self._record_path = config.record
        self._inbox: deque[Message] = deque()
        self._skipped_since_answer = 0  # frames dropped unanswered since the last answer
        self._inbox_cv = threading.Condition()
        self._outbox: deque[list] = deque(maxlen=256)
        self._outbox_cv = threading.Condition()
        self._commands: deque[tuple[dict, Future]] = deque()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ready = threading.Barrier(4 + 1)
        self._status_seq = 0
        self.subscriptions = 0
        self.stop_reason = ""

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> Server:
        torch.set_num_threads(self.config.torch_threads or default_torch_threads())
        self._warm_up()
        for name, target in (
            ("ingest", self._ingest_loop),
            ("compute", self._compute_loop),
            ("publish", self._publish_loop),
            ("control", self._control_loop),
        ):
            t = threading.Thread(target=self._guard(target), name=f"calm-rt-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        try:
            self._ready.wait(timeout=10.0)
        except threading.BrokenBarrierError as exc:
            self.stop()
            raise ConfigError(f"the service could not start: {self.stop_reason or exc}") from exc
        return self

    def _warm_up(self) -> None:
        """Touch every per-frame code path before the first frame arrives.

        With ROIs the session's neuron count is known, so the session's own
        engine is built and warmed here (then reset): the first frames of the
        recording are then as fast as the rest (they took 40 ms, not 12).
        """
        if self.extractor is not None:
            n = self.extractor.n_rois
            engine = self.engine = self._configure(n, with_neuropil=True)
        else:
            n = 8
            engine = StreamingEngine(
                self.model, EngineConfig(n_neurons=n, fps=self.config.fps, kind=self.config.kind)
            )
        rng = np.random.default_rng(0)
        for t in range(2 * self.model.config.context_frames):
            traces = (100 + rng.random(n)).astype(np.float32)
            engine.step(traces, seq=t, neuropil=0.5 * traces)
        engine.reset()
        if self.extractor is not None:
            self.extractor.extract(np.zeros(self.extractor.shape, self.extractor.dtype))

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception as exc:  # a thread died: stop everything, loudly
                log.exception("service thread failed")
                self.stop_reason = f"{type(exc).__name__}: {exc}"
                self._ready.abort()
                self._stop.set()

        return run

    def stop(self, reason: str = "stopped") -> None:
        """Stop all threads, close sockets (linger 200 ms) and the recording."""
        if not self.stop_reason:
            self.stop_reason = reason
        self._stop.set()
        with self._inbox_cv:
            self._inbox_cv.notify_all()
        with self._outbox_cv:
            self._outbox_cv.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5.0)
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
        stop_authenticator(self.ctx)
        self.ctx.term()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the service stops (shutdown command or stop()); True if it did."""
        return self._stop.wait(timeout)

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    # -- ingest -----------------------------------------------------------------------

    def _socket(self, kind: int, endpoint: str, bind: bool) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 200)
        try:
            if self.config.keys is not None:
                secure_server_socket(sock, self.config.keys, self.ctx)
            (sock.bind if bind else sock.connect)(endpoint)
        except zmq.ZMQError:
            sock.close()  # e.g. the port is taken: stop() must still be able to end the context
            raise
        return sock

    def _ingest_loop(self) -> None:
        if self.config.ingest_mode == "sub":
            sock = self._socket(zmq.SUB, self.config.ingest, bind=False)
            sock.setsockopt(zmq.SUBSCRIBE, b"frame")
            sock.setsockopt(zmq.SUBSCRIBE, b"traces")
        else:
            sock = self._socket(zmq.PULL, self.config.ingest, bind=True)
        sock.setsockopt(zmq.RCVHWM, 1000)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:  # the socket is closed however we leave, or the context never terminates
            self._ready.wait()
            while not self._stop.is_set():
                if not poller.poll(50):
                    continue
                parts = sock.recv_multipart(copy=False)
                arrival = time.time()
                try:
                    msg = decode(parts)
                    if msg.topic not in ("frame", "traces"):
                        raise ProtocolError(
                            f"the ingest socket takes 'frame' or 'traces', not {msg.topic!r}"
                        )
                except ProtocolError as exc:
                    self._reject(str(exc))
                    continue
                msg.header["t_arrival"] = arrival
                self.counters.received += 1
                self.arrivals.append(arrival)
                with self._inbox_cv:
                    if len(self._inbox) >= self.config.max_backlog:
                        self._inbox.popleft()
                        self._skipped_since_answer += 1
                        self.counters.skipped += 1
                    self._inbox.append(msg)
                    self._inbox_cv.notify()
        finally:
            sock.close()

    def _reject(self, reason: str) -> None:
        self.counters.rejected += 1
        self.counters.reasons.append(reason[:200])
        log.warning("rejected message: %s", reason)

    # -- compute --------------------------------------------------------------------

    def _compute_loop(self) -> None:
        self._ready.wait()
        next_status = time.monotonic()
        while not self._stop.is_set():
            with self._inbox_cv:
                if not self._inbox and not self._commands:
                    self._inbox_cv.wait(timeout=0.05)
                item = self._next_frame()
            while self._commands:
                request, future = self._commands.popleft()
                try:
                    future.set_result(self._run_command(request))
                except CalmError as exc:
                    future.set_result({"ok": False, "error": str(exc)})
            if item is not None:
                try:
                    self._process(*item)
                except (DataError, ProtocolError) as exc:
                    self._reject(str(exc))
            if time.monotonic() >= next_status:
                self._queue_output(encode("status", {"seq": self._status_seq, **self.status()}))
                self._status_seq += 1
                next_status = time.monotonic() + self.config.status_every_s

    def _next_frame(self) -> tuple[Message, int] | None:
        """The next frame to answer, and how many older ones were dropped unanswered.

        Call holding the inbox lock. Every frame dropped before this one was
        popped is older than it, so the count belongs to exactly this frame.
        """
        if not self._inbox:
            return None
        if self._inbox[0].header["t_arrival"] < time.time() - self.config.max_lag_ms / 1e3:
            # Behind: jump to the newest frame rather than answer a queue of stale ones.
            while len(self._inbox) > 1:
                self._inbox.popleft()
                self._skipped_since_answer += 1
                self.counters.skipped += 1
        dropped, self._skipped_since_answer = self._skipped_since_answer, 0
        return self._inbox.popleft(), dropped

    def _configure(self, n: int, with_neuropil: bool) -> StreamingEngine:
        engine = StreamingEngine(
            self.model,
            EngineConfig(
                n_neurons=n, fps=self.config.fps, kind=self.config.kind, horizon=self.config.horizon
            ),
        )
        self.triggers.n_neurons = n
        for rule in self.triggers.rules.values():
            self.triggers.add(rule)  # re-validate indices against the real neuron count
        if self._record_path is not None and self.recorder is None:
            self.recorder = Recorder(
                self._record_path, n, self.config.fps, engine.horizon, self.config.kind,
                len(self.model.config.behavior_names), with_neuropil,
            )  # fmt: skip
        return engine

    def _process(self, msg: Message, dropped_before: int = 0) -> None:
        """Answer one frame; ``dropped_before``: older frames we dropped unanswered."""
        neuropil = None
        flags: dict[str, Any] = {}
        if msg.topic == "frame":
            image = msg.arrays.get("image")
            if image is None:
                raise ProtocolError(
                    "a 'frame' message carries its pixels in a buffer named 'image'"
                )
            if self.extractor is None:
                self._segment(image)
                return
            traces, neuropil, frame_flags = self.extractor.extract(image)
            if frame_flags.any:
                flags = {"frame_flags": frame_flags.__dict__}
        else:
            traces = msg.arrays.get("traces")
            if traces is None or traces.ndim != 1:
                raise ProtocolError("a 'traces' message carries a 1-D buffer named 'traces'")
            neuropil = msg.arrays.get("neuropil")
        if self.engine is None:
            self.engine = self._configure(traces.shape[0], neuropil is not None)
        expected = self.engine.expected_seq
        # Frames we dropped for being behind are skipped, not filled: filling costs a
        # model step each, and would keep an overloaded server behind for good.
        pred = self.engine.step(
            traces, seq=msg.seq, neuropil=neuropil, behavior=msg.arrays.get("behavior"),
            fill=dropped_before == 0,
        )  # fmt: skip
        if expected is not None:
            self.counters.lost += max(0, pred.filled + pred.skipped - dropped_before)
        self.counters.answered += 1
        self._publish_prediction(msg, pred, flags, dropped_before)
        if self.recorder is not None:
            row = dict(
                traces=np.asarray(traces, np.float32),
                seq=msg.seq,
                t_acq=float(msg.header.get("t_acq", math.nan)),
                t_arrival=msg.header["t_arrival"],
                t_publish=time.time(),
                forecast=pred.forecast,
                forecast_std=pred.forecast_std,
            )
            if "neuropil" in self.recorder._rows:
                row["neuropil"] = np.asarray(neuropil, np.float32)
            if "behavior_pred" in self.recorder._rows:
                row["behavior_pred"] = pred.behavior
            self.recorder.append(**row)

    def _segment(self, image: np.ndarray) -> None:
        """No ROIs given: learn them from the first frames of the stream (not answered meanwhile)."""
        if not self.config.auto_segment:
            raise DataError("raw frames need ROIs: start the server with --rois (or send 'traces')")
        if self.segmenter is None:
            self.segmenter = AutoSegmenter(image.shape)
            log.info("no ROIs given: segmenting the first %d frames", self.segmenter.config.frames)
        self.counters.segmenting += 1
        if not self.segmenter.push(image):
            return
        found = self.segmenter.result()
        self.segmenter = None
        if found.footprints is None:
            raise DataError(
                f"no cells found in the first {found.frames} frames; give ROIs with --rois"
            )
        self.extractor = RoiExtractor(found.footprints, motion=found.motion or False)
        self.rois_source = f"automatic segmentation of the first {found.frames} frames"
        log.info("found %d cells", self.extractor.n_rois)

    def _publish_prediction(
        self, msg: Message, pred: Prediction, flags: dict[str, Any], dropped_before: int = 0
    ) -> None:
        head = {
            "seq": msg.seq,
            "t_acq": msg.header.get("t_acq"),
            "t_arrival": msg.header["t_arrival"],
            "frame": pred.frame,
            "fps": self.config.fps,
            "neurons": int(pred.forecast.shape[0]),
            "horizon": int(pred.forecast.shape[1]),
            "filled": pred.filled,
            # The model's gap includes our own drops, except before the session's first
            # answer (no gap without a previous frame): those still count for the rig.
            "skipped": max(pred.skipped, dropped_before),
            "reset": pred.reset,
            "missing": int(pred.missing.sum()),
            "compute_ms": round(pred.timings_ms["total"], 3),
            **flags,
        }
        head = {k: v for k, v in head.items() if v is not None}
        self._queue_output(
            encode(
                "forecast",
                head,
                {
                    "forecast": pred.forecast,
                    "forecast_std": pred.forecast_std,
                    "activity": pred.activity,
                },
            ),
            timed=True,
        )
        if pred.behavior is not None:
            names = list(
                self.engine.calibration.names
                if self.engine.readout is not None
                else self.model.config.behavior_names
            )
            self._queue_output(
                encode("behavior", {**head, "names": names}, {"behavior": pred.behavior}),
                timed=True,
            )
        for event in self.triggers.evaluate(pred.forecast, self.config.fps, msg.seq, time.time()):
            self.counters.triggers += 1
            self._queue_output(
                encode("trigger", {**head, "rule": event.rule, "value": event.value, "threshold": event.threshold,
                                   "lead_frames": event.lead_frames}),
                timed=True,
            )  # fmt: skip

    # -- publish --------------------------------------------------------------------------

    def _queue_output(self, parts: list, timed: bool = False) -> None:
        with self._outbox_cv:
            if len(self._outbox) == self._outbox.maxlen:
                self.counters.publish_dropped += 1
            self._outbox.append([timed, parts])
            self._outbox_cv.notify()

    def _publish_loop(self) -> None:
        # XPUB: a PUB that also hears (un)subscriptions, so status can say who listens.
        sock = self._socket(zmq.XPUB, self.config.publish, bind=True)
        sock.setsockopt(zmq.SNDHWM, 1000)
        try:
            self._ready.wait()
            while not self._stop.is_set():
                while sock.poll(0):
                    note = sock.recv()
                    if note[:1] == b"\x01":
                        self.subscriptions += 1
                    elif note[:1] == b"\x00":
                        self.subscriptions -= 1
                with self._outbox_cv:
                    if not self._outbox:
                        self._outbox_cv.wait(timeout=0.02)
                    batch = list(self._outbox)
                    self._outbox.clear()
                for timed, parts in batch:
                    if timed:
                        # Stamp the publish time into the header as late as possible.
                        head = json.loads(bytes(parts[1]))
                        head["t_publish"] = time.time()
                        parts[1] = json.dumps(head, separators=(",", ":")).encode()
                        if parts[0] == b"forecast":
                            self.latencies_ms.append((head["t_publish"] - head["t_arrival"]) * 1e3)
                    try:
                        sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:  # PUB never blocks, but be explicit
                        self.counters.publish_dropped += 1
        finally:
            sock.close()

    # -- control --------------------------------------------------------------------------

    def _control_loop(self) -> None:
        sock = self._socket(zmq.REP, self.config.control, bind=True)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            self._ready.wait()
            while not self._stop.is_set():
                if not poller.poll(50):
                    continue
                raw = sock.recv()
                try:
                    request = json.loads(raw.decode("utf-8"))
                    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                        raise ProtocolError(
                            'a control request is a JSON object with a "cmd" string'
                        )
                except (UnicodeDecodeError, json.JSONDecodeError, ProtocolError) as exc:
                    self._reject(f"control: {exc}")
                    sock.send_json({"ok": False, "error": f"bad request: {exc}"})
                    continue
                if request["cmd"] == "shutdown":
                    sock.send_json({"ok": True, "stopping": True})
                    self.stop_reason = "shutdown command"
                    self._stop.set()
                    break
                future: Future = Future()
                with self._inbox_cv:
                    self._commands.append((request, future))
                    self._inbox_cv.notify()
                try:
                    reply = future.result(timeout=10.0)
                except TimeoutError:
                    reply = {"ok": False, "error": "the compute thread did not answer within 10 s"}
                sock.send_json(reply)
        finally:
            sock.close()

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run a control command in-process (as the control socket would)."""
        future: Future = Future()
        with self._inbox_cv:
            self._commands.append((request, future))
            self._inbox_cv.notify()
        return future.result(timeout=10.0)

    def _run_command(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd == "reset":
            if self.engine is not None:
                self.engine.reset()
            return {"ok": True}
        if cmd == "load_checkpoint":
            self.model, self.meta = load_checkpoint(req.get("path"))
            self.engine = None  # rebuilt on the next frame with the new model
            return {"ok": True, "checkpoint": str(req.get("path") or "shipped default")}
        if cmd == "set_rois":
            self.extractor = RoiExtractor(load_footprints(req["path"]), motion=True)
            self.rois_source = str(req["path"])
            self.engine = None
            return {"ok": True, "rois": self.extractor.n_rois}
        if cmd == "start_recording":
            if self.recorder is not None:
                raise ConfigError(f"already recording to {self.recorder.path}")
            self._record_path = Path(req["path"])
            if self.engine is not None:
                self.recorder = Recorder(
                    self._record_path, self.engine.n, self.config.fps, self.engine.horizon, self.config.kind,
                    len(self.model.config.behavior_names), self.extractor is not None,
                )  # fmt: skip
            return {"ok": True, "path": str(self._record_path)}
        if cmd == "stop_recording":
            path = self.recorder.path if self.recorder else None
            if self.recorder is not None:
                self.recorder.close()
            self.recorder, self._record_path = None, None
            return {"ok": True, "path": str(path) if path else None}
        if cmd == "add_trigger":
            rule = TriggerRule.from_dict(req.get("rule", {}))
            self.triggers.add(rule)
            return {"ok": True, "rule": rule.to_dict()}
        if cmd == "add_triggers_file":
            rules = load_rules(req["path"])
            for rule in rules:
                self.triggers.add(rule)
            return {"ok": True, "added": [r.name for r in rules]}
        if cmd == "remove_trigger":
            self.triggers.remove(str(req.get("name")))
            return {"ok": True}
        if cmd == "list_triggers":
            return {"ok": True, "rules": [r.to_dict() for r in self.triggers.rules.values()]}
        if cmd == "calibrate":
            if self.engine is None:
                raise ConfigError("no session yet: calibrate once frames are arriving")
            cal = self.engine.start_calibration(
                float(req.get("seconds", 120.0)), tuple(req["names"])
            )
            return {"ok": True, "frames": cal.target_frames}
        raise ConfigError(
            f"unknown command {cmd!r}; commands: status, reset, load_checkpoint, set_rois, start_recording, "
            "stop_recording, add_trigger, add_triggers_file, remove_trigger, list_triggers, calibrate, shutdown"
        )

    def status(self) -> dict[str, Any]:
        c = self.counters
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        arrivals = list(self.arrivals)
        fps_in = (
            (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
            if len(arrivals) > 2 and arrivals[-1] > arrivals[0]
            else 0.0
        )
        cal = self.engine.calibration if self.engine is not None else None
        return {
            "received": c.received,
            "answered": c.answered,
            "rejected": c.rejected,
            "skipped": c.skipped,
            "lost": c.lost,
            "publish_dropped": c.publish_dropped,
            "triggers_fired": c.triggers,
            "fps_in": round(fps_in, 3),
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 3),
            "latency_p99_ms": round(float(np.percentile(lat, 99)), 3),
            "neurons": self.engine.n if self.engine is not None else None,
            "segmenting": c.segmenting,
            "rois": self.rois_source,
            "subscriptions": self.subscriptions,
            "recording": str(self.recorder.path) if self.recorder is not None else None,
            "calibration": None
            if cal is None
            else {
                "frames": cal.frames,
                "target": cal.target_frames,
                "names": list(cal.names),
                "r2": cal.r2,
            },
            "last_rejections": list(c.reasons)[-5:],
        }
