"""The compute thread: frames in order through the session, control commands between frames.

It is the single owner of the model, the session (engine, extractor,
recorder) and the trigger rules, so none of them needs a lock. The
:class:`Inbox` between ingest and compute applies the latency policy: when
the oldest waiting frame has waited longer than ``max_lag_ms``, compute is
behind, and every waiting frame but the newest is dropped unanswered
(counted as ``skipped``), so latency stays bounded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calm_rt.errors import CalmError
from calm_rt.extract import Footprints, VolumeRois
from calm_rt.live import TriggerRule, TriggerSet
from calm_rt.model import CalM
from calm_rt.serve.commands import run_command
from calm_rt.serve.config import ServiceConfig
from calm_rt.serve.publish import Outbox
from calm_rt.serve.session import LiveSession, SessionSetup
from calm_rt.serve.stages import StageTimes
from calm_rt.wire import Message, encode

__all__ = ["Compute", "Counters", "Inbox"]

log = logging.getLogger("calm_rt.serve")


@dataclass
class Counters:
    """What the service counts; each is written by one thread, except ``rejected`` (locked)."""

    received: int = 0
    answered: int = 0
    rejected: int = 0
    skipped: int = 0  # dropped unanswered because compute was behind (too old, or inbox full)
    lost: int = 0  # gaps in the scope's sequence numbers
    publish_dropped: int = 0
    triggers: int = 0
    reasons: deque = field(default_factory=lambda: deque(maxlen=20))
    stages: StageTimes = field(default_factory=StageTimes)  # where a frame's time goes
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected += 1
            self.reasons.append(reason[:200])
        log.warning("rejected: %s", reason)


class Inbox:
    """Frames waiting for compute (bounded, newest-first when behind) and queued commands."""

    def __init__(self, config: ServiceConfig, counters: Counters) -> None:
        self.max_lag_s = config.max_lag_ms / 1e3
        self.max_backlog = config.max_backlog
        self.counters = counters
        self._frames: deque[Message] = deque()
        self._commands: deque[tuple[dict[str, Any], Future]] = deque()
        self._skipped_since_answer = 0  # frames dropped unanswered since the last answer
        self._cv = threading.Condition()

    def put(self, msg: Message) -> None:
        """Queue a decoded frame (ingest thread); the oldest goes when the inbox is full."""
        with self._cv:
            if len(self._frames) >= self.max_backlog:
                self._frames.popleft()
                self._skipped_since_answer += 1
                self.counters.skipped += 1
            self._frames.append(msg)
            self._cv.notify()

    def command(self, request: dict[str, Any]) -> Future:
        """Queue a control request for compute; its reply arrives on the future."""
        future: Future = Future()
        with self._cv:
            self._commands.append((request, future))
            self._cv.notify()
        return future

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def wait(self, timeout: float) -> None:
        with self._cv:
            if not self._frames and not self._commands:
                self._cv.wait(timeout)

    def commands(self) -> list[tuple[dict[str, Any], Future]]:
        with self._cv:
            out = list(self._commands)
            self._commands.clear()
        return out

    def next_frame(self) -> tuple[Message, int] | None:
        """The next frame to answer, and how many older ones were dropped unanswered.

        Every frame dropped before this one was popped is older than it, so
        the count belongs to exactly this frame.
        """
        with self._cv:
            if not self._frames:
                return None
            if self._frames[0].header["t_arrival"] < time.time() - self.max_lag_s:
                # Behind: jump to the newest frame rather than answer a queue of stale ones.
                while len(self._frames) > 1:
                    self._frames.popleft()
                    self._skipped_since_answer += 1
                    self.counters.skipped += 1
            dropped, self._skipped_since_answer = self._skipped_since_answer, 0
            return self._frames.popleft(), dropped


class Compute:
    """Owner of the model, the session and the rules; runs on the compute thread."""

    def __init__(
        self,
        config: ServiceConfig,
        model: CalM,
        meta: dict[str, Any],
        counters: Counters,
        inbox: Inbox,
        outbox: Outbox,
        status: Callable[[], dict[str, Any]],
    ) -> None:
        self.config, self.model, self.meta = config, model, meta
        self.counters, self.inbox, self.outbox = counters, inbox, outbox
        self.status = status
        self.triggers = TriggerSet()
        for rule in config.triggers:
            self.triggers.add(TriggerRule.from_dict(rule))
        self.setup = SessionSetup.from_config(model, config, self.triggers)
        self.session: LiveSession | None = None
        self.status_seq = 0

    def prepare(self) -> None:
        """Build the session now when the ROIs say what it is; warm the model either way."""
        self.session = self.setup.build_now()
        if self.session is None:
            self.setup.warm_up_model()

    # -- the loop -----------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        next_status = time.monotonic()
        while not stop.is_set():
            self.inbox.wait(timeout=0.05)
            for request, future in self.inbox.commands():
                future.set_result(run_command(self, request))
            item = self.inbox.next_frame()
            if item is not None:
                self._answer(*item)
            if time.monotonic() >= next_status:
                self.outbox.put(encode("status", {"seq": self.status_seq, **self.status()}))
                self.status_seq += 1
                next_status = time.monotonic() + self.config.status_every_s

    def _answer(self, msg: Message, dropped_before: int) -> None:
        self.counters.stages.add(queue=(time.time() - msg.header["t_arrival"]) * 1e3)
        try:
            if self.session is None:
                self.session, answer_it = self.setup.feed(msg)  # set-up, once, before answering
                if not answer_it:
                    return  # the frame went to the segmentation
            assert self.session is not None
            answer = self.session.process(msg, dropped_before)
        except CalmError as exc:  # incl. ConfigError: rules that do not fit a new session's neurons
            self.counters.reject(str(exc))
            return
        self.counters.answered += answer.answered  # 0 for a plane that waits for its volume
        self.counters.lost += answer.lost
        self.counters.triggers += answer.triggers
        for parts in answer.messages:
            self.outbox.put(parts, timed=True)
        self.counters.stages.add(**answer.timings_ms)
        if answer.record is not None:  # after the hand-off: the HDF5 append delays no answer
            t0 = time.perf_counter()
            answer.record()
            self.counters.stages.add(record=(time.perf_counter() - t0) * 1e3)

    # -- what commands change -----------------------------------------------------

    def replace_setup(
        self,
        model: CalM | None = None,
        meta: dict[str, Any] | None = None,
        rois: Footprints | VolumeRois | None = None,
        rois_source: str | None = None,
    ) -> None:
        """Start over with another model or other ROIs (the next frame starts a new session)."""
        if model is not None:
            self.model, self.meta = model, meta or {}
        old = self.setup
        if rois is None:
            rois, rois_source = old.rois, old.rois_source
        if self.session is not None:
            self.session.close()
            self.session = None
        self.triggers.n_neurons = None  # the next session binds its own count
        self.setup = SessionSetup(self.model, self.config, self.triggers, rois, rois_source)
        self.prepare()

    @property
    def recording(self) -> Path | None:
        if self.session is not None and self.session.recorder is not None:
            return self.session.recorder.path
        return self.setup.record if self.session is None else None

    def start_recording(self, path: Path) -> None:
        if self.session is not None:
            self.session.start_recording(path)
        else:
            self.setup.record = path  # the session records from its first frame

    def stop_recording(self) -> Path | None:
        self.setup.record = None
        if self.session is not None:
            return self.session.stop_recording()
        return None

    def close(self) -> None:
        """Close the recording cleanly (every appended frame flushed)."""
        if self.session is not None:
            self.session.close()
