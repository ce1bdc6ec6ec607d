"""What every benchmark case shares: the machine's description and the timing loop."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["Log", "environment", "stats", "timed"]

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
