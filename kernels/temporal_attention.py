"""Incremental temporal attention: one new token per (neuron, head) against its KV cache.

One program takes ``BLOCK_N`` neurons of one head. It rotates the new query
and key (rotary, each head dimension's halves are the pair, as
``calm_rt.model.apply_rotary``), writes the rotated key and the value into
the cache at ``slot``, and attends over the kept slots in tiles of
``BLOCK_C`` with an online softmax. The head dimension is handled as its two
rotary halves throughout, so the rotation needs no shuffle. The new token's
key and value are used from registers, never read back from the cache (no
store-to-load race inside the program). Work is a batched matrix-vector
product (one query per neuron), so it runs on the CUDA cores, in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._tuning import autotune, next_pow2

__all__ = ["temporal_attention_step_triton"]

# Hopper: the cache tile [BLOCK_N, BLOCK_C, d/2] x 4 (k, v halves) must fit in
# registers, and ~1k neurons x 4 heads must still fill 132 SMs. The cache loop
# is one or a few iterations (C ~ 12), so software pipelining buys nothing.
_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=1)
    for bn in (4, 8, 16, 32)
    for w in (1, 2, 4)
]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    cap = max(4, next_pow2(named_args["N"]))
    # BLOCK_N * BLOCK_C * d/2 values per operand half; at most ~32 per thread
    # (there are four such operands live) or the registers spill.
    tile = kwargs["BLOCK_C"] * kwargs["BLOCK_HALF"]
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_N"] <= cap and c.kwargs["BLOCK_N"] * tile <= 32 * 32 * c.num_warps
    ]
    return kept or configs[:1]


@autotune(
    configs=_CONFIGS,
    key=["N", "H", "C", "half"],
    interpret_config=triton.Config({"BLOCK_N": 64}),
    prune=_prune,
)
@triton.jit(do_not_specialize=["slot"])
def _temporal_attention_step_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    keep_ptr,
    out_ptr,
    N,
    H,
    C,
    half,
    slot,
    sm_scale,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_kcn,
    stride_kch,
    stride_kcc,
    stride_vcn,
    stride_vch,
    stride_vcc,
    stride_on,
    stride_oh,
    HAS_KEEP: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_HALF)  # index within a rotary half
    mask_n = offs_n < N
    mask_j = offs_j < half
    mask_nj = mask_n[:, None] & mask_j[None, :]

    # float64 angles (exact at any position) rounded to float32 here, as the
    # reference rounds them to the activations' dtype: no host-side cast.
    cos = tl.load(cos_ptr + offs_j, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + offs_j, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    q_row = q_ptr + offs_n[:, None] * stride_qn + h * stride_qh + offs_j[None, :]
    q1 = tl.load(q_row, mask=mask_nj, other=0.0).to(tl.float32)
    q2 = tl.load(q_row + half, mask=mask_nj, other=0.0).to(tl.float32)
    k_row = k_ptr + offs_n[:, None] * stride_kn + h * stride_kh + offs_j[None, :]
    k1 = tl.load(k_row, mask=mask_nj, other=0.0).to(tl.float32)
    k2 = tl.load(k_row + half, mask=mask_nj, other=0.0).to(tl.float32)
    v_row = v_ptr + offs_n[:, None] * stride_vn + h * stride_vh + offs_j[None, :]
    v1 = tl.load(v_row, mask=mask_nj, other=0.0).to(tl.float32)
    v2 = tl.load(v_row + half, mask=mask_nj, other=0.0).to(tl.float32)

    # Rotary, then round the key to the cache's dtype: the attention below
    # must see exactly what later steps will read back from the cache.
    cache_ty = k_cache_ptr.dtype.element_ty
    rq1 = q1 * cos - q2 * sin
    rq2 = q1 * sin + q2 * cos
    rk1 = (k1 * cos - k2 * sin).to(cache_ty)
    rk2 = (k1 * sin + k2 * cos).to(cache_ty)
    nv1 = v1.to(v_cache_ptr.dtype.element_ty)
    nv2 = v2.to(v_cache_ptr.dtype.element_ty)

    kc_head = k_cache_ptr + offs_n[:, None, None] * stride_kcn + h * stride_kch
    vc_head = v_cache_ptr + offs_n[:, None, None] * stride_vcn + h * stride_vch
    jj = offs_j[None, None, :]
    tl.store(kc_head + slot * stride_kcc + jj, rk1[:, None, :], mask=mask_nj[:, None, :])
    tl.store(kc_head + slot * stride_kcc + jj + half, rk2[:, None, :], mask=mask_nj[:, None, :])
    tl.store(vc_head + slot * stride_vcc + jj, nv1[:, None, :], mask=mask_nj[:, None, :])
    tl.store(vc_head + slot * stride_vcc + jj + half, nv2[:, None, :], mask=mask_nj[:, None, :])

    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_HALF], tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_HALF], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        kept = offs_c < C
        if HAS_KEEP:
            kept = kept & (tl.load(keep_ptr + offs_c, mask=offs_c < C, other=0) != 0)
        is_new = (offs_c == slot)[None, :, None]
        mask = mask_nj[:, None, :] & (kept & (offs_c != slot))[None, :, None]
        cc = offs_c[None, :, None]
        kc1 = tl.load(kc_head + cc * stride_kcc + jj, mask=mask, other=0.0)
        kc2 = tl.load(kc_head + cc * stride_kcc + jj + half, mask=mask, other=0.0)
        kc1 = tl.where(is_new, rk1[:, None, :], kc1).to(tl.float32)
        kc2 = tl.where(is_new, rk2[:, None, :], kc2).to(tl.float32)
        s = tl.sum(rq1[:, None, :] * kc1, axis=2) + tl.sum(rq2[:, None, :] * kc2, axis=2)
        s = tl.where(kept[None, :], s * sm_scale, float("-inf"))  # [BLOCK_N, BLOCK_C]

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A tile with nothing kept yet leaves m at -inf; shift by 0 then so
        # that exp() gives 0 rather than NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)

        vc1 = tl.load(vc_head + cc * stride_vcc + jj, mask=mask, other=0.0)
        vc2 = tl.load(vc_head + cc * stride_vcc + jj + half, mask=mask, other=0.0)
        vc1 = tl.where(is_new, nv1[:, None, :], vc1).to(tl.float32)
        vc2 = tl.where(is_new, nv2[:, None, :], vc2).to(tl.float32)
        acc1 = acc1 * alpha[:, None] + tl.sum(p[:, :, None] * vc1, axis=1)
        acc2 = acc2 * alpha[:, None] + tl.sum(p[:, :, None] * vc2, axis=1)
        m_i = m_new

    out_row = out_ptr + offs_n[:, None] * stride_on + h * stride_oh + offs_j[None, :]
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_row, (acc1 / l_i[:, None]).to(out_ty), mask=mask_nj)
    tl.store(out_row + half, (acc2 / l_i[:, None]).to(out_ty), mask=mask_nj)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NO_KEEP: dict[torch.device, torch.Tensor] = {}


def _no_keep(device: torch.device) -> torch.Tensor:
    """A one-byte uint8 placeholder for ``keep_ptr`` when there is no mask (one per device)."""
    if device not in _NO_KEEP:
        _NO_KEEP[device] = torch.ones(1, dtype=torch.uint8, device=device)
    return _NO_KEEP[device]


def _check_last_dim(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dimension, got strides {t.stride()}"
        )


def temporal_attention_step_triton(
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
    """Fused rotary + cache append + attention for one new token per neuron.

    Args:
        q, k, v: ``[N, H, d]`` the new token's query, key and value (q and k
            not yet rotated); any strides with a unit last stride (the views
            of a fused qkv projection are fine).
        cos, sin: ``[1, d/2]`` (or ``[d/2]``) rotary tables of the position.
        k_cache, v_cache: ``[N, H, C, d]`` rotated keys and values, unit last
            stride; slot ``slot`` is written in place.
        slot: ``0 <= slot < C``.
        keep: ``[C]`` bool, the slots inside the window (at least one kept,
            else the output is NaN like the reference's); ``None``: all.

    Returns:
        ``[N, H, d]`` in ``q``'s dtype: softmax(q.k / sqrt(d)) v over the kept
        slots, as :func:`kernels.reference.temporal_attention_step_ref`.
    """
    if q.ndim != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must be [N, H, d] alike, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    n, h, d = q.shape
    if d % 2:
        raise ValueError(f"the head dimension must be even for rotary, got {d}")
    if k_cache.ndim != 4 or k_cache.shape[:2] != (n, h) or k_cache.shape[3] != d:
        raise ValueError(f"k_cache must be [N={n}, H={h}, C, d={d}], got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)}"
        )
    c = k_cache.shape[2]
    if not 0 <= slot < c:
        raise ValueError(f"slot must be in [0, {c}), got {slot}")
    if keep is not None and (keep.shape != (c,) or keep.dtype != torch.bool):
        raise ValueError(f"keep must be a bool [C={c}] mask, got {keep.dtype} {tuple(keep.shape)}")
    if not (cos.is_floating_point() and sin.is_floating_point()):
        raise ValueError(f"cos and sin must be float tables, got {cos.dtype} and {sin.dtype}")
    if cos.numel() != d // 2 or sin.numel() != d // 2:
        raise ValueError(
            f"cos and sin must hold d/2={d // 2} angles, got {cos.numel()} and {sin.numel()}"
        )
    if q.dtype not in _DTYPES or {k.dtype, v.dtype, k_cache.dtype, v_cache.dtype} != {q.dtype}:
        raise ValueError(
            f"q, k, v and the caches must share one of {_DTYPES}, got {q.dtype}, {k.dtype}, "
            f"{v.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    tensors = (k, v, cos, sin, k_cache, v_cache) + ((keep,) if keep is not None else ())
    if any(t.device != q.device for t in tensors):
        raise ValueError("q, k, v, cos, sin, the caches and keep must be on one device")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_last_dim(name, t)
    cos, sin = cos.reshape(-1), sin.reshape(-1)  # views of the [1, d/2] tables
    if cos.stride(0) != 1 or sin.stride(0) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    # A bool tensor's bytes are 0/1: reinterpret, no copy. Without a mask a
    # one-byte placeholder of the same dtype goes in (never read): the
    # autotuner keys on every argument's dtype, so passing another tensor
    # here would tune all over again when the window fills (frame 48).
    keep_bytes = keep.view(torch.uint8) if keep is not None else _no_keep(q.device)
    out = torch.empty(n, h, d, dtype=q.dtype, device=q.device)
    if n == 0:
        return out

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), h)

    _temporal_attention_step_kernel[grid](
        q, k, v, cos, sin, k_cache, v_cache, keep_bytes, out,
        n, h, c, d // 2, slot, d**-0.5,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        HAS_KEEP=keep is not None,
        BLOCK_C=min(next_pow2(c), 16),
        BLOCK_HALF=next_pow2(d // 2),
    )  # fmt: skip
    return out
