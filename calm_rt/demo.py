"""``calm-rt demo``: the whole loop on loopback, headless.

A simulated microscope (its own process, streaming a rendered uint16 movie),
the server (in this process: extraction, engine, publishing) and a rig
listener (its own process) run for the requested time; the summary is what
a rig builder needs: frames sent, predictions received, frames dropped, and
frame-in to prediction-out latency as the rig measured it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from calm_rt.errors import CalmError
from calm_rt.service import Server, ServiceConfig

__all__ = ["run_demo"]


def _free_endpoint() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _movie(
    workdir: Path, neurons: int, size: int, frames: int, fps: float, log: Callable[[str], None]
) -> tuple[Path, Path]:
    """Render (or reuse) the simulated movie and its ROI footprints."""
    from calm_rt.mockscope import simulated_movie

    stem = workdir / f"movie_{neurons}n_{size}px_{frames}f"
    movie_path, rois_path = stem.with_suffix(".npy"), stem.with_name(stem.name + "_rois.npz")
    if not (movie_path.exists() and rois_path.exists()):
        log(f"rendering a simulated {size}x{size} movie of {neurons} neurons, {frames} frames...")
        source = simulated_movie(neurons, size, frames, fps)
        movie = np.stack([source.get(i)["image"] for i in range(source.n_frames)])
        np.save(movie_path, movie)
        np.savez(rois_path, footprints=source.footprints)
    return movie_path, rois_path


def run_demo(
    seconds: float = 20.0,
    neurons: int = 256,
    size: int = 512,
    fps: float = 30.0,
    checkpoint: Path | None = None,
    workdir: Path = Path("demo-out"),
    log: Callable[[str], None] = print,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run scope -> server -> rig on loopback for ``seconds``; return the summary.

    ``threads``: torch threads of the server (default: all cores but one).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    frames = max(1, int(round(seconds * fps)))
    # Long runs loop a 20 s movie: rendering and holding hours of 512x512 frames buys nothing here.
    movie, rois = _movie(workdir, neurons, size, min(frames, 600), fps, log)
    scope_ep, publish_ep, control_ep = _free_endpoint(), _free_endpoint(), _free_endpoint()
    config = ServiceConfig(
        ingest=scope_ep,
        publish=publish_ep,
        control=control_ep,
        checkpoint=checkpoint,
        fps=fps,
        rois=rois,
        torch_threads=threads,
    )
    server = Server(config).start()
    py = [sys.executable, "-m", "calm_rt"]
    listen_json, scope_json = workdir / "listen.json", workdir / "scope.json"
    listener = subprocess.Popen(
        [*py, "listen", "--connect", publish_ep, "--topics", "forecast", "behavior", "--quiet",
         "--frames", str(frames), "--seconds", str(seconds + 30), "--json", str(listen_json)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while server.subscriptions < 1:  # no frame may go out before the rig listens
            if time.monotonic() > deadline or listener.poll() is not None:
                raise CalmError("the rig listener did not subscribe within 30 s")
            time.sleep(0.05)
        log(
            f"streaming {frames} frames at {fps:g} Hz: scope {scope_ep} -> server -> rig {publish_ep}"
        )
        scope = subprocess.run(
            [*py, "mock-scope", "--endpoint", scope_ep, "--source", str(movie), "--fps", str(fps),
             "--frames", str(frames), "--loop", "--json", str(scope_json)],
            capture_output=True, text=True, timeout=seconds + 120,
        )  # fmt: skip
        if scope.returncode != 0:
            raise CalmError(f"the mock scope failed: {scope.stderr.strip()[-500:]}")
        listener.wait(timeout=30)
    finally:
        if listener.poll() is None:
            listener.terminate()
            listener.wait(timeout=5)
        status = server.status()
        server.stop("demo finished")
    sent = json.loads(scope_json.read_text())
    heard = json.loads(listen_json.read_text()) if listen_json.exists() else {}
    forecast = heard.get("forecast", {})
    received = int(forecast.get("received", 0))
    return {
        "frames_sent": int(sent["frames_sent"]),
        "predictions": received,
        "dropped": int(sent["frames_sent"]) - received,
        "p50_ms": forecast.get("p50_ms"),
        "p99_ms": forecast.get("p99_ms"),
        "neurons": neurons,
        "fps": fps,
        "frame_size": [size, size],
        "max_ms": forecast.get("max_ms"),
        "in_order": forecast.get("in_order"),
        "server": {
            k: status[k]
            for k in (
                "received",
                "answered",
                "rejected",
                "skipped",
                "lost",
                "latency_p50_ms",
                "latency_p99_ms",
            )
        },
        "scope_pacing_p99_ms": sent.get("pacing_p99_ms"),
        "machine": _machine(),
        "latencies_ms": forecast.get("latencies_ms", []),
    }


def _machine() -> str:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"
