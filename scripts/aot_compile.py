"""Compile calm-rt's Triton kernels ahead of time for a GPU this machine may not have.

    python scripts/aot_compile.py temporal_attention --arch 90 80 --dtype fp32 fp16

For each kernel, every autotune config the autotuner may pick at the engine's
shapes (the shipped checkpoint's heads, head dimension, context and codebook,
at 1,024 neurons; its own pruning applied) is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` down to
a cubin. Prints one JSON line per compile. Needs Triton's real compiler, so
``TRITON_INTERPRET`` must be unset or 0 (the interpreter has no ``.fn`` to
compile); the cache goes where ``TRITON_CACHE_DIR`` says.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

# The engine's shapes (calm_rt/checkpoints/default/config.json): DAT width 64 over
# 4 heads (d = 16), 12 context tokens, codebook 128 x 16; 1,024 neurons.
NEURONS, HEADS, HEAD_DIM, CONTEXT, CODES, CODE_DIM = 1024, 4, 16, 12, 128, 16


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _plan(kernel: str, dtype: str) -> tuple[Any, dict[str, str], dict[str, Any], dict[str, int]]:
    """(autotuner, pointer dtypes, fixed constexprs, prune arguments) of one kernel."""
    if kernel == "temporal_attention":
        from kernels.temporal_attention import _temporal_attention_step_kernel as k

        ptrs = {p: f"*{dtype}" for p in ("q_ptr", "k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr",
                                         "out_ptr")}  # fmt: skip
        ptrs.update(cos_ptr="*fp64", sin_ptr="*fp64", keep_ptr="*u8")
        const = {"HAS_KEEP": True, "BLOCK_C": min(_next_pow2(CONTEXT), 16),
                 "BLOCK_HALF": _next_pow2(HEAD_DIM // 2)}  # fmt: skip
        return k, ptrs, const, {"N": NEURONS}
    if kernel == "neural_attention":
        from kernels.neural_attention import _neural_attention_kernel as k

        ptrs = {p: f"*{dtype}" for p in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
        const = {"DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
                 "BLOCK_D": max(16, _next_pow2(HEAD_DIM))}  # fmt: skip
        return k, ptrs, const, {"N": NEURONS}
    if kernel == "codebook":
        from kernels.codebook import _codebook_lookup_kernel as k

        ptrs = {"x_ptr": f"*{dtype}", "codebook_ptr": f"*{dtype}", "ids_ptr": "*i64",
                "codes_ptr": f"*{dtype}", "margin_ptr": f"*{dtype}"}  # fmt: skip
        const = {"DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
                 "BLOCK_D": max(16, _next_pow2(CODE_DIM))}  # fmt: skip
        return k, ptrs, const, {"M": NEURONS, "K": CODES}
    raise SystemExit(f"unknown kernel {kernel!r}: temporal_attention, neural_attention or codebook")


FLOAT_ARGS = {"sm_scale", "qk_scale"}
KERNELS = ("temporal_attention", "neural_attention", "codebook")


def configs(kernel: str, dtype: str = "fp32") -> list[Any]:
    """The autotune configs that survive the kernel's pruning at the engine's shapes."""
    tuner, _, const, shape = _plan(kernel, dtype)
    prune = tuner.early_config_prune
    return prune(tuner.configs, shape, **const) if prune else list(tuner.configs)


def compile_one(kernel: str, config: Any, arch: int, dtype: str) -> dict[str, Any]:
    """Compile ``kernel`` at ``config`` for ``sm_<arch>``; returns what came out."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tuner, ptrs, const, _ = _plan(kernel, dtype)
    fn = tuner.fn
    constexprs = {**const, **config.kwargs}
    signature = {}
    for p in fn.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name in ptrs:
            signature[p.name] = ptrs[p.name]
        else:
            signature[p.name] = "fp32" if p.name in FLOAT_ARGS else "i32"
    start = time.perf_counter()
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    cubin = compiled.asm.get("cubin", b"")
    return {
        "kernel": kernel,
        "arch": arch,
        "dtype": dtype,
        "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
        "stages": sorted(compiled.asm),
        "cubin_bytes": len(cubin),
        "seconds": round(time.perf_counter() - start, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernels", nargs="*", help=f"any of {', '.join(KERNELS)} (default: all)")
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="sm_XX (default 90 80)")
    ap.add_argument("--dtype", nargs="+", default=["fp32", "fp16"], choices=("fp32", "fp16"))
    ap.add_argument(
        "--first-only", action="store_true", help="one config per kernel (a quick smoke check)"
    )
    args = ap.parse_args(argv)
    args.kernels = args.kernels or list(KERNELS)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(
            "aot_compile: unset TRITON_INTERPRET (the interpreter cannot compile)", file=sys.stderr
        )
        return 2
    failed = 0
    for kernel in args.kernels:
        for dtype in args.dtype:
            chosen = configs(kernel, dtype)
            for config in chosen[:1] if args.first_only else chosen:
                for arch in args.arch:
                    try:
                        row = compile_one(kernel, config, arch, dtype)
                    except Exception as exc:  # reported per config, the others still run
                        failed += 1
                        row = {"kernel": kernel, "arch": arch, "dtype": dtype,
                               "config": dict(config.kwargs), "error": f"{type(exc).__name__}: {exc}"[:500]}  # fmt: skip
                    row["of"] = len(chosen)  # configs the autotuner may pick here
                    print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
