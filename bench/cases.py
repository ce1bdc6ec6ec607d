"""The benchmark cases. Each returns a list of result rows (dicts with a ``name``)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.timing import Log, stats, timed


@dataclass(frozen=True)
class BenchConfig:
    """What a run measures: the reduced set or the full one, on which model and device."""

    quick: bool = False
    checkpoint: Path | None = None
    device: str = "cpu"
    e2e_neurons: int = 256
    e2e_size: int = 512
    e2e_seconds: float | None = None  # override each end-to-end run's length
    neighbour: bool = False  # also run the 30 Hz end-to-end case beside a CPU-bound process


def _model(checkpoint: Path | None, device: str) -> Any:
    from calm_rt.model import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    return model.to(device).eval()


# ---------------------------------------------------------------------------


def case_extract(cfg: BenchConfig, log: Log) -> list[dict]:
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

    from calm_rt.extract import Footprints, MotionConfig, RoiExtractor

    rows = []
    rng = np.random.default_rng(0)
    configs = (
        [(512, 256), (512, 500)]
        if cfg.quick
        else [(256, 128), (512, 256), (512, 500), (1024, 1000)]
    )
    iters = 200 if cfg.quick else 1000
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


def case_tokenizer(cfg: BenchConfig, log: Log) -> list[dict]:
    """Tokenizer with codebook lookup for one frame of N neurons (exact path)."""
    model = _model(cfg.checkpoint, cfg.device)
    rows = []
    sync = torch.cuda.synchronize if cfg.device == "cuda" else None
    for n in [256] if cfg.quick else [64, 256, 1024, 4096]:
        w = torch.randn(n, model.config.patch, device=cfg.device)
        with torch.inference_mode():
            ms = timed(
                lambda w=w: model.tokenizer.tokenize_windows(w), 10, 100 if cfg.quick else 300, sync
            )
        rows.append(
            {"name": f"tokenizer {n} neurons", "case": "tokenizer", "neurons": n, **stats(ms)}
        )
        log(f"  tokenizer, {n} neurons: p50 {rows[-1]['p50_ms']:.3f} ms")
    return rows


def _engine_rows(
    model: Any, neurons: list[int], device: str, iters: int, label: str, log: Log
) -> list[dict]:
    from calm_rt.live.engine import EngineConfig, StreamingEngine

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


def case_engine(cfg: BenchConfig, log: Log) -> list[dict]:
    """Incremental engine step (preprocess + tokenizer + DAT step + heads) against neuron count."""
    model = _model(cfg.checkpoint, cfg.device)
    if cfg.quick:
        neurons = [64, 256]
    else:
        neurons = [64, 256, 1024, 4096] if cfg.device == "cpu" else [64, 256, 1024, 4096, 16384]
    iters = 200 if cfg.quick else 500
    rows = _engine_rows(model, neurons, cfg.device, iters, "engine step", log)
    if cfg.device == "cpu":
        # The server's compute thread runs torch with fewer threads than a bare process:
        # this row is the step the e2e case's server actually runs.
        from calm_rt.serve.config import default_torch_threads

        server_threads, before = default_torch_threads(), torch.get_num_threads()
        torch.set_num_threads(server_threads)
        try:
            for row in _engine_rows(model, [256], cfg.device, iters, "engine step", log):
                row.update(name=f"engine step 256 neurons, {server_threads} thread(s) as served",
                           threads=server_threads, server_threads=True)  # fmt: skip
                rows.append(row)
            rows += _against_tokens_only_rows(model, 256, iters, server_threads, log)
            if not cfg.quick:
                rows += _compiled_against_eager_rows(model, 256, iters, server_threads, log)
                rows.append(_calibrated_engine_row(model, 256, cfg.device, iters, log))
                rows[-1]["threads"] = server_threads
        finally:
            torch.set_num_threads(before)
    return rows


def _alternate(
    engines: dict[str, Any], n: int, iters: int, warmup: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Step ``engines`` alternately on the same frames; per engine its step and DAT times (ms).

    Alternating frame by frame (and which goes first) puts all under the same
    load, so their ratio holds on a noisy shared machine where two
    back-to-back runs differ by more than what is compared.
    """
    frames = (300 + 20 * np.random.default_rng(n).standard_normal((n, 256))).astype(np.float32)
    names = list(engines)
    ms: dict[str, list[float]] = {k: [] for k in names}
    dat_ms: dict[str, list[float]] = {k: [] for k in names}
    for t in range(warmup + iters):
        for name in names[t % len(names) :] + names[: t % len(names)]:
            t0 = time.perf_counter()
            pred = engines[name].step(frames[:, t % 256], seq=t)
            if t >= warmup:
                ms[name].append((time.perf_counter() - t0) * 1e3)
                dat_ms[name].append(pred.timings_ms["dat"])
    return {k: (np.asarray(ms[k]), np.asarray(dat_ms[k])) for k in names}


def _compiled_against_eager_rows(
    model: Any, n: int, iters: int, threads: int, log: Log
) -> list[dict]:
    """``EngineConfig.compile`` against the eager step, stepped alternately on the same frames."""
    from calm_rt.live.engine import EngineConfig, StreamingEngine

    engines = {
        what: StreamingEngine(
            model, EngineConfig(n_neurons=n, fps=30.0, compile=what == "compiled")
        )
        for what in ("eager", "compiled")
    }
    times = _alternate(engines, n, iters, 4 * model.config.context_frames)
    rows = []
    for what, (ms, dat_ms) in times.items():
        row = {"name": f"engine step {n} neurons, {what}, alternating, {threads} thread(s)",
               "case": "engine step compile", "neurons": n, "threads": threads,
               "compiled": what == "compiled", "dat_p50_ms": round(float(np.median(dat_ms)), 4),
               **stats(ms)}  # fmt: skip
        if what == "compiled":
            row["compile_s"] = round(engines[what].compile_seconds, 2)
            row["p50_vs_eager"] = round(row["p50_ms"] / rows[0]["p50_ms"], 3)
        rows.append(row)
    log(
        f"  engine step {n} neurons compiled / eager, alternating: p50 {rows[1]['p50_ms']:.3f} / "
        f"{rows[0]['p50_ms']:.3f} ms, DAT {rows[1]['dat_p50_ms']:.3f} / {rows[0]['dat_p50_ms']:.3f} "
        f"ms (compiled in {rows[1]['compile_s']:.1f} s)"
    )
    return rows


def _against_tokens_only_rows(model: Any, n: int, iters: int, threads: int, log: Log) -> list[dict]:
    """The model's step against a tokens-only model of the earlier checkpoints' shape.

    The continuous path (raw window into the transformer, the continuous
    head) is what the current checkpoint adds; the ``small-tokens`` preset is
    the checkpoints before it (weights do not change the time: random ones).
    """
    from calm_rt.live.engine import EngineConfig, StreamingEngine
    from calm_rt.model import PRESETS, CalM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokens_only = CalM(PRESETS["small-tokens"]).eval()
    engines = {
        what: StreamingEngine(m, EngineConfig(n_neurons=n, fps=30.0))
        for what, m in (("this checkpoint", model), ("tokens only", tokens_only))
    }
    times = _alternate(engines, n, iters, 4 * model.config.context_frames)
    rows = []
    for what, (ms, dat_ms) in times.items():
        rows.append({"name": f"engine step {n} neurons, {what}, alternating, {threads} thread(s)",
                     "case": "engine step vs tokens only", "neurons": n, "threads": threads,
                     "model": what, "dat_p50_ms": round(float(np.median(dat_ms)), 4), **stats(ms)})  # fmt: skip
    rows[0]["p50_vs_tokens_only"] = round(rows[0]["p50_ms"] / rows[1]["p50_ms"], 3)
    log(
        f"  engine step {n} neurons, this checkpoint / tokens only, alternating: p50 "
        f"{rows[0]['p50_ms']:.3f} / {rows[1]['p50_ms']:.3f} ms ({rows[0]['p50_vs_tokens_only']:.2f}x)"
    )
    return rows


def _calibrated_engine_row(model: Any, n: int, device: str, iters: int, log: Log) -> dict:
    """The engine step once a session's forecasts are calibrated (ridge + continuous head).

    Calibrated live on 60 s of a simulated session at 30 Hz (the fit is timed
    too, in the stepping thread); the timed steps then run the calibration's
    per-frame forecast on top of the step above.
    """
    from calm_rt.data import SimConfig, make_animal, simulate_session
    from calm_rt.live.engine import EngineConfig, StreamingEngine

    sim = SimConfig(neurons=n, frames=2400, seed=3)
    session = simulate_session(sim, make_animal(sim, 0), 0)[0]
    engine = StreamingEngine(
        model, EngineConfig(n_neurons=n, fps=30.0, device=device, background_calibration=False)
    )
    engine.start_calibration(seconds=60.0)
    frames = session.traces

    def step(engine: StreamingEngine = engine) -> None:
        t = engine.frame
        engine.step(frames[:, t % frames.shape[1]], seq=t)

    for _ in range(1799):
        step()
    t0 = time.perf_counter()
    step()  # completes the calibration: the fit runs within this frame here
    fit_s = time.perf_counter() - t0
    cal = engine.forecast_calibration
    if cal is None:
        raise RuntimeError("the bench's forecast calibration did not install")
    ms = timed(step, 20, iters)
    row = {"name": f"engine step {n} neurons, forecasts calibrated", "case": "engine step calibrated",
           "neurons": n, "calibrated": True, "head_weight": cal.head_weight,
           "calibration_fit_s": fit_s, **stats(ms)}  # fmt: skip
    log(
        f"  engine step calibrated, {n} neurons: p50 {row['p50_ms']:.3f} ms "
        f"(head weight {cal.head_weight}; fit {fit_s:.1f} s)"
    )
    return row


def case_context(cfg: BenchConfig, log: Log) -> list[dict]:
    """Engine step against the temporal context (untrained weights: latency only)."""
    from calm_rt.model import CalM

    base = _model(cfg.checkpoint, cfg.device).config
    rows = []
    for c in [12, 48] if cfg.quick else [6, 12, 24, 48, 96]:
        torch.manual_seed(0)
        model = CalM(replace(base, dat=replace(base.dat, context_tokens=c))).to(cfg.device).eval()
        for row in _engine_rows(
            model, [256], cfg.device, 100 if cfg.quick else 300, "engine step context", log
        ):
            row["name"] = f"engine step 256 neurons, context {c} tokens ({c * base.patch} frames)"
            rows.append(row)
    return rows


def case_recompute(cfg: BenchConfig, log: Log) -> list[dict]:
    """The alternative: the same model in eager PyTorch recomputing its whole context window every frame."""
    model = _model(cfg.checkpoint, cfg.device)
    rows = []
    sync = torch.cuda.synchronize if cfg.device == "cuda" else None
    ctx = model.config.context_frames
    for n in [256] if cfg.quick else [64, 256, 1024]:
        window = torch.randn(1, n, ctx, device=cfg.device)
        with torch.inference_mode():
            ms = timed(
                lambda window=window: model.forecast_windows(window),
                5,
                50 if cfg.quick else 200,
                sync,
            )
        rows.append({"name": f"recompute whole window {n} neurons", "case": "recompute", "neurons": n,
                     "context_frames": ctx, **stats(ms)})  # fmt: skip
        log(f"  recompute whole window, {n} neurons: p50 {rows[-1]['p50_ms']:.3f} ms")
    return rows


def case_kernels(cfg: BenchConfig, log: Log) -> list[dict]:
    """Each Triton kernel against its torch reference (GPU only)."""
    if cfg.device != "cuda":
        log("  kernels: skipped (needs a CUDA GPU; on CPU the references are what runs)")
        return [{"name": "kernels", "case": "kernels", "skipped": "needs a CUDA GPU"}]
    from bench.kernels import kernel_rows  # imports the Triton kernels: only on a GPU

    return kernel_rows(cfg.quick, log)


@dataclass(frozen=True)
class _E2ePlan:
    fps: float
    seconds: float
    neurons: int
    neighbour: bool = False
    priority: str = "normal"  # the server's (calm-rt serve --priority)
    threads: int | None = None  # the server's torch threads (None: its default)
    base_neurons: int = 256  # the run's own neuron count, named only when a row differs
    sweep: bool = False  # part of the rate sweep, which stops at the first rate that drops

    @property
    def name(self) -> str:
        extra = [f"{self.neurons} neurons"] if self.neurons != self.base_neurons else []
        extra += [f"{self.fps:g} Hz"] if self.fps != 30.0 else []
        extra += [f"{self.threads} torch threads"] if self.threads else []
        extra += ["beside a CPU-bound process"] if self.neighbour else []
        # Scope, server and rig all claim the CPU: the whole loop, as docs/engine.md advises.
        extra += [f"loop at {self.priority} priority"] if self.priority != "normal" else []
        return " ".join(["e2e", *extra]) if extra else "e2e"


def _e2e_plans(cfg: BenchConfig) -> list[_E2ePlan]:
    n = cfg.e2e_neurons
    seconds = 10.0 if cfg.quick else 100.0
    plans = [_E2ePlan(30.0, seconds, n)]
    if cfg.neighbour:  # as installed, then with the priority docs/engine.md recommends
        plans += [_E2ePlan(30.0, seconds, n, neighbour=True),
                  _E2ePlan(30.0, seconds, n, neighbour=True, priority="realtime")]  # fmt: skip
    if not cfg.quick:
        plans += [_E2ePlan(30.0, seconds, m) for m in (512, 1024) if m != n]
        # The neural attention is quadratic in neurons: 1,024 may need both cores' threads.
        plans += [_E2ePlan(30.0, seconds, 1024, threads=2)] if (os.cpu_count() or 1) >= 2 else []
        plans += [_E2ePlan(fps, 20.0, n, sweep=True) for fps in (60.0, 90.0, 120.0)]
    plans = [replace(p, base_neurons=n) for p in plans]
    if cfg.e2e_seconds is not None:
        plans = [replace(p, seconds=cfg.e2e_seconds) for p in plans]
    return plans


class _Neighbour:
    """One CPU-bound process beside the run (what the scope software or a viewer costs)."""

    def __enter__(self) -> _Neighbour:
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def _priority_refused(priority: str) -> str | None:
    """Why the server could not run at ``priority`` here (None: it can)."""
    from calm_rt.errors import ConfigError
    from calm_rt.serve.priority import claim_cpu

    try:
        claim_cpu(priority)()  # claim and give back at once: the server claims its own
    except ConfigError as exc:
        return str(exc).split(":")[0]
    return None


def case_e2e(cfg: BenchConfig, log: Log) -> list[dict]:
    """Scope (process) -> loopback ZeroMQ -> server (extract + engine) -> rig (process)."""
    from contextlib import nullcontext

    from calm_rt.serve.demo import run_demo

    rows = []
    size = cfg.e2e_size
    workdir = Path(tempfile.gettempdir()) / "calm-rt-bench"
    for plan in _e2e_plans(cfg):
        fps, neurons = plan.fps, plan.neurons
        refused = _priority_refused(plan.priority)
        if refused:
            rows.append({"name": plan.name, "case": "e2e", "skipped": refused})
            log(f"  {plan.name}: skipped: {refused}")
            continue
        with _Neighbour() if plan.neighbour else nullcontext():
            summary = run_demo(seconds=plan.seconds, neurons=neurons, size=size, fps=fps,
                               checkpoint=cfg.checkpoint, workdir=workdir, log=log,
                               device=cfg.device, priority=plan.priority,
                               threads=plan.threads)  # fmt: skip
        row = {
            "name": plan.name,
            "case": "e2e",
            "neurons": neurons,
            "neighbour": plan.neighbour,
            "priority": plan.priority,
            "threads": plan.threads,
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
            **{f"server_{k}": summary["server"][k] for k in ("received", "answered", "skipped")},
            "stages_ms": summary["server"].get("stages_ms", {}),
            "samples_ms": summary.get("latencies_ms", []),
        }
        rows.append(row)
        log(f"  {plan.name}: {row['predictions']}/{row['frames']} answered, p50 {row['p50_ms']:.2f} ms, "
            f"p99 {row['p99_ms']:.2f} ms, dropped {row['dropped']}")  # fmt: skip
        if row["dropped"] and plan.sweep:
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


def run_cases(names: list[str] | None, cfg: BenchConfig, log: Log) -> list[dict]:
    """Run the cases in order; a case that raises becomes one row with its ``error``.

    A failing case (a driver error on a GPU, say) must not cost the figures
    of the others: the run goes on and the JSON is still written.
    """
    import traceback

    rows: list[dict] = []
    for name in names or list(CASES):
        log(f"{name}: {CASES[name].__doc__.splitlines()[0]}")
        try:
            rows.extend(CASES[name](cfg, log))
        except Exception as exc:  # reported in the JSON and the exit status, never hidden
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log(f"  {name}: FAILED: {error}")
            rows.append({"name": name, "case": name, "skipped": f"failed: {error}", "error": error,
                         "traceback": traceback.format_exc()[-4000:]})  # fmt: skip
    return rows
