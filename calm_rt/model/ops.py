"""Dispatch of the hot-path ops: Triton kernels on CUDA, torch references elsewhere.

``CALM_RT_KERNELS`` forces a choice, read at every call:

* ``auto`` (the default): the Triton kernel when the tensors are on CUDA
  (where a failed kernel import is a :class:`ConfigError` saying what to
  install, never a silent fall-back), the torch reference otherwise;
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


# The Triton range the kernels are written for (pyproject's ``gpu`` extra says the same).
TRITON_SPEC = "triton>=3.4,<3.10"


@functools.cache
def _import_kernels() -> tuple[ModuleType | None, str | None]:
    """The kernel modules, imported on first use, or None and why not."""
    try:
        import kernels.codebook
        import kernels.neural_attention
        import kernels.temporal_attention
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return kernels, None


def _kernels() -> ModuleType | None:
    """The kernel modules (None when Triton is unavailable or too old)."""
    return _import_kernels()[0]


def _kernels_or_raise() -> ModuleType:
    """The kernel modules for CUDA tensors: never a silent fall-back to the references."""
    mod, why = _import_kernels()
    if mod is None:
        raise ConfigError(
            f"the Triton kernels cannot be imported on this CUDA machine ({why}); install "
            f"`pip install '{TRITON_SPEC}'` (or `pip install 'calm-rt[gpu]'`), or set "
            "CALM_RT_KERNELS=reference to run the torch references on the GPU"
        )
    return mod


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
        return x.is_cuda and _kernels_or_raise() is not None
    mod = _kernels()
    if mod is None:
        raise ConfigError(
            f"CALM_RT_KERNELS=triton but the kernels cannot be imported ({_import_kernels()[1]}): "
            f"install `pip install '{TRITON_SPEC}'` or set CALM_RT_KERNELS=auto"
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
