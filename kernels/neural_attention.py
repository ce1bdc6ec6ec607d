"""Bidirectional attention across all neurons at one time step, flash style.

One program takes ``BLOCK_M`` queries of one head and sweeps every key in
tiles of ``BLOCK_N`` with an online softmax (scores in base 2, the scale
folded into one multiply), so the ``[N, N]`` score matrix never reaches
memory. No mask: every neuron attends to every neuron. Float32 inputs use
exact IEEE products (no TF32), so the streaming engine stays within float32
rounding of the offline model; float16/bfloat16 use the tensor cores with
float32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._tuning import autotune, next_pow2

__all__ = ["neural_attention_triton"]

# Hopper: head dims 16-64 keep q, k and v tiles small, so the trade-off is
# programs (N / BLOCK_M per head; ~1k neurons x 4 heads must fill 132 SMs)
# against the reuse of each key tile. (BLOCK_M, BLOCK_N, warps, stages):
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (32, 32, 2, 2), (32, 64, 4, 2), (32, 128, 4, 3),
        (64, 32, 4, 2), (64, 64, 4, 3), (64, 128, 4, 3),
        (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4),
    ]
]  # fmt: skip


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    cap = max(32, next_pow2(named_args["N"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap and c.kwargs["BLOCK_N"] <= cap]
    return kept or configs[:1]


@autotune(
    configs=_CONFIGS,
    key=["N", "head_dim"],
    interpret_config=triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}),
    prune=_prune,
)
@triton.jit
def _neural_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    N,
    head_dim,
    qk_scale,
    stride_qh,
    stride_qn,
    stride_kh,
    stride_kn,
    stride_vh,
    stride_vn,
    stride_oh,
    stride_on,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    mask_md = (offs_m < N)[:, None] & mask_d[None, :]
    q = tl.load(
        q_ptr + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
        mask=mask_md,
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k_t = tl.load(
            k_ptr + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None],
            mask=mask_d[:, None] & mask_n[None, :],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale  # log2 units
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Every tile holds at least one real key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(
        out_ptr + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_md,
    )


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


def neural_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of every neuron over every neuron, one head per grid column.

    Args:
        q, k, v: ``[H, N, d]``, any N >= 1, d up to 128 (16 in the
            default model); any strides with a unit last stride (the views of
            a fused qkv projection are fine); one dtype of float32, float16,
            bfloat16.

    Returns:
        ``[H, N, d]`` (contiguous, ``q``'s dtype): ``softmax(q k^T / sqrt(d)) v``,
        as :func:`kernels.reference.neural_attention_ref`.
    """
    if q.ndim != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must be [H, N, d] alike, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    h, n, d = q.shape
    if not 1 <= d <= 128:
        raise ValueError(f"head dimension must be in [1, 128], got {d}; use the reference")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k and v must share one of {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.device != q.device or v.device != q.device:
        raise ValueError("q, k and v must be on one device")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k and v must be contiguous in their last dimension")
    out = torch.empty(h, n, d, dtype=q.dtype, device=q.device)
    if n == 0 or h == 0:
        return out

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_M"]), h)

    _neural_attention_kernel[grid](
        q, k, v, out,
        n, d, d**-0.5 * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_D=max(16, next_pow2(d)),
    )  # fmt: skip
    return out
