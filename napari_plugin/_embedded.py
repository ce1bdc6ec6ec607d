"""The embedded demo: a simulated microscope and a calm-rt server, started by the live view.

Like ``calm-rt demo`` but with the napari window as the rig: the mock scope
streams a rendered movie (with the simulated behaviour beside every frame)
on a loopback port, the server extracts, predicts and publishes on two more,
and the live view connects to them as it would to a real rig. Once frames
flow the demo asks the server to calibrate its behaviour readout on the
measured behaviour, so decoded behaviour appears a few seconds in.

No Qt or napari here. ``python -m napari_plugin._embedded`` is the demo's
scope process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calm_rt.client import control_request
from calm_rt.errors import CalmError
from calm_rt.mockscope import FrameSource, MockScope, render_simulated_movie
from napari_plugin._feed import Endpoints

__all__ = ["DemoMovie", "EmbeddedDemo", "ScopeLoop", "demo_movie", "free_endpoint"]

log = logging.getLogger("napari_plugin.embedded")


def free_endpoint() -> str:
    """A loopback TCP endpoint on a port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@dataclass(frozen=True)
class DemoMovie:
    """A simulated movie with its ROIs and the behaviour that drove it."""

    movie: np.ndarray  # [T, H, W] uint16
    labels: np.ndarray  # [H, W] int32: neuron k is label k + 1, 0 is background
    behavior: np.ndarray  # [T, B] float32
    behavior_names: tuple[str, ...]
    fps: float

    @property
    def n_rois(self) -> int:
        return int(self.labels.max())

    def source(self) -> FrameSource:
        """Frames for :class:`MockScope`, each with its behaviour sample beside the image."""
        movie, beh = self.movie, self.behavior.astype(np.float32)
        return FrameSource(
            "frame", movie.shape[0], self.fps, lambda i: {"image": movie[i], "behavior": beh[i]}
        )


def demo_movie(
    neurons: int = 64, size: int = 256, frames: int = 300, fps: float = 30.0, seed: int = 0
) -> DemoMovie:
    """Render a simulated two-photon movie ``[frames, size, size]`` of ``neurons`` cells."""
    movie, session, mtruth = render_simulated_movie(neurons, size, frames, fps, seed)
    # Labels straight from the sparse footprints (a dense [N, H, W] stack is 256 MB at 512 px).
    h, w = mtruth.shape
    labels = np.zeros(h * w, np.int32)
    best = np.zeros(h * w, np.float32)
    for i in range(mtruth.centers.shape[0]):
        sl = slice(mtruth.footprint_indptr[i], mtruth.footprint_indptr[i + 1])
        pix, wts = mtruth.footprint_pixels[sl], mtruth.footprint_weights[sl]
        win = wts > best[pix]
        labels[pix[win]], best[pix[win]] = i + 1, wts[win]
    # Consecutive ids, so that neuron k of the server (which numbers ROIs by label) is label k + 1.
    _, labels = np.unique(labels, return_inverse=True)
    return DemoMovie(
        movie=movie,
        labels=labels.reshape(h, w).astype(np.int32),
        behavior=np.asarray(session.behavior, np.float32),
        behavior_names=tuple(session.behavior_names),
        fps=fps,
    )


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
        self._thread = threading.Thread(target=self._run, name="calm-rt-demo-scope", daemon=True)

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
                    src.kind, n, src.fps, lambda i, o=offset: src.get((i + o) % n)
                )
                report = self._scope.stream(
                    shifted, self.fps, n_frames=self.chunk, start_seq=self.frames_sent
                )
                self.frames_sent += report["frames_sent"]
                if self.on_chunk is not None:
                    self.on_chunk(self.frames_sent)
        except Exception:
            log.exception("the demo scope failed")
            raise
        finally:
            self._scope.close()


class EmbeddedDemo:
    """A mock scope and a calm-rt server on free loopback ports, started from this process.

    Both run as child processes (``calm-rt serve`` and this module's scope
    entry point), so that napari's drawing, which holds the GIL for most of
    every frame, never delays the server: the latency the view reports is
    the server's, as on a rig where it has its own process or machine. The
    scope process also watches this one and shuts the server down should
    napari die without stopping the demo.

    Args:
        neurons, size, frames, fps: the simulated movie (looped).
        checkpoint: model checkpoint folder (the shipped default when None).
        model: a ready model instead of a checkpoint (saved to a temporary
            checkpoint for the server; tests use a tiny one).
        calibrate_s: seconds of measured behaviour to calibrate the readout
            on (0: do not calibrate). The movie loops, so after a calibration
            longer than the loop the readout has seen every frame it will
            decode and its R² is optimistic; on a rig, see docs/engine.md.
        triggers: trigger rules for the server (``docs/protocol.md``); by
            default one rule, ``A``, on the first four neurons.
        start_timeout_s: how long the server may take to load and warm up.
        server_threads: torch threads of the server process (None: torch's
            default). One by default: napari keeps a core busy drawing, and
            torch's thread pool spinning against it costs far more than the
            second thread gains on per-frame work this small.
    """

    def __init__(
        self,
        neurons: int = 64,
        size: int = 256,
        frames: int = 300,
        fps: float = 30.0,
        checkpoint: Path | None = None,
        model: object | None = None,
        calibrate_s: float = 30.0,
        triggers: tuple[dict, ...] | None = None,
        seed: int = 0,
        start_timeout_s: float = 300.0,
        server_threads: int | None = 1,
    ) -> None:
        self.neurons, self.size, self.frames, self.fps = neurons, size, frames, fps
        self.checkpoint, self.model, self.calibrate_s, self.seed = (
            checkpoint,
            model,
            calibrate_s,
            seed,
        )
        self.start_timeout_s, self.server_threads = start_timeout_s, server_threads
        if triggers is None:
            triggers = (
                {
                    "name": "A",
                    "neurons": list(range(min(4, neurons))),
                    "window_ms": 300,
                    "threshold": 1.0,
                    "refractory_ms": 1000,
                },
            )
        self.triggers = tuple(triggers)
        self.movie: DemoMovie | None = None
        self.endpoints: Endpoints | None = None
        self.server: subprocess.Popen | None = None
        self.scope: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._stop = threading.Event()
        self._calibrator: threading.Thread | None = None

    def start(self) -> EmbeddedDemo:
        """Render, start the server (model load and warm-up) and the scope; blocks for seconds.

        Call it off the GUI thread. Raises :class:`~calm_rt.errors.CalmError`
        with the server's last output when it does not come up.
        """
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.movie = demo_movie(self.neurons, self.size, self.frames, self.fps, self.seed)
        self._tmp = tempfile.TemporaryDirectory(prefix="calm-rt-demo-")
        work = Path(self._tmp.name)
        np.save(work / "movie.npy", self.movie.movie)
        np.save(work / "behavior.npy", self.movie.behavior.astype(np.float32))
        np.savez(work / "rois.npz", labels=self.movie.labels)
        (work / "triggers.json").write_text(json.dumps(list(self.triggers)))
        checkpoint = self.checkpoint
        if self.model is not None:
            from calm_rt.model import save_checkpoint

            checkpoint = save_checkpoint(self.model, work / "checkpoint")  # type: ignore[arg-type]
        scope_ep, publish_ep, control_ep = free_endpoint(), free_endpoint(), free_endpoint()
        py = [sys.executable, "-m"]
        serve = [
            *py,
            "calm_rt",
            "serve",
            "--ingest",
            scope_ep,
            "--publish",
            publish_ep,
            "--control",
            control_ep,
            "--rois",
            str(work / "rois.npz"),
            "--fps",
            str(self.fps),
            "--triggers",
            str(work / "triggers.json"),
        ]
        if checkpoint is not None:
            serve += ["--checkpoint", str(checkpoint)]
        self._server_log = work / "server.log"
        with open(self._server_log, "wb") as out:
            env = dict(os.environ)
            if self.server_threads:
                env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.server_threads)
            self.server = subprocess.Popen(serve, stdout=out, stderr=subprocess.STDOUT, env=env)
        self._wait_for_server(control_ep)
        with open(work / "scope.log", "wb") as out:
            self.scope = subprocess.Popen(
                [
                    *py,
                    "napari_plugin._embedded",
                    "--endpoint",
                    scope_ep,
                    "--movie",
                    str(work / "movie.npy"),
                    "--behavior",
                    str(work / "behavior.npy"),
                    "--fps",
                    str(self.fps),
                    "--control",
                    control_ep,
                    "--parent",
                    str(os.getpid()),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.endpoints = Endpoints(publish=publish_ep, control=control_ep, scope=scope_ep)
        if self.calibrate_s > 0:
            self._calibrator = threading.Thread(
                target=self._calibrate,
                args=(control_ep,),
                name="calm-rt-demo-calibrate",
                daemon=True,
            )
            self._calibrator.start()

    def _wait_for_server(self, control: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            if self.server is None or self.server.poll() is not None:
                break
            try:
                if control_request(control, {"cmd": "status"}, timeout_s=0.5).get("ok"):
                    return
            except TimeoutError:
                continue
        tail = (
            self._server_log.read_text(errors="replace")[-2000:]
            if self._server_log.exists()
            else ""
        )
        raise CalmError(f"the demo server did not start:\n{tail.strip()}")

    def _calibrate(self, control: str) -> None:
        """Once frames flow (the server knows its neurons), calibrate the behaviour readout."""
        assert self.movie is not None
        names = list(self.movie.behavior_names)
        while not self._stop.wait(0.5):
            try:
                status = control_request(control, {"cmd": "status"}, timeout_s=2.0)
                if status.get("neurons") is None:
                    continue
                reply = control_request(
                    control,
                    {"cmd": "calibrate", "seconds": self.calibrate_s, "names": names},
                    timeout_s=2.0,
                )
            except TimeoutError:
                continue
            if reply.get("ok"):
                return

    @property
    def running(self) -> bool:
        return all(p is not None and p.poll() is None for p in (self.server, self.scope))

    @property
    def processes(self) -> tuple[subprocess.Popen, ...]:
        return tuple(p for p in (self.server, self.scope) if p is not None)

    def stop(self) -> None:
        """Stop the scope, then the server (SIGTERM, then SIGKILL after 5 s); remove the files. Idempotent."""
        self._stop.set()
        for proc in (self.scope, self.server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in (self.scope, self.server):
            if proc is not None:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._calibrator is not None:
            self._calibrator.join(timeout=3)
            self._calibrator = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _watch_parent(parent: int, control: str | None, stop: threading.Event) -> None:
    """Shut the demo down when the process that started it is gone."""
    while not stop.wait(0.5):
        if os.getppid() != parent:
            if control:
                try:
                    control_request(control, {"cmd": "shutdown"}, timeout_s=1.0)
                except TimeoutError:
                    pass
            os._exit(0)


def main(argv: list[str] | None = None) -> int:
    """The demo's scope process: loop a movie (with behaviour beside each frame) until SIGTERM."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m napari_plugin._embedded")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--movie", type=Path, required=True, help=".npy [T, H, W]")
    parser.add_argument("--behavior", type=Path, default=None, help=".npy [T, B]")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--control", default=None, help="the server's control endpoint")
    parser.add_argument("--parent", type=int, default=None, help="shut down when it exits")
    args = parser.parse_args(argv)
    movie = np.load(args.movie, mmap_mode="r")
    beh = np.load(args.behavior) if args.behavior else None

    def get(i: int) -> dict[str, np.ndarray]:
        out = {"image": np.asarray(movie[i])}
        if beh is not None:
            out["behavior"] = beh[i]
        return out

    loop = ScopeLoop(args.endpoint, FrameSource("frame", movie.shape[0], args.fps, get), args.fps)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    if args.parent:
        threading.Thread(
            target=_watch_parent, args=(args.parent, args.control, stopped), daemon=True
        ).start()
    loop.start()
    while not stopped.wait(0.2) and loop.alive:
        pass
    loop.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
