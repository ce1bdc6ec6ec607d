"""The demo: a simulated microscope and a calm-rt server on loopback, for ``calm-rt demo`` and napari.

One runner, :class:`Demo`, serves both: it renders (or reuses) a simulated
uint16 movie with its ROIs and behaviour, starts ``calm-rt serve`` and
``calm-rt mock-scope`` as child processes on free loopback ports (each in
its own process, as on a rig, so that neither the caller's drawing nor its
own work delays the server), and, once frames flow, asks the server to
calibrate its behaviour readout on the measured behaviour.

:func:`run_demo` is the headless ``calm-rt demo``: a rig listener process
(``calm-rt listen``) counts and times what comes back, and the summary is
what a rig builder needs: frames sent, predictions received, frames dropped
(counted by the rig from the sequence numbers it heard), and frame-in to
prediction-out latency as the rig measured it. The napari live view uses
:class:`Demo` itself (``napari_plugin``), with its window as the rig.
"""

from __future__ import annotations

import json
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
from typing import Any

import numpy as np

from calm_rt.errors import CalmError
from calm_rt.extract import Footprints, save_rois
from calm_rt.serve.client import Endpoints, control_request
from calm_rt.serve.mockscope import render_simulated_movie

__all__ = ["Demo", "DemoMovie", "demo_movie", "free_endpoint", "machine", "run_demo"]


def free_endpoint() -> str:
    """A loopback TCP endpoint on a port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@dataclass(frozen=True)
class DemoMovie:
    """A simulated movie with its ROIs and the behaviour that drove it."""

    movie: np.ndarray  # [T, H, W] uint16
    footprints: Footprints  # sparse, in the movie's reference coordinates
    behavior: np.ndarray  # [T, B] float32
    behavior_names: tuple[str, ...]
    fps: float
    shifts: np.ndarray  # [T, 2] float32: how far the scene moved in frame t (dy, dx), pixels

    @property
    def labels(self) -> np.ndarray:
        """``[H, W]`` int32: neuron k is label k + 1 (the server numbers ROIs the same way)."""
        return self.footprints.labels()

    @property
    def n_rois(self) -> int:
        return self.footprints.n_rois


def demo_movie(
    neurons: int = 64, size: int = 256, frames: int = 300, fps: float = 30.0, seed: int = 0
) -> DemoMovie:
    """Render a simulated two-photon movie ``[frames, size, size]`` of ``neurons`` cells."""
    movie, session, mtruth = render_simulated_movie(neurons, size, frames, fps, seed)
    names = tuple(f"cell_{i}" for i in range(neurons))
    return DemoMovie(
        movie=movie,
        footprints=Footprints(mtruth.weights(), tuple(mtruth.shape), names),  # type: ignore[arg-type]
        behavior=np.asarray(session.behavior, np.float32),
        behavior_names=tuple(session.behavior_names),
        fps=fps,
        shifts=np.asarray(mtruth.shifts, np.float32),
    )


class Demo:
    """A mock scope process and a server process on free loopback ports.

    Args:
        neurons, size, frames, fps: the simulated movie (looped).
        checkpoint: model checkpoint folder (the shipped default when None).
        model: a ready model instead of a checkpoint (saved to a checkpoint
            in the work folder for the server; tests use a tiny one).
        calibrate_s: seconds of measured behaviour to calibrate the readout
            on (0: do not calibrate). The movie loops, so after a calibration
            longer than the loop the readout has seen every frame it will
            decode and its R² is optimistic; on a rig, see docs/engine.md.
        triggers: trigger rules for the server (``docs/protocol.md``); by
            default one rule, ``A``, on the first four neurons.
        server_threads: torch threads of the server (None: all cores but one).
        stream_frames: frames the scope sends before it stops (None: until stopped).
        workdir: where the movie, ROIs and logs go; rendered movies are reused
            from there (None: a temporary folder, removed by :meth:`stop`).
        start_timeout_s: how long the server may take to load and warm up.
        device: where the server's model runs (``auto``, ``cpu`` or ``cuda``).
        priority: the server's scheduling priority (``calm-rt serve --priority``).
        dtype: the server's transformer precision (``calm-rt serve --dtype``).
    """

    def __init__(
        self,
        neurons: int = 64,
        size: int = 256,
        frames: int = 300,
        fps: float = 30.0,
        checkpoint: Path | None = None,
        model: Any = None,
        calibrate_s: float = 30.0,
        triggers: tuple[dict, ...] | None = None,
        seed: int = 0,
        server_threads: int | None = 1,
        stream_frames: int | None = None,
        workdir: Path | None = None,
        start_timeout_s: float = 300.0,
        device: str = "auto",
        priority: str = "normal",
        record: Path | None = None,
        dtype: str = "float32",
    ) -> None:
        self.neurons, self.size, self.frames, self.fps = neurons, size, frames, fps
        self.record = Path(record).resolve() if record is not None else None
        self.checkpoint, self.model, self.calibrate_s, self.seed = (
            checkpoint,
            model,
            calibrate_s,
            seed,
        )
        self.server_threads, self.stream_frames = server_threads, stream_frames
        self.start_timeout_s = start_timeout_s
        self.device, self.priority, self.dtype = device, priority, dtype
        if triggers is None:
            triggers = (
                {"name": "A", "neurons": list(range(min(4, neurons))), "window_ms": 300,
                 "threshold": 1.0, "refractory_ms": 1000},
            )  # fmt: skip
        self.triggers = tuple(triggers)
        self._workdir = workdir
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.movie: DemoMovie | None = None
        self.endpoints: Endpoints | None = None
        self.server: subprocess.Popen | None = None
        self.scope: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._calibrator: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self, stream: bool = True) -> Demo:
        """Render, start the server (model load and warm-up), then the scope; blocks for seconds.

        With ``stream=False`` the scope waits for :meth:`stream` (so a rig can
        subscribe before the first frame). Raises
        :class:`~calm_rt.errors.CalmError` with the server's last output
        when it does not come up.
        """
        try:
            self._start_server()
            if stream:
                self.stream()
        except BaseException:
            self.stop()
            raise
        return self

    def stream(self) -> None:
        """Start the scope (frames flow once the server has subscribed)."""
        assert self.endpoints is not None
        work = self.work
        cmd = [*_CALM_RT, "mock-scope", "--endpoint", self.endpoints.scope, "--source",
               str(work / self._stem("movie.npy")), "--behavior", str(work / self._stem("behavior.npy")),
               "--fps", str(self.fps), "--loop", "--exit-with", str(os.getpid()),
               "--json", str(work / "scope.json"), "--priority", self.priority]  # fmt: skip
        if self.stream_frames is not None:
            cmd += ["--frames", str(self.stream_frames)]
        with open(work / "scope.log", "wb") as out:
            self.scope = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        if self.calibrate_s > 0:
            self._calibrator = threading.Thread(
                target=self._calibrate, name="calm-rt-demo-calibrate", daemon=True
            )
            self._calibrator.start()

    @property
    def work(self) -> Path:
        if self._workdir is not None:
            self._workdir.mkdir(parents=True, exist_ok=True)
            return self._workdir
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="calm-rt-demo-")
        return Path(self._tmp.name)

    def _stem(self, name: str) -> str:
        return f"{self.neurons}n_{self.size}px_{self.frames}f_{self.fps:g}hz_s{self.seed}_{name}"

    def _render(self) -> Path:
        """The movie, behaviour and ROIs in the work folder (reused when already there)."""
        work = self.work
        rois = work / self._stem("rois.npz")
        movie_path, beh_path = work / self._stem("movie.npy"), work / self._stem("behavior.npy")
        names_path = work / self._stem("behavior_names.json")
        shifts_path = work / self._stem("shifts.npy")
        if not all(p.exists() for p in (rois, movie_path, beh_path, names_path, shifts_path)):
            self.movie = demo_movie(self.neurons, self.size, self.frames, self.fps, self.seed)
            np.save(movie_path, self.movie.movie)
            np.save(beh_path, self.movie.behavior.astype(np.float32))
            np.save(shifts_path, self.movie.shifts)
            save_rois(rois, self.movie.footprints)
            names_path.write_text(json.dumps(list(self.movie.behavior_names)))
        else:
            names = tuple(json.loads(names_path.read_text()))
            self.movie = _load_movie(movie_path, beh_path, shifts_path, rois, names, self.fps)
        return rois

    def _start_server(self) -> None:
        rois = self._render()
        work = self.work
        (work / "triggers.json").write_text(json.dumps(list(self.triggers)))
        checkpoint = self.checkpoint
        if self.model is not None:
            from calm_rt.model import save_checkpoint

            checkpoint = save_checkpoint(self.model, work / "checkpoint")
        self.endpoints = Endpoints(
            publish=free_endpoint(), control=free_endpoint(), scope=free_endpoint()
        )
        cmd = [*_CALM_RT, "serve", "--ingest", self.endpoints.scope, "--publish", self.endpoints.publish,
               "--control", self.endpoints.control, "--rois", str(rois), "--fps", str(self.fps),
               "--triggers", str(work / "triggers.json"), "--exit-with", str(os.getpid())]  # fmt: skip
        if checkpoint is not None:
            cmd += ["--checkpoint", str(checkpoint)]
        if self.server_threads:
            cmd += ["--threads", str(self.server_threads)]
        cmd += ["--device", self.device.split(":", 1)[0], "--priority", self.priority]
        cmd += ["--dtype", self.dtype]
        if self.record is not None:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            cmd += ["--record", str(self.record)]
        self._server_log = work / "server.log"
        with open(self._server_log, "wb") as out:
            self.server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        self._wait_for_server()

    def _wait_for_server(self) -> None:
        assert self.endpoints is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            if self.server is None or self.server.poll() is not None:
                break
            try:
                if control_request(self.endpoints.control, {"cmd": "status"}, timeout_s=0.5).get(
                    "ok"
                ):
                    return
            except TimeoutError:
                continue
        raise CalmError(f"the demo server did not start:\n{self.server_log_tail()}")

    def server_log_tail(self, chars: int = 2000) -> str:
        log = getattr(self, "_server_log", None)
        return log.read_text(errors="replace")[-chars:].strip() if log and log.exists() else ""

    def status(self, timeout_s: float = 2.0) -> dict[str, Any]:
        """The server's status (raises TimeoutError when it does not answer)."""
        assert self.endpoints is not None
        return control_request(self.endpoints.control, {"cmd": "status"}, timeout_s=timeout_s)

    def _calibrate(self) -> None:
        """Once frames flow (the server knows its neurons), calibrate the behaviour readout."""
        assert self.movie is not None and self.endpoints is not None
        names = list(self.movie.behavior_names)
        while not self._stop.wait(0.5):
            try:
                if self.status().get("neurons") is None:
                    continue
                reply = control_request(
                    self.endpoints.control,
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
        """Stop the scope, then the server (SIGTERM, then SIGKILL after 5 s); remove temporary files.

        Idempotent. A server that did not exit cleanly is reported in its log.
        """
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


_CALM_RT = [sys.executable, "-m", "calm_rt"]


def _load_movie(
    movie: Path, behavior: Path, shifts: Path, rois: Path, names: tuple[str, ...], fps: float
) -> DemoMovie:
    from calm_rt.extract import load_rois

    return DemoMovie(
        movie=np.load(movie, mmap_mode="r"),
        footprints=load_rois(rois),
        behavior=np.load(behavior),
        behavior_names=names,
        fps=fps,
        shifts=np.load(shifts),
    )


def run_demo(
    seconds: float = 20.0,
    neurons: int = 256,
    size: int = 512,
    fps: float = 30.0,
    checkpoint: Path | None = None,
    workdir: Path = Path("demo-out"),
    log: Callable[[str], None] = print,
    threads: int | None = None,
    calibrate_s: float = 0.0,
    device: str = "auto",
    priority: str = "normal",
    record: Path | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Run scope -> server -> rig on loopback for ``seconds``; return the summary.

    ``threads``: torch threads of the server (default: all cores but one);
    ``device``: where the server's model runs (``auto``, ``cpu`` or ``cuda``);
    ``priority``: the server's scheduling (``calm-rt serve --priority``);
    ``record``: the server records the session there (``calm-rt serve --record``);
    ``dtype``: the server's transformer precision (``calm-rt serve --dtype``).
    Long runs loop a 20 s movie: rendering and holding hours of 512x512
    frames buys nothing here.
    """
    frames = max(1, int(round(seconds * fps)))
    demo = Demo(
        neurons=neurons, size=size, frames=min(frames, 600), fps=fps, checkpoint=checkpoint,
        calibrate_s=calibrate_s, server_threads=threads, stream_frames=frames, workdir=workdir,
        device=device, priority=priority, record=record, dtype=dtype,
    )  # fmt: skip
    log(f"rendering (or reusing) a simulated {size}x{size} movie of {neurons} neurons...")
    demo.start(stream=False)
    assert demo.endpoints is not None
    listen_json = workdir / "listen.json"
    listen_json.unlink(missing_ok=True)
    listener = subprocess.Popen(
        [*_CALM_RT, "listen", "--connect", demo.endpoints.publish, "--topics", "forecast", "behavior",
         "--quiet", "--frames", str(frames), "--seconds", str(seconds + 60), "--json", str(listen_json),
         "--priority", priority],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while (
            demo.status().get("subscriptions", 0) < 1
        ):  # no frame may go out before the rig listens
            if time.monotonic() > deadline or listener.poll() is not None:
                raise CalmError("the rig listener did not subscribe within 30 s")
            time.sleep(0.05)
        log(
            f"streaming {frames} frames at {fps:g} Hz: scope -> server -> rig {demo.endpoints.publish}"
        )
        demo.stream()
        assert demo.scope is not None
        if demo.scope.wait(timeout=seconds + 120) != 0:
            raise CalmError(f"the mock scope failed: {(workdir / 'scope.log').read_text()[-500:]}")
        listener.wait(timeout=60)
        status = demo.status()
    finally:
        if listener.poll() is None:
            listener.terminate()
            listener.wait(timeout=5)
        demo.stop()
    sent = json.loads((workdir / "scope.json").read_text())
    heard = json.loads(listen_json.read_text()) if listen_json.exists() else {}
    forecast = heard.get("forecast", {})
    received = int(forecast.get("received", 0))
    return {
        "frames_sent": int(sent["frames_sent"]),
        "predictions": received,
        # What the rig never heard, from the sequence numbers it did hear.
        "dropped": _missing_at_rig(forecast, int(sent["frames_sent"])),
        "p50_ms": forecast.get("p50_ms"),
        "p99_ms": forecast.get("p99_ms"),
        "neurons": int(status.get("neurons") or 0),
        "fps": fps,
        "frame_size": [size, size],
        "max_ms": forecast.get("max_ms"),
        "in_order": forecast.get("in_order"),
        "server": {k: status[k] for k in _SERVER_KEYS},
        "scope_pacing_p99_ms": sent.get("pacing_p99_ms"),
        "machine": machine(),
        **({"recording": str(demo.record)} if demo.record is not None else {}),
        "latencies_ms": forecast.get("latencies_ms", []),
    }


_SERVER_KEYS = (
    "received", "answered", "rejected", "skipped", "lost", "latency_p50_ms", "latency_p99_ms",
    "stages_ms",
)  # fmt: skip


def _missing_at_rig(forecast: dict[str, Any], sent: int) -> int:
    """Frames the scope sent (seq 0 .. sent-1) that the rig never heard an answer to."""
    if not forecast.get("received"):
        return sent
    first, last = int(forecast["first_seq"]), int(forecast["last_seq"])
    return first + int(forecast.get("gaps", 0)) + (sent - 1 - last)


def machine() -> str:
    """The CPU model and core count, for reports."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"
