"""What the three kernels share: interpreter detection and autotuning that is
pruned for Hopper GPUs but collapses to one fixed config in the interpreter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import triton
from triton import knobs

__all__ = ["INTERPRET", "autotune", "next_pow2"]

# Read once, at import, exactly when ``triton.jit`` decides between compiling
# and interpreting: the two must agree for the life of the process.
INTERPRET: bool = bool(knobs.runtime.interpret)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _no_bench(kernel_call: Callable[[], Any], quantiles: Sequence[float]) -> list[float]:
    # Never called (one config leaves nothing to compare); explicit because the
    # default benchmarker needs a GPU driver that the interpreter lacks.
    kernel_call()
    return [0.0 for _ in quantiles]


def autotune(
    configs: list[triton.Config],
    key: list[str],
    interpret_config: triton.Config,
    prune: Callable[..., list[triton.Config]] | None = None,
) -> Callable[[Any], Any]:
    """``triton.autotune`` over ``configs`` on a GPU; ``interpret_config`` alone in the interpreter."""
    if INTERPRET:
        return triton.autotune(configs=[interpret_config], key=key, do_bench=_no_bench)
    pruning = {"early_config_prune": prune} if prune is not None else None
    # cache_results: the chosen config goes to Triton's cache dir (keyed by the
    # shapes, dtypes and GPU), so a restarted server does not tune again.
    return triton.autotune(configs=configs, key=key, prune_configs_by=pruning, cache_results=True)
