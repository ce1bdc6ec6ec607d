"""Receive a running server's outputs (and optionally the scope's frames) on worker threads.

Nothing here imports Qt or napari: two daemon threads own their ZeroMQ
sockets and write into a :class:`LiveFeed`'s state under a lock; the GUI
pulls a :meth:`LiveFeed.snapshot` on its own timer. Only the newest frame is
kept (older ones are counted as ``display_dropped``), so a slow screen never
slows the network side, and the network side never touches the viewer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from calm_rt.errors import ProtocolError
from calm_rt.serve.client import Endpoints, RigClient, control_request
from calm_rt.wire.protocol import Message, decode

__all__ = ["LiveFeed", "Snapshot", "TriggerMark"]

log = logging.getLogger("napari_plugin.feed")


@dataclass(frozen=True)
class TriggerMark:
    rule: str
    value: float
    seq: int
    received: float  # time.monotonic() when it arrived
    neurons: tuple[int, ...]  # the rule's neurons, when the control socket told us


@dataclass
class Snapshot:
    """What the GUI draws, copied out under the feed's lock (time runs along axis 0)."""

    version: int  # bumps with every forecast message
    fps: float
    seqs: np.ndarray  # [T] int64, oldest first
    activity: np.ndarray  # [T, N] float32 normalised activity (NaN = missing)
    forecast: np.ndarray | None  # [N, H] predicted for seqs[-1] + 1 ..
    forecast_std: np.ndarray | None  # [N, H]
    behavior_seqs: np.ndarray  # [Tb]
    behavior: np.ndarray  # [Tb, B] decoded, in the behaviour's units
    behavior_names: tuple[str, ...]
    measured_seqs: np.ndarray  # [Tm]
    measured: np.ndarray  # [Tm, B] as sent by the scope beside its frames (when it does)
    triggers: list[TriggerMark]
    triggers_seen: int
    status: dict[str, Any] | None
    rig: dict[str, Any] | None
    frames_received: int
    display_dropped: int
    error: str | None


class _Ring:
    """A fixed-length history of rows ``[width]`` keyed by sequence number."""

    def __init__(self, length: int, width: int) -> None:
        self.data = np.full((length, width), np.nan, np.float32)
        self.seqs = np.full(length, -1, np.int64)
        self.count = 0

    def push(self, seq: int, row: np.ndarray) -> None:
        i = self.count % len(self.seqs)
        self.data[i] = row
        self.seqs[i] = seq
        self.count += 1

    def ordered(self) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.count, len(self.seqs))
        if self.count <= len(self.seqs):
            return self.seqs[:n].copy(), self.data[:n].copy()
        start = self.count % len(self.seqs)
        order = np.r_[start : len(self.seqs), 0:start]
        return self.seqs[order], self.data[order]


@dataclass
class _State:
    version: int = 0
    fps: float = 30.0
    activity: _Ring | None = None
    forecast: np.ndarray | None = None
    forecast_std: np.ndarray | None = None
    behavior: _Ring | None = None
    behavior_names: tuple[str, ...] = ()
    measured: _Ring | None = None
    frame: np.ndarray | None = None
    frame_seq: int = -1
    frame_taken: int = -1
    frames_received: int = 0
    frames_shown: int = 0
    triggers: deque = field(default_factory=lambda: deque(maxlen=64))
    triggers_seen: int = 0
    # (seq, (dy, dx)) of the newest raw frames' motion shifts, from their forecasts.
    shifts: deque = field(default_factory=lambda: deque(maxlen=256))
    # Multi-plane streams: the newest image of every plane, and (volume, [(dy, dx) or
    # None per plane]) from the forecasts.
    planes: dict[int, np.ndarray] = field(default_factory=dict)
    plane_shifts: deque = field(default_factory=lambda: deque(maxlen=256))
    status: dict[str, Any] | None = None
    rig: dict[str, Any] | None = None
    rules: dict[str, tuple[int, ...]] = field(default_factory=dict)
    error: str | None = None


def _dropped(s: _State) -> int:
    """Frames received but never shown (the one waiting to be taken does not count)."""
    waiting = int(s.frame is not None and s.frame_seq != s.frame_taken)
    return max(0, s.frames_received - s.frames_shown - waiting)


class LiveFeed:
    """Subscribe to a server (and its scope) on worker threads; read with :meth:`snapshot`.

    Args:
        endpoints: where to connect.
        history: frames of activity and behaviour kept for the plots.
    """

    def __init__(self, endpoints: Endpoints, history: int = 300) -> None:
        self.endpoints = endpoints
        self.history = int(history)
        self._curve = endpoints.curve()  # fail now, on the caller's thread, if keys are missing
        self._lock = threading.Lock()
        self._state = _State()
        self._stop = threading.Event()
        self._rules_stale = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> LiveFeed:
        targets = [("outputs", self._outputs_loop)]
        if self.endpoints.scope:
            targets.append(("frames", self._frames_loop))
        if self.endpoints.control:
            targets.append(("control", self._control_loop))
        for name, target in targets:
            t = threading.Thread(
                target=self._guard(target), name=f"calm-rt-gui-{name}", daemon=True
            )
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 3.0) -> None:
        """Stop and join the threads (each closes its own sockets)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads = [t for t in self._threads if t.is_alive()]

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    @property
    def threads(self) -> tuple[threading.Thread, ...]:
        return tuple(self._threads)

    def _guard(self, target: Any) -> Any:
        def run() -> None:
            try:
                target()
            except Exception as exc:  # shown in the status line, never swallowed silently
                log.exception("live feed thread failed")
                with self._lock:
                    self._state.error = f"{type(exc).__name__}: {exc}"

        return run

    # -- reading ---------------------------------------------------------------------

    def take_frame(self) -> tuple[int, np.ndarray] | None:
        """The newest frame if it was not taken yet; frames never taken count as dropped.

        For a multi-plane stream: ``(volume, [K, H, W])``, the newest image of
        every plane (zeros for a plane not seen yet).
        """
        with self._lock:
            s = self._state
            if s.frame is None or s.frame_seq == s.frame_taken:
                return None
            s.frame_taken = s.frame_seq
            s.frames_shown += 1
            return s.frame_seq, s.frame

    def shift_for(
        self, seq: int, newest_if_unknown: bool = True, plane: int | None = None
    ) -> tuple[float, float] | None:
        """The motion shift ``(dy, dx)`` the server found in frame ``seq``.

        A frame is usually shown before its forecast arrives; until then this is
        the newest shift known (motion is slow next to a frame), None before any
        (or, with ``newest_if_unknown=False``, None until frame ``seq``'s own).
        For a multi-plane stream, ``seq`` is the volume and ``plane`` says
        whose shift (each plane is registered on its own).
        """
        with self._lock:
            if plane is not None:
                known = [(v, sh[plane]) for v, sh in self._state.plane_shifts
                         if plane < len(sh) and sh[plane] is not None]  # fmt: skip
                for v, shift in reversed(known):
                    if v == seq:
                        return shift
                return known[-1][1] if known and newest_if_unknown else None
            shifts = self._state.shifts
            for s, shift in reversed(shifts):
                if s == seq:
                    return shift
            return shifts[-1][1] if shifts and newest_if_unknown else None

    def snapshot(self, trigger_window_s: float = 1.5) -> Snapshot:
        now = time.monotonic()
        with self._lock:
            s = self._state
            empty1, empty2 = np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
            seqs, activity = s.activity.ordered() if s.activity else (empty1, empty2)
            bseqs, beh = s.behavior.ordered() if s.behavior else (empty1, empty2)
            mseqs, meas = s.measured.ordered() if s.measured else (empty1, empty2)
            return Snapshot(
                version=s.version,
                fps=s.fps,
                seqs=seqs,
                activity=activity,
                forecast=None if s.forecast is None else s.forecast.copy(),
                forecast_std=None if s.forecast_std is None else s.forecast_std.copy(),
                behavior_seqs=bseqs,
                behavior=beh,
                behavior_names=s.behavior_names,
                measured_seqs=mseqs,
                measured=meas,
                triggers=[m for m in s.triggers if now - m.received <= trigger_window_s],
                triggers_seen=s.triggers_seen,
                status=None if s.status is None else dict(s.status),
                rig=None if s.rig is None else dict(s.rig),
                frames_received=s.frames_received,
                display_dropped=_dropped(s),
                error=s.error,
            )

    # -- the outputs thread ----------------------------------------------------------

    def _outputs_loop(self) -> None:
        secret, public = self._curve
        client = RigClient(
            self.endpoints.publish,
            callbacks={
                "forecast": self._on_forecast,
                "behavior": self._on_behavior,
                "trigger": self._on_trigger,
                "status": self._on_status,
            },
            client_secret=secret,
            server_public=public,
        )
        try:
            next_stats = 0.0
            stats = client.stats_by_topic["forecast"]
            while not self._stop.is_set():
                client.poll_once(50)
                # Computed here, as soon as there is data, then twice a second:
                # RigClient's deques belong to this thread.
                if stats.end_to_end_ms and time.monotonic() >= next_stats:
                    rig = {"forecast": stats.summary(), "reconnects": client.reconnects}
                    with self._lock:
                        self._state.rig = rig
                    next_stats = time.monotonic() + 0.5
        finally:
            client.close()

    # -- the control thread: which neurons does each trigger rule watch? -------------

    def _control_loop(self) -> None:
        # Its own thread, so that a slow or absent control socket never delays the outputs.
        self._rules_stale.set()
        while not self._stop.is_set():
            if self._rules_stale.wait(0.1):
                self._rules_stale.clear()
                self._refresh_rules()
                self._stop.wait(1.0)  # at most one request a second

    def _refresh_rules(self) -> None:
        assert self.endpoints.control is not None
        secret, public = self._curve
        try:
            reply = control_request(
                self.endpoints.control, {"cmd": "list_triggers"}, 2.0, secret, public
            )
        except TimeoutError as exc:
            with self._lock:
                self._state.error = f"control socket: {exc}"
            return
        rules = {r["name"]: tuple(r["neurons"]) for r in reply.get("rules", [])}
        with self._lock:
            self._state.rules = rules
            if self._state.error and self._state.error.startswith("control socket"):
                self._state.error = None

    def _on_forecast(self, msg: Message) -> None:
        activity = msg.arrays.get("activity")
        forecast, spread = msg.arrays.get("forecast"), msg.arrays.get("forecast_std")
        if activity is None or forecast is None or spread is None:
            with self._lock:
                self._state.error = "a forecast message lacked activity, forecast or forecast_std"
            return
        with self._lock:
            s = self._state
            if s.activity is None or s.activity.data.shape[1] != activity.shape[0]:
                s.activity = _Ring(self.history, activity.shape[0])  # new session: start over
            s.activity.push(msg.seq, activity)
            s.forecast, s.forecast_std = np.array(forecast), np.array(spread)
            s.fps = float(msg.header.get("fps", s.fps))
            shift = msg.header.get("shift")
            if isinstance(shift, list) and len(shift) == 2:
                s.shifts.append((msg.seq, (float(shift[0]), float(shift[1]))))
            shifts = msg.header.get("shifts")
            if isinstance(shifts, list):
                s.plane_shifts.append((msg.seq, [_pair(x) for x in shifts]))
            s.version += 1

    def _on_behavior(self, msg: Message) -> None:
        beh = msg.arrays.get("behavior")
        if beh is None:
            return
        with self._lock:
            s = self._state
            if s.behavior is None or s.behavior.data.shape[1] != beh.shape[0]:
                s.behavior = _Ring(self.history, beh.shape[0])
            s.behavior.push(msg.seq, beh)
            s.behavior_names = tuple(msg.header.get("names", ()))

    def _on_trigger(self, msg: Message) -> None:
        rule = str(msg.header.get("rule", "?"))
        with self._lock:
            neurons = self._state.rules.get(rule)
            self._state.triggers.append(
                TriggerMark(
                    rule,
                    float(msg.header.get("value", np.nan)),
                    msg.seq,
                    time.monotonic(),
                    neurons or (),
                )
            )
            self._state.triggers_seen += 1
        if neurons is None:
            self._rules_stale.set()  # a rule added since we asked: ask again

    def _on_status(self, msg: Message) -> None:
        with self._lock:
            self._state.status = msg.header

    # -- the frames thread -----------------------------------------------------------

    def _frames_loop(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 8)  # a stalled GUI makes the scope drop *our* copies only
        sock.setsockopt(zmq.SUBSCRIBE, b"frame")
        sock.connect(self.endpoints.scope)
        try:
            while not self._stop.is_set():
                if not sock.poll(50):
                    continue
                newest: Message | None = None
                while True:  # drain: only the newest image is worth showing
                    try:
                        parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        msg = decode(parts)
                    except ProtocolError:
                        continue
                    if "image" not in msg.arrays:
                        continue
                    newest = msg
                    self._note_frame(msg)
                    if "plane" in msg.header:  # every plane's newest image is worth showing
                        with self._lock:
                            self._state.planes[int(msg.header["plane"])] = np.array(
                                msg.arrays["image"]
                            )
                if newest is not None and "plane" in newest.header:
                    with self._lock:
                        image = _stack(self._state.planes)
                        if image is not None:
                            self._state.frame, self._state.frame_seq = (
                                image,
                                newest.header["volume"],
                            )
                elif newest is not None:
                    image = np.array(newest.arrays["image"])  # own it: the zmq buffer goes away
                    with self._lock:
                        self._state.frame, self._state.frame_seq = image, newest.seq
        finally:
            sock.close()
            ctx.term()

    def _note_frame(self, msg: Message) -> None:
        beh = msg.arrays.get("behavior")
        with self._lock:
            s = self._state
            s.frames_received += 1
            if beh is not None and beh.ndim == 1:
                if s.measured is None or s.measured.data.shape[1] != beh.shape[0]:
                    s.measured = _Ring(self.history, beh.shape[0])
                s.measured.push(msg.seq, beh)


def _pair(x: Any) -> tuple[float, float] | None:
    """``[dy, dx]`` from a header as a tuple; None for a missing plane (or anything else)."""
    if isinstance(x, list) and len(x) == 2 and all(isinstance(v, (int, float)) for v in x):
        return float(x[0]), float(x[1])
    return None


def _stack(planes: dict[int, np.ndarray]) -> np.ndarray | None:
    """``[K, H, W]``: planes 0 .. max seen, zeros for any not seen yet; None if shapes differ."""
    images = list(planes.values())
    if not images or any(im.shape != images[0].shape for im in images):
        return None
    out = np.zeros((max(planes) + 1, *images[0].shape), images[0].dtype)
    for k, im in planes.items():
        out[k] = im
    return out
