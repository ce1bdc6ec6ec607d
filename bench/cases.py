"""The benchmark cases. Each returns a list of result rows (dicts with a ``name``)."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

Log = Callable[[str], None]


def environment(device: str | None) -> dict[str, Any]:
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(
                    line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
                )
        except (OSError, StopIteration):
            pass
        name = f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import numba

    return {
        "device": f"{kind}: {name}",
        "device_kind": kind,
        "torch": torch.__version__,
        "extra": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "numba": numba.__version__,
            "triton": triton_version,
        },
    }


def timed(
    fn: Callable[[], Any], warmup: int, iters: int, sync: Callable[[], None] | None = None
) -> np.ndarray:
    """Milliseconds per call of ``fn`` after an untimed warm-up."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    out = np.empty(iters)
    for i in range(iters):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        out[i] = (time.perf_counter() - t0) * 1e3
    return out


def stats(ms: np.ndarray) -> dict[str, float]:
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p90_ms": round(float(np.percentile(ms, 90)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "max_ms": round(float(ms.max()), 4),
        "jitter_ms": round(float(ms.std()), 4),
        "iters": int(ms.size),
    }


def _model(checkpoint: Path | None, device: str):
    from calm_rt.model import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    return model.to(device).eval()


# ---------------------------------------------------------------------------


def case_extract(quick: bool, checkpoint: Path | None, device: str, log: Log) -> list[dict]:
    """Frame to traces: rigid motion correction, then the sparse ROI + neuropil projection.

    Frames are uint16 images of disc-shaped cells on a background with shot
    noise, each moved by a random sub-pixel shift of up to 3 px, so phase
    correlation does its real work. The reference is built (untimed) first,
    so the rows are the steady state. ``extract-static`` rows are the same
    without motion correction, for the breakdown.
    """
    import itertools
    from collections.abc import Iterator

    from scipy import ndimage, sparse

    from calm_rt.extract import MotionConfig, RoiExtractor
    from calm_rt.segment import Footprints

    rows = []
    rng = np.random.default_rng(0)
    configs = (
        [(512, 256), (512, 500)] if quick else [(256, 128), (512, 256), (512, 500), (1024, 1000)]
    )
    iters = 200 if quick else 1000
    for size, rois in configs:
        centers = rng.uniform(10, size - 10, size=(rois, 2))
        dy, dx = np.mgrid[-5:6, -5:6]
        disc = dy**2 + dx**2 < 25
        rows_idx, cols = [], []
        for i, (cy, cx) in enumerate(centers.astype(int)):
            flat = (cy + dy[disc]) * size + (cx + dx[disc])
            rows_idx.append(np.full(flat.size, i))
            cols.append(flat)
        weights = sparse.csr_matrix(
            (np.ones(sum(c.size for c in cols), np.float32),
             (np.concatenate(rows_idx), np.concatenate(cols))), shape=(rois, size * size),
        )  # fmt: skip
        fp = Footprints(weights, (size, size), tuple(str(i) for i in range(rois)))
        scene = 200.0 + 300.0 * np.asarray(weights.sum(axis=0)).reshape(size, size)
        scene = ndimage.gaussian_filter(scene, 1.0)
        frames = [
            rng.poisson(ndimage.shift(scene, rng.uniform(-3, 3, 2), order=1)).astype(np.uint16)
            for _ in range(16)
        ]
        for motion in (True, False):
            ex = RoiExtractor(fp, motion=MotionConfig() if motion else False)
            cycle = itertools.cycle(frames)

            def step(ex: RoiExtractor = ex, cycle: Iterator[np.ndarray] = cycle) -> None:
                ex.extract(next(cycle))

            # Warm-up past the reference's 50 frames: the timed frames are the steady state.
            ms = timed(step, 80, iters)
            label = "extract" if motion else "extract-static"
            rows.append({"name": f"{label} {size}x{size} {rois} ROIs", "case": label, "frame": size,
                         "rois": rois, "motion": motion, "support_pixels": ex.support_pixels,
                         **stats(ms)})  # fmt: skip
            log(f"  {label} {size}x{size}, {rois} ROIs: p50 {rows[-1]['p50_ms']:.3f} ms")
    return rows


def case_tokenizer(quick: bool, checkpoint: Path | None, device: str, log: Log) -> list[dict]:
    """Tokenizer with codebook lookup for one frame of N neurons (exact path)."""
    model = _model(checkpoint, device)
    rows = []
    sync = torch.cuda.synchronize if device == "cuda" else None
    for n in [256] if quick else [64, 256, 1024, 4096]:
        w = torch.randn(n, model.config.patch, device=device)
        with torch.inference_mode():
            ms = timed(
                lambda w=w: model.tokenizer.tokenize_windows(w), 10, 100 if quick else 300, sync
            )
        rows.append(
            {"name": f"tokenizer {n} neurons", "case": "tokenizer", "neurons": n, **stats(ms)}
        )
        log(f"  tokenizer, {n} neurons: p50 {rows[-1]['p50_ms']:.3f} ms")
    return rows


def _engine_rows(
    model: Any, neurons: list[int], device: str, iters: int, label: str, log: Log
) -> list[dict]:
    from calm_rt.engine import EngineConfig, StreamingEngine

    rows = []
    for n in neurons:
        engine = StreamingEngine(model, EngineConfig(n_neurons=n, fps=30.0, device=device))
        frames = (300 + 20 * np.random.default_rng(n).standard_normal((n, 256))).astype(np.float32)

        def step(engine: StreamingEngine = engine, frames: np.ndarray = frames) -> None:
            t = engine.frame
            engine.step(frames[:, t % 256], seq=t)

        # Warm-up fills the caches past the window, so the timed steps are the steady state.
        ms = timed(step, 4 * model.config.context_frames, iters)
        rows.append({"name": f"{label} {n} neurons", "case": label, "neurons": n,
                     "context_tokens": model.config.dat.context_tokens, **stats(ms)})  # fmt: skip
        log(
            f"  {label}, {n} neurons: p50 {rows[-1]['p50_ms']:.3f} ms, p99 {rows[-1]['p99_ms']:.3f} ms"
        )
    return rows


def case_engine(quick: bool, checkpoint: Path | None, device: str, log: Log) -> list[dict]:
    """Incremental engine step (preprocess + tokenizer + DAT step + heads) against neuron count."""
    model = _model(checkpoint, device)
    if quick:
        neurons = [64, 256]
    else:
        neurons = [64, 256, 1024, 4096] if device == "cpu" else [64, 256, 1024, 4096, 16384]
    return _engine_rows(model, neurons, device, 200 if quick else 500, "engine step", log)


def case_context(quick: bool, checkpoint: Path | None, device: str, log: Log) -> list[dict]:
    """Engine step against the temporal context (untrained weights: latency only)."""
    from calm_rt.model import CalM

    base = _model(checkpoint, device).config
    rows = []
    for c in [12, 48] if quick else [6, 12, 24, 48, 96]:
        torch.manual_seed(0)
        model = CalM(replace(base, dat=replace(base.dat, context_tokens=c))).to(device).eval()
        for row in _engine_rows(
            model, [256], device, 100 if quick else 300, "engine step context", log
        ):
            row["name"] = f"engine step 256 neurons, context {c} tokens ({c * base.patch} frames)"
            rows.append(row)
    return rows


def case_recompute(quick: bool, checkpoint: Path | None, device: str, log: Log) -> list[dict]:
    """The alternative: the same model in eager PyTorch recomputing its whole context window every frame."""
    model = _model(checkpoint, device)
    rows = []
    sync = torch.cuda.synchronize if device == "cuda" else None
    ctx = model.config.context_frames
    for n in [256] if quick else [64, 256, 1024]:
        window = torch.randn(1, n, ctx, device=device)
        with torch.inference_mode():
            ms = timed(
                lambda window=window: model.forecast_windows(window), 5, 50 if quick else 200, sync
            )
        rows.append({"name": f"recompute whole window {n} neurons", "case": "recompute", "neurons": n,
                     "context_frames": ctx, **stats(ms)})  # fmt: skip
        log(f"  recompute whole window, {n} neurons: p50 {rows[-1]['p50_ms']:.3f} ms")
    return rows


def case_kernels(quick: bool, checkpoint: Path | None, device: str, log: Log) -> list[dict]:
    """Each Triton kernel against its torch reference (GPU only)."""
    if device != "cuda":
        log("  kernels: skipped (needs a CUDA GPU; on CPU the references are what runs)")
        return [{"name": "kernels", "case": "kernels", "skipped": "needs a CUDA GPU"}]
    from bench.kernels import kernel_rows

    return kernel_rows(quick, log)


E2E = {"neurons": 256, "size": 512, "seconds": None}


def case_e2e(quick: bool, checkpoint: Path | None, device: str, log: Log) -> list[dict]:
    """Scope (process) -> loopback ZeroMQ -> server (extract + engine) -> rig (process)."""
    from calm_rt.demo import run_demo

    rows = []
    neurons, size = E2E["neurons"], E2E["size"]
    plans = [(30.0, 10.0)] if quick else [(30.0, 100.0), (60.0, 20.0), (90.0, 20.0), (120.0, 20.0)]
    if E2E["seconds"] is not None:
        plans = [(fps, E2E["seconds"]) for fps, _ in plans]
    workdir = Path(tempfile.gettempdir()) / "calm-rt-bench"
    for fps, seconds in plans:
        summary = run_demo(seconds=seconds, neurons=neurons, size=size, fps=fps, checkpoint=checkpoint,
                           workdir=workdir, log=log)  # fmt: skip
        row = {
            "name": "e2e" if fps == 30.0 else f"e2e {fps:g} Hz",
            "case": "e2e",
            "neurons": neurons,
            "fps": fps,
            "frame": size,
            "frames": summary["frames_sent"],
            "predictions": summary["predictions"],
            "dropped": summary["dropped"],
            "p50_ms": summary["p50_ms"],
            "p99_ms": summary["p99_ms"],
            "max_ms": summary["max_ms"],
            "server_p50_ms": summary["server"]["latency_p50_ms"],
            "server_p99_ms": summary["server"]["latency_p99_ms"],
            "samples_ms": summary.get("latencies_ms", []),
        }
        rows.append(row)
        log(f"  e2e {fps:g} Hz: {row['predictions']}/{row['frames']} answered, p50 {row['p50_ms']:.2f} ms, "
            f"p99 {row['p99_ms']:.2f} ms, dropped {row['dropped']}")  # fmt: skip
        if row["dropped"]:
            break  # the highest sustained rate is the previous one
    return rows


CASES: dict[str, Callable[..., list[dict]]] = {
    "extract": case_extract,
    "tokenizer": case_tokenizer,
    "engine": case_engine,
    "context": case_context,
    "recompute": case_recompute,
    "kernels": case_kernels,
    "e2e": case_e2e,
}


def run_cases(
    names: list[str] | None, quick: bool, checkpoint: Path | None, device: str, log: Log
) -> list[dict]:
    rows: list[dict] = []
    for name in names or list(CASES):
        log(f"{name}: {CASES[name].__doc__.splitlines()[0]}")
        rows.extend(CASES[name](quick, checkpoint, device, log))
    return rows
