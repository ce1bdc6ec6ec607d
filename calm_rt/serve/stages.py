"""Where a frame's time goes inside the server: each stage's recent durations, in ms.

A frame's way, in order, and the thread that times each stage::

    decode (ingest) -> queue (inbox wait) -> extract -> preprocess -> tokenize
    -> dat -> heads (engine) -> encode (messages, triggers) -> handoff (outbox
    wait) -> send (publish); record (the HDF5 append, after the hand-off)

``record`` runs after the frame's answer is handed to the publisher, so it
delays the next frame, never this one. Status reports p50/p99 of each stage
(``stages_ms``) beside the arrival-to-publish latency; ``python -m bench``
prints them next to its end-to-end rows.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

__all__ = ["STAGES", "StageTimes"]

STAGES = (
    "decode", "queue", "extract", "preprocess", "tokenize", "dat", "heads", "encode",
    "handoff", "send", "record",
)  # fmt: skip


class StageTimes:
    """The last ``maxlen`` durations (ms) of every stage, written by several threads."""

    def __init__(self, maxlen: int = 3000) -> None:
        self._samples: dict[str, deque[float]] = {s: deque(maxlen=maxlen) for s in STAGES}
        self._lock = threading.Lock()

    def add(self, **ms: float) -> None:
        """Record one frame's duration of each named stage, e.g. ``add(extract=1.2)``."""
        with self._lock:
            for stage, value in ms.items():
                self._samples[stage].append(value)

    def summary(self) -> dict[str, dict[str, float]]:
        """``{stage: {"p50": ms, "p99": ms, "n": frames}}`` for every stage that ran."""
        with self._lock:
            copies = {s: np.fromiter(d, np.float64, len(d)) for s, d in self._samples.items() if d}
        return {
            s: {"p50": round(float(np.percentile(v, 50)), 4),
                "p99": round(float(np.percentile(v, 99)), 4), "n": int(v.size)}
            for s, v in copies.items()
        }  # fmt: skip
