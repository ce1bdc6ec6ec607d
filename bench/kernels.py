"""Kernel micro-benchmarks (CUDA only): each Triton kernel against its torch
reference and ``torch.compile`` of that reference, at the shapes of the
per-frame step.

One row per (kernel, shape, dtype, implementation). ``speedup`` is the torch
reference's p50 over the row's p50 (so the reference row reads 1.0);
``gbps`` is the bytes the op must move at least (inputs read once, outputs
written once) over the p50; attention rows also carry ``tflops``. Every row
records ``max_abs_err`` against the reference, so a fast wrong kernel shows.
Times are per call from the host, launch overhead included: what one
frame's step pays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bench.timing import Log, stats, timed
from kernels.codebook import codebook_lookup_triton
from kernels.neural_attention import neural_attention_triton
from kernels.reference import (
    codebook_lookup_ref,
    neural_attention_ref,
    temporal_attention_step_ref,
)
from kernels.temporal_attention import temporal_attention_step_triton

__all__ = ["kernel_rows"]

_DEVICE = "cuda"  # a module constant so that the code can be smoke-tested elsewhere
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16"}


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _compare(
    label: str,
    impls: dict[str, Callable[[], Any]],
    nbytes: int,
    flops: float | None,
    iters: int,
    extra: dict[str, Any],
    log: Log,
) -> list[dict]:
    """Time each implementation; ``impls`` starts with the torch reference."""
    rows: list[dict] = []
    sync = torch.cuda.synchronize if _DEVICE == "cuda" else None
    expected = _first(impls["torch"]()).float()
    ref_p50 = None
    for impl, fn in impls.items():
        name = f"{label} {impl}"
        try:
            err = (_first(fn()).float() - expected).abs().max().item()
            ms = timed(fn, warmup=10, iters=iters, sync=sync)
        except Exception as exc:  # torch.compile may not handle an op; report, go on
            rows.append(
                {"name": name, "case": "kernels", "skipped": f"{type(exc).__name__}: {exc}"[:200]}
            )
            log(f"  {name}: skipped ({type(exc).__name__})")
            continue
        row = {"name": name, "case": "kernels", "impl": impl, **extra, **stats(ms)}
        ref_p50 = ref_p50 or row["p50_ms"]
        row["speedup"] = round(ref_p50 / row["p50_ms"], 3)
        row["gbps"] = round(nbytes / (row["p50_ms"] * 1e-3) / 1e9, 2)
        if flops is not None:
            row["tflops"] = round(flops / (row["p50_ms"] * 1e-3) / 1e12, 3)
        row["max_abs_err"] = err
        rows.append(row)
        log(
            f"  {name}: p50 {row['p50_ms']:.4f} ms, {row['speedup']:.2f}x, {row['gbps']:.1f} GB/s, err {err:.2g}"
        )
    return rows


def _codebook(m: int, k: int, d: int, dtype: torch.dtype, iters: int, log: Log) -> list[dict]:
    x = torch.randn(m, d, device=_DEVICE, dtype=dtype)
    codebook = torch.randn(k, d, device=_DEVICE, dtype=dtype)
    ref = torch.compile(codebook_lookup_ref, dynamic=False)
    nbytes = _nbytes(x, codebook) + m * (8 + d * x.element_size() + x.element_size())
    impls = {
        "torch": lambda: codebook_lookup_ref(x, codebook),
        "compile": lambda: ref(x, codebook),
        "triton": lambda: codebook_lookup_triton(x, codebook),
    }
    label = f"codebook_lookup M={m} K={k} D={d} {_DTYPE_NAMES[dtype]}"
    extra = {"kernel": "codebook_lookup", "neurons": m, "codebook": k, "dim": d,
             "dtype": _DTYPE_NAMES[dtype]}  # fmt: skip
    return _compare(label, impls, nbytes, None, iters, extra, log)


def _temporal(
    n: int, h: int, c: int, d: int, dtype: torch.dtype, iters: int, log: Log
) -> list[dict]:
    q, k, v = torch.randn(n, 3, h, d, device=_DEVICE, dtype=dtype).unbind(1)
    k_cache = torch.randn(n, h, c, d, device=_DEVICE, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    angles = torch.rand(1, d // 2, device=_DEVICE, dtype=torch.float64)
    cos, sin = angles.cos(), angles.sin()
    keep = torch.ones(c, dtype=torch.bool, device=_DEVICE)
    keep[c // 2] = False  # a partly filled window, as after a skipped gap
    slot = c // 3
    args = (q, k, v, cos, sin, k_cache, v_cache, slot, keep)
    ref = torch.compile(temporal_attention_step_ref, dynamic=False)
    elem = q.element_size()
    nbytes = (3 * n * h * d + 2 * n * h * c * d + 3 * n * h * d) * elem
    flops = 4.0 * n * h * c * d
    impls = {
        "torch": lambda: temporal_attention_step_ref(*args),
        "compile": lambda: ref(*args),
        "triton": lambda: temporal_attention_step_triton(*args),
    }
    label = f"temporal_attention_step N={n} H={h} C={c} d={d} {_DTYPE_NAMES[dtype]}"
    extra = {"kernel": "temporal_attention_step", "neurons": n, "heads": h, "context": c,
             "head_dim": d, "dtype": _DTYPE_NAMES[dtype]}  # fmt: skip
    return _compare(label, impls, nbytes, flops, iters, extra, log)


def _neural(n: int, h: int, d: int, dtype: torch.dtype, iters: int, log: Log) -> list[dict]:
    # Strided [H, N, d] views of one projection, as the model passes them.
    q, k, v = torch.randn(n, 3, h, d, device=_DEVICE, dtype=dtype).permute(1, 2, 0, 3).unbind(0)
    ref = torch.compile(neural_attention_ref, dynamic=False)
    nbytes = 4 * h * n * d * q.element_size()
    flops = 4.0 * h * n * n * d
    impls = {
        "torch": lambda: neural_attention_ref(q, k, v),  # SDPA on contiguous copies
        "compile": lambda: ref(q, k, v),
        "triton": lambda: neural_attention_triton(q, k, v),
    }
    label = f"neural_attention N={n} H={h} d={d} {_DTYPE_NAMES[dtype]}"
    extra = {"kernel": "neural_attention", "neurons": n, "heads": h, "head_dim": d,
             "dtype": _DTYPE_NAMES[dtype]}  # fmt: skip
    return _compare(label, impls, nbytes, flops, iters, extra, log)


def kernel_rows(quick: bool, log: Log) -> list[dict]:
    """Benchmark rows for every kernel at the default model's shapes (needs CUDA).

    Default model: width 64, 4 heads (d = 16), context C = 12 tokens,
    codebook 128 x 16. ``quick`` times 1,024 neurons in float32 only.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench.kernels needs a CUDA GPU")
    iters = 100 if quick else 500
    dtypes = [torch.float32] if quick else [torch.float32, torch.float16]
    neurons = [1024] if quick else [256, 1024, 4096]
    rows: list[dict] = []
    # Every shape compiles the references afresh; dynamo's default limit of 8
    # recompiles per function would quietly fall back to eager.
    with torch._dynamo.config.patch(recompile_limit=64):
        for dtype in dtypes:
            for n in neurons:
                rows += _codebook(n, 128, 16, dtype, iters, log)
                rows += _temporal(n, 4, 12, 16, dtype, iters, log)
                rows += _neural(n, 4, 16, dtype, iters, log)
            if not quick:
                rows += _neural(16384, 4, 16, dtype, max(20, iters // 10), log)
                rows += _neural(3000, 4, 32, dtype, iters // 2, log)
                rows += _temporal(4096, 4, 64, 16, dtype, iters, log)
    return rows
