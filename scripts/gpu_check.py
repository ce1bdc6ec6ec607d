"""``make gpu-check``: what calm-rt does on this machine's CUDA GPU, in one JSON.

    python scripts/gpu_check.py --json gpu-check.json

Without a usable CUDA GPU it prints one line saying why and exits 2. With
one it runs, each step timed and its outcome kept (a failing step does not
stop the others; the exit status is 1 if any failed):

1. the kernel tests compiled, not interpreted (``TRITON_INTERPRET=0``);
2. exactness on CUDA: the streaming engine on the GPU against the offline
   model on the CPU over 700 frames (tokens equal, forecasts within float32
   rounding, as tests/test_engine.py holds on the CPU);
3. half precision: the engine in bfloat16 and float16 against float32 on the
   GPU (shipped checkpoint, 256 neurons: tokens equal, forecasts within the
   bounds tests/test_engine.py holds on the CPU), each one's step time;
4. ``python -m bench --quick --device cuda``;
5. an end-to-end run at 1,024 neurons (``python -m bench --cases e2e``);

and writes the card, driver, torch, triton and every figure to ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check (None when it can)."""
    try:
        import torch
    except ImportError as exc:
        return f"torch cannot be imported ({exc}); run `make install` first"
    if not torch.cuda.is_available():
        build = "a CPU-only build" if not torch.version.cuda else f"CUDA {torch.version.cuda}"
        return (
            f"no CUDA GPU is usable here (torch {torch.__version__}, {build}): "
            "run `make gpu-check` on a machine with an NVIDIA GPU and a CUDA build of torch"
        )
    return None


def _environment() -> dict[str, Any]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError as exc:
        triton_version = f"not importable: {exc}"
    driver = None
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip().splitlines()[0]  # fmt: skip
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    props = torch.cuda.get_device_properties(0)
    return {
        "card": torch.cuda.get_device_name(0),
        "capability": f"sm_{props.major}{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
    }


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> dict[str, Any]:
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    return {
        "command": " ".join(cmd),
        "ok": proc.returncode == 0,
        "returncode": proc.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "tail": (proc.stdout + proc.stderr)[-3000:],
    }


def exactness(neurons: int = 24, frames: int = 700) -> dict[str, Any]:
    """The engine on CUDA against the offline model on the CPU (the tiny preset, a simulation)."""
    import numpy as np
    import torch

    from calm_rt.data import (
        BEHAVIOR_NAMES,
        SimConfig,
        make_animal,
        preprocess_traces,
        simulate_session,
    )
    from calm_rt.live.engine import EngineConfig, StreamingEngine
    from calm_rt.model import PRESETS, CalM

    torch.manual_seed(0)
    cpu_model = CalM(PRESETS["tiny"]).with_behavior(BEHAVIOR_NAMES).eval()
    cfg = SimConfig(neurons=neurons, frames=frames, seed=5)
    session = simulate_session(cfg, make_animal(cfg, 0), 0)[0]
    z = preprocess_traces(session.traces, 30.0, "F", session.neuropil)
    off = cpu_model.run_offline(torch.from_numpy(z))
    engine = StreamingEngine(
        copy.deepcopy(cpu_model), EngineConfig(n_neurons=neurons, fps=30.0, device="cuda")
    )
    preds = [
        engine.step(session.traces[:, t], seq=t, neuropil=session.neuropil[:, t])
        for t in range(frames)
    ]
    forecast = np.stack([p.forecast for p in preds], 1)
    tokens = np.stack([p.tokens for p in preds], 1)
    diff = float(np.abs(forecast - off.forecast.numpy()).max())
    step_ms = [p.timings_ms["total"] for p in preds[100:]]
    return {
        "ok": bool((tokens == off.tokens.numpy()).all() and diff <= 1e-4),
        "tokens_equal": bool((tokens == off.tokens.numpy()).all()),
        "forecast_max_abs_diff": diff,
        "engine_step_p50_ms": float(np.percentile(step_ms, 50)),
        "engine_step_p99_ms": float(np.percentile(step_ms, 99)),
    }


# The forecast bounds of tests/test_engine.py::test_half_precision_stays_close_to_float32.
HALF_BOUNDS = {"float16": 0.02, "bfloat16": 0.06}


def half_precision(neurons: int = 256, frames: int = 300, device: str = "cuda") -> dict[str, Any]:
    """The engine in bfloat16 and float16 against float32 on ``device`` (shipped checkpoint)."""
    import numpy as np

    from calm_rt.data import SimConfig, make_animal, simulate_session
    from calm_rt.live.engine import EngineConfig, StreamingEngine
    from calm_rt.model import load_checkpoint

    model, _ = load_checkpoint(None)
    cfg = SimConfig(neurons=neurons, frames=frames, seed=5)
    traces = simulate_session(cfg, make_animal(cfg, 0), 0)[0].traces
    runs: dict[str, list] = {}
    out: dict[str, Any] = {"neurons": neurons, "frames": frames}
    for dtype in ("float32", *HALF_BOUNDS):
        engine = StreamingEngine(
            model, EngineConfig(n_neurons=neurons, fps=30.0, device=device, dtype=dtype)
        )
        runs[dtype] = [engine.step(traces[:, t], seq=t) for t in range(frames)]
        step_ms = [p.timings_ms["total"] for p in runs[dtype][100:]]
        out[f"{dtype}_step_p50_ms"] = float(np.percentile(step_ms, 50))
    ok = True
    for dtype, bound in HALF_BOUNDS.items():
        pairs = list(zip(runs[dtype], runs["float32"], strict=True))
        diff = float(max(np.abs(a.forecast - b.forecast).max() for a, b in pairs))
        tokens = all((a.tokens == b.tokens).all() for a, b in pairs)
        out[f"{dtype}_forecast_max_abs_diff"], out[f"{dtype}_tokens_equal"] = diff, tokens
        ok = ok and tokens and diff <= bound
    out["ok"] = ok
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("gpu-check.json"), help="where the JSON goes")
    args = ap.parse_args(argv)
    why = no_gpu_reason()
    if why is not None:
        print(f"gpu-check: {why}", file=sys.stderr)
        return 2
    py = sys.executable
    result: dict[str, Any] = {**_environment(), "steps": {}}
    steps = result["steps"]
    print(f"gpu-check on {result['card']} (driver {result['driver']})", flush=True)
    steps["kernel_tests_compiled"] = _run(
        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"],
        env={"TRITON_INTERPRET": "0"},
    )
    try:
        steps["exactness_cuda"] = exactness()
    except Exception as exc:  # recorded, and the other steps still run
        steps["exactness_cuda"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    try:
        steps["half_precision_cuda"] = half_precision()
    except Exception as exc:
        steps["half_precision_cuda"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    with tempfile.TemporaryDirectory() as tmp:
        quick, e2e = Path(tmp) / "quick.json", Path(tmp) / "e2e.json"
        steps["bench_quick"] = _run(
            [py, "-m", "bench", "--quick", "--device", "cuda", "--json", str(quick)], timeout=420
        )
        steps["e2e_1024"] = _run(
            [py, "-m", "bench", "--quick", "--device", "cuda", "--cases", "e2e",
             "--e2e-neurons", "1024", "--json", str(e2e)], timeout=300,
        )  # fmt: skip
        for name, path in (("bench_quick", quick), ("e2e_1024", e2e)):
            if path.exists():
                steps[name]["cases"] = [
                    {k: v for k, v in row.items() if k not in ("samples_ms", "traceback")}
                    for row in json.loads(path.read_text())["cases"]
                ]
    result["ok"] = all(s.get("ok") for s in steps.values())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    for name, s in steps.items():
        print(f"  {name}: {'ok' if s.get('ok') else 'FAILED'}", flush=True)
    print(f"gpu-check: written to {args.json}", flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
