"""A microscope stand-in: streams frames (or traces) over ZeroMQ with accurate pacing.

Like ScanImage's ZeroMQ output it publishes on a PUB socket (or PUSHes),
one message per frame with a sequence number and the acquisition time. Frame
sources: a simulated movie (rendered up front so pacing is not disturbed),
a TIFF/HDF5/npy movie file, or a session file (sent as ``traces``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from calm_rt.data import (
    SimConfig,
    load_session,
    make_animal,
    open_movie,
    render_movie,
    simulate_session,
)
from calm_rt.errors import ConfigError
from calm_rt.extract import Footprints, VolumeRois
from calm_rt.wire.protocol import encode

log = logging.getLogger("calm_rt.serve")

__all__ = [
    "FrameSource",
    "MockScope",
    "ScopeLoop",
    "render_simulated_movie",
    "simulated_movie",
    "simulated_volume",
]


@dataclass
class FrameSource:
    """What to stream: ``kind`` is ``frame`` (images) or ``traces``; ``get(i)`` returns buffers.

    A multi-plane source (``planes`` K > 1) holds K plane frames per volume,
    in order: frame ``i`` is plane ``i % K`` of volume ``i // K``.
    """

    kind: str
    n_frames: int
    fps: float | None
    get: Any  # Callable[[int], dict[str, np.ndarray]]
    footprints: Footprints | VolumeRois | None = None  # sparse ROIs, for simulated movies
    planes: int = 1

    def with_behavior(self, behavior: np.ndarray) -> FrameSource:
        """The same frames, each with its behaviour sample ``behavior[i]`` (``[T, B]``) beside it."""
        beh = np.asarray(behavior, np.float32)
        if beh.ndim != 2:
            raise ConfigError(f"behaviour must be [T, B] to go with the frames, got {beh.shape}")
        get, k = self.get, self.planes
        if beh.shape[0] != self.n_frames // k:
            raise ConfigError(
                f"behaviour must be [T={self.n_frames // k} volumes, B], got {beh.shape}"
            )
        return FrameSource(
            self.kind, self.n_frames, self.fps, lambda i: {**get(i), "behavior": beh[i // k]},
            self.footprints, k,
        )  # fmt: skip

    @classmethod
    def from_file(cls, path: str | Path) -> FrameSource:
        path = Path(path)
        if path.suffix == ".npz" or path.is_dir():
            s = load_session(path)
            npil = s.neuropil

            def get(i: int) -> dict[str, np.ndarray]:
                out = {"traces": s.traces[:, i]}
                if npil is not None:
                    out["neuropil"] = npil[:, i]
                return out

            return cls("traces", s.n_frames, s.fps, get)
        movie = open_movie(path)
        return cls("frame", len(movie), movie.fps, lambda i: {"image": movie[i]})


def render_simulated_movie(
    neurons: int = 256, size: int = 512, frames: int = 600, fps: float = 30.0, seed: int = 0
) -> tuple[np.ndarray, Any, Any]:
    """Simulate one session of ``neurons`` cells and render it as a movie, in memory.

    Returns the movie ``[frames, size, size]`` uint16, the simulated
    :class:`~calm_rt.data.Session` (traces, behaviour) and the movie's ground
    truth (footprints, shifts).
    """
    cfg = SimConfig(
        animals=1, sessions=1, neurons=neurons, frames=frames, fps=fps, movie=True,
        movie_size=size, seed=seed,
    )  # fmt: skip
    session, truth = simulate_session(cfg, make_animal(cfg, 0), 0)
    chunks, movie_truth = render_movie(session, truth, cfg)
    return np.concatenate(list(chunks())), session, movie_truth


def simulated_movie(
    neurons: int = 256, size: int = 512, frames: int = 600, fps: float = 30.0, seed: int = 0
) -> FrameSource:
    """A simulated two-photon movie as a frame source (with its ROI footprints)."""
    movie, _, mtruth = render_simulated_movie(neurons, size, frames, fps, seed)
    footprints = Footprints(
        mtruth.weights(), tuple(mtruth.shape), tuple(f"cell_{i}" for i in range(neurons))
    )
    return FrameSource("frame", movie.shape[0], fps, lambda i: {"image": movie[i]}, footprints)


def simulated_volume(
    neurons: int = 256,
    planes: int = 3,
    size: int = 512,
    volumes: int = 600,
    fps: float = 30.0,
    seed: int = 0,
) -> FrameSource:
    """A simulated multi-plane movie: ``neurons`` cells shared among ``planes`` planes.

    Each plane is its own simulated field of view (seed ``seed + k``), so
    the planes' cells are independent populations and each plane wanders
    on its own: enough to rehearse the protocol, not a model of a brain.
    ``fps`` is the volume rate.
    """
    if planes < 1 or neurons < planes:
        raise ConfigError(
            f"need at least one plane and one neuron per plane, got {planes}, {neurons}"
        )
    per_plane = [neurons // planes + (k < neurons % planes) for k in range(planes)]
    movies, rois = [], []
    for k, n in enumerate(per_plane):
        src = simulated_movie(n, size, volumes, fps, seed + k)
        movies.append(src)
        assert isinstance(src.footprints, Footprints)
        rois.append(src.footprints)

    def get(i: int) -> dict[str, np.ndarray]:
        return movies[i % planes].get(i // planes)

    return FrameSource("frame", volumes * planes, fps, get, VolumeRois(tuple(rois)), planes)


class MockScope:
    """Stream a :class:`FrameSource` at ``fps`` on ``endpoint`` (``pub``: bind XPUB; ``push``: connect PUSH)."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", mode: str = "pub") -> None:
        if mode not in ("pub", "push"):
            raise ConfigError(f"mode must be 'pub' or 'push', got {mode!r}")
        self.ctx = zmq.Context()
        self.mode = mode
        if mode == "pub":
            # XPUB tells us when a subscriber arrives, so no frame is sent into the void.
            self.sock = self.ctx.socket(zmq.XPUB)
            self.sock.bind(endpoint)
        else:
            self.sock = self.ctx.socket(zmq.PUSH)
            self.sock.connect(endpoint)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.SNDHWM, 10_000)

    def wait_for_subscriber(self, timeout_s: float = 10.0) -> bool:
        if self.mode != "pub":
            return True
        if self.sock.poll(int(timeout_s * 1000)):
            self.sock.recv()  # the subscription message
            return True
        return False

    def stream(
        self,
        source: FrameSource,
        fps: float,
        n_frames: int | None = None,
        loop: bool = False,
        start_seq: int = 0,
        drop: set[int] | None = None,
        stop: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Send frames paced at ``fps``; returns ``frames_sent`` and pacing jitter.

        ``drop`` lists sequence numbers to skip (to rehearse lost frames);
        setting ``stop`` ends the stream early. A multi-plane source sends
        ``fps`` volumes a second (its planes evenly spaced), each plane frame
        with ``plane`` and ``volume`` in its header; sequence numbers count
        plane frames (volume ``v``'s plane ``p`` is ``seq = v * K + p`` from
        ``start_seq`` 0), and ``drop`` names them.
        """
        if fps <= 0:
            raise ConfigError(f"fps must be positive, got {fps}")
        total = n_frames if n_frames is not None else (source.n_frames if not loop else None)
        k = source.planes
        period = 1.0 / (fps * k)
        late = []
        sent = 0
        t0 = time.perf_counter() + 0.01
        for tick, i in enumerate(self._indices(source.n_frames, total, loop)):
            if stop is not None and stop.is_set():
                break
            seq = start_seq + tick
            deadline = t0 + tick * period
            _sleep_until(deadline)
            late.append(time.perf_counter() - deadline)
            if drop and seq in drop:
                continue  # a frame the scope "lost"
            buffers = source.get(i)
            header: dict[str, Any] = {"seq": seq, "t_acq": time.time(), "fps": fps}
            if k > 1:
                header.update(plane=seq % k, volume=seq // k)
            self.sock.send_multipart(encode(source.kind, header, buffers), copy=False)
            sent += 1
        lateness = np.asarray(late) * 1e3 if late else np.zeros(1)
        return {
            "frames_sent": sent,
            "duration_s": time.perf_counter() - t0,
            "pacing_p99_ms": float(np.percentile(lateness, 99)),
            "pacing_max_ms": float(lateness.max()),
        }

    @staticmethod
    def _indices(n: int, total: int | None, loop: bool) -> Iterator[int]:
        i = 0
        while total is None or i < total:
            if i >= n and not loop:
                return
            yield i % n
            i += 1

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


class ScopeLoop:
    """Stream a :class:`FrameSource` with :class:`MockScope` on a thread, looping, until stopped.

    The scope binds ``endpoint`` at construction; frames go out once a
    subscriber (the server) has connected. ``on_chunk(seq)`` runs between
    chunks of ``chunk`` frames (on the scope thread).
    """

    def __init__(
        self,
        endpoint: str,
        source: FrameSource,
        fps: float,
        chunk: int = 15,
        on_chunk: Callable[[int], None] | None = None,
    ) -> None:
        self.endpoint, self.source, self.fps, self.chunk = endpoint, source, fps, chunk
        self.on_chunk = on_chunk
        self.frames_sent = 0
        self._scope = MockScope(endpoint)  # used only by the thread from start() on
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="calm-rt-mock-scope", daemon=True)

    def start(self) -> ScopeLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        else:
            self._scope.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            while not self._scope.wait_for_subscriber(timeout_s=0.2):
                if self._stop.is_set():
                    return
            n, src = self.source.n_frames, self.source
            while not self._stop.is_set():
                offset = self.frames_sent % n
                shifted = FrameSource(
                    src.kind, n, src.fps, lambda i, o=offset: src.get((i + o) % n),
                    planes=src.planes,
                )  # fmt: skip
                report = self._scope.stream(
                    shifted, self.fps, n_frames=self.chunk, start_seq=self.frames_sent
                )
                self.frames_sent += report["frames_sent"]
                if self.on_chunk is not None:
                    self.on_chunk(self.frames_sent)
        except Exception:
            log.exception("the mock scope loop failed")
            raise
        finally:
            self._scope.close()


def _sleep_until(deadline: float) -> None:
    """Sleep to within a millisecond of ``deadline``, then spin (sleep alone jitters by ms)."""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        if left > 0.002:
            time.sleep(left - 0.0015)
