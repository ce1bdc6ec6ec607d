"""Pure-torch references of every kernel: the ground truth of the kernel tests
and the CPU path of the dispatcher. Shapes are in the docstrings.

They are the CPU hot path too, so they are written for speed on small
shapes; the model's offline math agrees with them to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "codebook_lookup_ref",
    "neural_attention_ref",
    "rotary_ref",
    "temporal_attention_step_ref",
]


def codebook_lookup_ref(
    x: torch.Tensor, codebook: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest codebook entry by squared Euclidean distance.

    Args:
        x: ``[M, D]`` vectors.
        codebook: ``[K, D]`` entries (K >= 2).

    Returns:
        ``ids`` int64 ``[M]``, the chosen entries ``[M, D]``, and ``margin``
        ``[M]``: the second-smallest minus the smallest distance (how close
        the choice was). Ties go to the lowest index.
    """
    # ||x||^2 is the same for every entry of a row, so it cannot change the
    # argmin; leaving it out saves a reduction and some rounding.
    dist = (codebook * codebook).sum(-1)[None, :] - 2.0 * (x @ codebook.T)  # [M, K]
    first, ids = dist.min(dim=-1)  # the first minimum: the lowest index among ties
    # The runner-up: mask the winner only, so a tie leaves a margin of 0.
    # (Two min passes are about twice as fast on CPU as topk(2) plus argmin.)
    second = dist.scatter(1, ids[:, None], float("inf")).amin(dim=-1)
    return ids, codebook[ids], second - first


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[..., :d/2], x[..., d/2:])`` by the angles; tables ``[..., d/2]``.

    The same math as ``calm_rt.model.apply_rotary`` (this package may not
    import calm_rt): the tables are cast to ``x``'s dtype first.
    """
    half = x.shape[-1] // 2
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def temporal_attention_step_ref(
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
    """One incremental step of the temporal (per-neuron, causal) attention.

    Args:
        q, k, v: ``[N, H, d]`` the new token's query, key and value (q and k
            not yet rotated).
        cos, sin: ``[1, d/2]`` rotary tables of the new token's position.
        k_cache, v_cache: ``[N, H, C, d]`` rotated keys and values; slot
            ``slot`` is overwritten in place with the new token's.
        slot: the cache slot of the new token, ``0 <= slot < C``.
        keep: ``[C]`` bool, the slots inside the query's window (at least
            one); ``None`` means every slot.

    Returns:
        The attention output ``[N, H, d]`` (before the output projection).
    """
    head_dim = q.shape[-1]
    q, k = rotary_ref(torch.stack((q, k)), cos, sin).unbind(0)  # one pass for both
    k_cache[:, :, slot] = k
    v_cache[:, :, slot] = v
    scores = torch.matmul(q[:, :, None], k_cache.transpose(-1, -2))[:, :, 0]  # [N, H, C]
    scores = scores * head_dim**-0.5
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    # Softmax spelled out: on CPU, torch.softmax over a last axis this short
    # (C ~ 12) is about five times slower than these three passes.
    probs = (scores - scores.amax(-1, keepdim=True)).exp_()
    probs = probs / probs.sum(-1, keepdim=True)
    return (probs[..., None] * v_cache).sum(2)  # [N, H, d]


def neural_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention across neurons: ``q, k, v [..., H, N, d]`` to the same shape.

    Softmax scale ``d**-0.5``, no mask; leading dimensions are independent.
    """
    # Contiguous 4D inputs get PyTorch's flash kernel on CPU; strided or 3D
    # ones fall back to a path several times slower.
    if q.ndim == 4:
        return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
    lead, tail = q.shape[:-3], q.shape[-3:]
    q, k, v = (t.contiguous().reshape(-1, *tail) for t in (q, k, v))  # [G, H, N, d]
    return F.scaled_dot_product_attention(q, k, v).view(*lead, *tail)
