"""Dispatch of the hot-path ops: Triton kernels on CUDA, torch references elsewhere.

``CALM_RT_KERNELS`` forces a choice, read at every call:

* ``auto`` (the default): the Triton kernel when the tensors are on CUDA and
  Triton imports, the torch reference otherwise;
* ``triton``: always the kernel; fails with :class:`ConfigError` when it
  cannot run (Triton missing, or CPU tensors without ``TRITON_INTERPRET=1``,
  which runs the kernels in Triton's CPU interpreter - slow, for tests);
* ``reference``: always the torch reference.

Fake tensors (``FakeTensorMode``: device and shape checks without data)
always take the reference. float64 inputs always take the reference: the kernels accumulate in float32,
and float64 is what calm-rt uses when it must be exact (near-tie
tokenisation). This module is the only place calm_rt reaches ``kernels``.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
from torch._subclasses.fake_tensor import FakeTensor

from calm_rt.errors import ConfigError
from kernels.reference import (
    codebook_lookup_ref,
    neural_attention_ref,
    temporal_attention_step_ref,
)

__all__ = ["codebook_lookup", "kernel_mode", "neural_attention", "temporal_attention_step"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_mode() -> str:
    """``CALM_RT_KERNELS``: ``auto``, ``triton`` or ``reference``."""
    mode = os.environ.get("CALM_RT_KERNELS", "auto").lower()
    if mode not in ("auto", "triton", "reference"):
        raise ConfigError(f"CALM_RT_KERNELS must be auto, triton or reference, got {mode!r}")
    return mode


@functools.cache
def _kernels() -> ModuleType | None:
    """The kernel modules, imported on first use (None when Triton is unavailable)."""
    try:
        import kernels.codebook
        import kernels.neural_attention
        import kernels.temporal_attention
    except ImportError:
        return None
    return kernels


def _use_triton(x: torch.Tensor) -> bool:
    """Whether this call goes to the Triton kernel (``x`` is its first input)."""
    if not x.is_cuda and os.environ.get("CALM_RT_KERNELS", "auto") == "auto":
        return False  # the CPU hot path: one lookup, no validation needed
    if isinstance(x, FakeTensor):
        # Shapes and devices only (FakeTensorMode, tracing): a Triton launch
        # would read memory that does not exist; the reference says the same.
        return False
    mode = kernel_mode()
    if mode == "reference" or x.dtype not in _KERNEL_DTYPES:
        return False
    if mode == "auto":
        return x.is_cuda and _kernels() is not None
    mod = _kernels()
    if mod is None:
        raise ConfigError(
            "CALM_RT_KERNELS=triton but Triton cannot be imported: install it "
            "(pip install triton) or set CALM_RT_KERNELS=auto"
        )
    # The kernels decided between compiling and interpreting when imported.
    if not x.is_cuda and not mod._tuning.INTERPRET:
        raise ConfigError(
            f"CALM_RT_KERNELS=triton but the tensors are on {x.device}: the kernels need a CUDA "
            "GPU, or TRITON_INTERPRET=1 set from the start (Triton reads it when the kernels are "
            "first imported) to run them in Triton's CPU interpreter; or set CALM_RT_KERNELS=auto"
        )
    return True


def codebook_lookup(x: torch.Tensor, codebook: torch.Tensor, with_margin: bool = False):
    """Nearest code per row: ``x [M, D]``, ``codebook [K, D]`` to ids ``[M]`` and codes ``[M, D]``.

    With ``with_margin`` also the gap ``[M]`` between the two nearest
    distances (ties and near-ties have a gap near 0). Ties go to the lowest id.
    """
    if _use_triton(x):
        ids, codes, margin = _kernels().codebook.codebook_lookup_triton(x, codebook)
    else:
        ids, codes, margin = codebook_lookup_ref(x, codebook)
    return (ids, codes, margin) if with_margin else (ids, codes)


def temporal_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: int,
    keep: torch.Tensor | None,
) -> torch.Tensor:
    """One new token per neuron against its temporal KV cache.

    ``q, k, v [N, H, d]`` (q and k not yet rotated), rotary ``cos, sin
    [1, d/2]`` of the token's position, caches ``[N, H, C, d]`` whose slot
    ``slot`` is overwritten in place with the rotated key and the value,
    ``keep [C]`` bool (the slots in the window; ``None``: all). Returns the
    attention output ``[N, H, d]``.
    """
    if _use_triton(q):
        fn = _kernels().temporal_attention.temporal_attention_step_triton
    else:
        fn = temporal_attention_step_ref
    return fn(q, k, v, cos, sin, k_cache, v_cache, slot, keep)


def neural_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention across neurons: ``q, k, v [..., H, N, d]`` to the same shape.

    Leading dimensions are independent groups (time steps of a batch), as heads are.
    """
    if _use_triton(q):
        lead = q.shape[:-2]
        flat = [t.reshape(-1, *t.shape[-2:]) for t in (q, k, v)]  # [G*H, N, d]
        return _kernels().neural_attention.neural_attention_triton(*flat).view(*lead, *q.shape[-2:])
    return neural_attention_ref(q, k, v)
