"""Fused nearest-code lookup: squared distances, argmin, second minimum and gather.

One program takes ``BLOCK_M`` rows of ``x`` and sweeps the codebook in tiles
of ``BLOCK_K`` entries, keeping per row the smallest distance, its index and
the second-smallest distance; the ``[M, K]`` distance matrix never reaches
memory. Distances are ``||e_k||^2 - 2 x.e_k`` (the reference's formula; the
row's ``||x||^2`` cannot change the argmin), accumulated in float32, exact
IEEE products for float32 inputs (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._tuning import autotune, next_pow2

__all__ = ["codebook_lookup_triton"]

# Hopper: the codebook tile is the reused operand; small row blocks give the
# 132 SMs enough programs at the engine's M (one row per neuron, ~1k). Twelve
# configs keep the first call's tuning to seconds.
_CONFIGS = [
    triton.Config(
        {"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=4 if bm * bk >= 64 * 64 else 2, num_stages=2
    )
    for bm in (16, 32, 64, 128)
    for bk in (32, 64, 128)
]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    m_cap, k_cap = max(16, next_pow2(named_args["M"])), max(32, next_pow2(named_args["K"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= m_cap and c.kwargs["BLOCK_K"] <= k_cap]
    return kept or configs[:1]


@autotune(
    configs=_CONFIGS,
    key=["M", "K", "D"],
    interpret_config=triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}),
    prune=_prune,
)
@triton.jit
def _codebook_lookup_kernel(
    x_ptr,
    codebook_ptr,
    ids_ptr,
    codes_ptr,
    margin_ptr,
    M,
    K,
    D,
    stride_xm,
    stride_xd,
    stride_ck,
    stride_cd,
    stride_om,
    stride_od,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    x = tl.load(
        x_ptr + offs_m[:, None] * stride_xm + offs_d[None, :] * stride_xd,
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]

    best = tl.full([BLOCK_M], float("inf"), tl.float32)
    second = tl.full([BLOCK_M], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_M], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        e = tl.load(
            codebook_ptr + offs_k[:, None] * stride_ck + offs_d[None, :] * stride_cd,
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        )  # [BLOCK_K, BLOCK_D]
        ef = e.to(tl.float32)
        e_sq = tl.sum(ef * ef, axis=1)  # [BLOCK_K]
        xe = tl.dot(x, tl.trans(e), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_K] fp32
        dist = tl.where(mask_k[None, :], e_sq[None, :] - 2.0 * xe, float("inf"))

        tile_best = tl.min(dist, axis=1)
        # Lowest index among the tile's minima, spelled out so that the tie
        # rule does not depend on tl.argmin's.
        tile_idx = tl.min(tl.where(dist == tile_best[:, None], offs_k[None, :], K), axis=1)
        tile_second = tl.min(
            tl.where(offs_k[None, :] == tile_idx[:, None], float("inf"), dist), axis=1
        )
        # Strictly better only: an equal minimum in a later tile has a higher
        # index, so the earlier one stays (and the margin becomes 0).
        better = tile_best < best
        second = tl.where(better, tl.minimum(best, tile_second), tl.minimum(second, tile_best))
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)

    tl.store(ids_ptr + offs_m, best_idx.to(tl.int64), mask=mask_m)
    tl.store(margin_ptr + offs_m, (second - best).to(margin_ptr.dtype.element_ty), mask=mask_m)
    mask_md = mask_m[:, None] & mask_d[None, :]
    code = tl.load(
        codebook_ptr + best_idx[:, None] * stride_ck + offs_d[None, :] * stride_cd,
        mask=mask_md,
        other=0.0,
    )
    tl.store(
        codes_ptr + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, code, mask=mask_md
    )


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_D = 256


def codebook_lookup_triton(
    x: torch.Tensor, codebook: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest codebook entry per row, fused.

    Args:
        x: ``[M, D]`` float32, float16 or bfloat16 vectors.
        codebook: ``[K, D]`` entries (K >= 2), same dtype and device as ``x``.

    Returns:
        ``ids`` int64 ``[M]`` (ties to the lowest index), the chosen entries
        ``[M, D]`` (codebook dtype) and ``margin`` ``[M]`` (``x``'s dtype):
        second-smallest minus smallest squared distance, as
        :func:`kernels.reference.codebook_lookup_ref` returns them.
    """
    if x.ndim != 2 or codebook.ndim != 2:
        raise ValueError(
            f"x must be [M, D] and codebook [K, D], got {tuple(x.shape)} and {tuple(codebook.shape)}"
        )
    (m, d), k = x.shape, codebook.shape[0]
    if codebook.shape[1] != d:
        raise ValueError(f"x has D={d} but the codebook has D={codebook.shape[1]}")
    if k < 2:
        raise ValueError(f"the codebook needs at least 2 entries for a margin, got {k}")
    if d > _MAX_D:
        raise ValueError(f"D={d} is above the kernel's {_MAX_D}; use the reference")
    if x.dtype not in _DTYPES or codebook.dtype != x.dtype:
        raise ValueError(
            f"x and codebook must share one of {_DTYPES}, got {x.dtype} and {codebook.dtype}"
        )
    if x.device != codebook.device:
        raise ValueError(f"x is on {x.device} but the codebook on {codebook.device}")
    ids = torch.empty(m, dtype=torch.int64, device=x.device)
    codes = torch.empty(m, d, dtype=codebook.dtype, device=x.device)
    margin = torch.empty(m, dtype=x.dtype, device=x.device)
    if m == 0:
        return ids, codes, margin

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]),)

    _codebook_lookup_kernel[grid](
        x, codebook, ids, codes, margin,
        m, k, d,
        x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1),
        codes.stride(0), codes.stride(1),
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_D=max(16, next_pow2(d)),
    )  # fmt: skip
    return ids, codes, margin
