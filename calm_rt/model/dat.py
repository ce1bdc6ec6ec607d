"""The dual-axis transformer (DAT): temporal attention per neuron, neural attention per step.

One block forward serves both ways the model runs:

* **offline**, over whole token chains ``x [B, N, L, W]``: causal sliding-window
  attention along each neuron's chain (``cache=None``);
* **per frame**, one new token per neuron ``x [1, N, 1, W]``: the new key and
  value go into the chain's ring :class:`KVCache` and the query attends over
  it (``cache=`` a :class:`CacheSlot`).

Only the temporal attention's primitive differs between the two (a sliding
window over the sequence, or the ring of the last C tokens, which is the
same window); the norms, residuals, neural attention and MLP are the same
code. Shapes: B batch, N neurons, L chain length, W width, H heads, d head
width, C the temporal window in tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from calm_rt.model import ops
from calm_rt.model.config import DATConfig
from calm_rt.model.layers import RMSNorm, SwiGLU, apply_rotary, rotary_cos_sin

__all__ = [
    "CacheSlot",
    "DATBlock",
    "DualAxisTransformer",
    "KVCache",
    "NeuralAttention",
    "TemporalAttention",
    "sliding_window_attention",
]


class DualAxisTransformer(nn.Module):
    """Token chains ``[B, N, L]`` to hidden states ``[B, N, L, W]`` and logits ``[B, N, L, k, K]``.

    With ``config.value_input`` each token's input is its embedding plus a
    linear map of the raw window ``values [..., P]`` it summarises.
    """

    def __init__(self, config: DATConfig, codebook_size: int, patch: int = 4) -> None:
        super().__init__()
        self.config = config
        self.codebook_size = codebook_size
        self.embed = nn.Embedding(codebook_size, config.width)
        self.value_in = nn.Linear(patch, config.width) if config.value_input else None
        self.blocks = nn.ModuleList(DATBlock(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.width)
        self.heads = nn.Linear(config.width, config.horizon_tokens * codebook_size)

    def rotary(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """float64 cos/sin tables ``[L, d/2]`` of chain ``positions`` ``[L]``."""
        return rotary_cos_sin(
            positions, self.config.width // self.config.heads, self.config.rope_base
        )

    def embed_inputs(self, tokens: Tensor, values: Tensor | None) -> Tensor:
        """``tokens [...]`` and their raw windows ``values [..., P]`` to inputs ``[..., W]``."""
        x = self.embed(tokens)
        if self.value_in is None:
            return x
        if values is None:
            raise ValueError("this model reads each token's raw window: pass values [..., P]")
        return x + self.value_in(values.to(x.dtype))

    def forward(
        self, tokens: Tensor, positions: Tensor | None = None, values: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Whole chains: ``tokens [B, N, L]`` (and ``values [B, N, L, P]``) to hidden ``[B, N, L, W]`` and logits."""
        length = tokens.shape[-1]
        if positions is None:
            positions = torch.arange(length, device=tokens.device)
        cos, sin = self.rotary(positions)
        x = self.embed_inputs(tokens, values)  # [B, N, L, W]
        for block in self.blocks:
            x = block(x, cos, sin)
        hidden = self.norm(x)
        return hidden, self.logits(hidden)

    def step(
        self,
        tokens: Tensor,
        position: int,
        cache: KVCache,
        chain: int,
        step_layers: Callable[..., Tensor] | None = None,
        values: Tensor | None = None,
    ) -> Tensor:
        """Advance chain ``chain`` by one token per neuron: ``tokens [N]`` to hidden ``[N, W]``.

        ``position`` is the token's index along its chain; the chain's KV
        cache is updated in place. ``values [N, P]``: the raw windows the
        tokens summarise (models with ``value_input``). Equal to the last
        position of :meth:`forward` over the chain's last C tokens.
        ``step_layers`` replaces :meth:`step_layers` (the streaming engine
        passes its compiled copy).
        """
        slot, keep = cache.advance(chain, position)
        device = cache.k.device
        cos, sin = (t.float() for t in self.rotary(torch.tensor([position], device=device)))
        layers = [cache.layer(layer, chain) for layer in range(len(self.blocks))]
        return (step_layers or self.step_layers)(tokens, values, cos, sin, layers, slot, keep)

    def step_layers(
        self,
        tokens: Tensor,
        values: Tensor | None,
        cos: Tensor,
        sin: Tensor,
        caches: list[tuple[Tensor, Tensor]],
        slot: int,
        keep: Tensor | None,
    ) -> Tensor:
        """The tensor part of :meth:`step` (what ``EngineConfig.compile`` compiles).

        ``caches``: per layer the chain's key and value cache ``[N, H, C, d]``,
        written at ``slot``; ``keep`` as :meth:`KVCache.advance` returns it.
        """
        x = self.embed_inputs(tokens, values)[None, :, None]  # [1, N, 1, W]
        for block, (k_cache, v_cache) in zip(self.blocks, caches, strict=True):
            x = block(x, cos, sin, CacheSlot(k_cache, v_cache, slot, keep))
        return self.norm(x[0, :, 0])

    def logits(self, hidden: Tensor) -> Tensor:
        """``[..., W]`` to ``[..., k, K]`` (token m steps ahead along the chain)."""
        out = self.heads(hidden)
        return out.view(*hidden.shape[:-1], self.config.horizon_tokens, self.codebook_size)


class DATBlock(nn.Module):
    """Pre-norm residual block: temporal attention, neural attention, SwiGLU MLP."""

    def __init__(self, config: DATConfig) -> None:
        super().__init__()
        self.norm_t = RMSNorm(config.width)
        self.temporal = TemporalAttention(config)
        self.norm_n = RMSNorm(config.width) if config.neural_attention else None
        self.neural = NeuralAttention(config) if config.neural_attention else None
        self.norm_m = RMSNorm(config.width)
        self.mlp = SwiGLU(config.width, config.mlp_ratio)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: CacheSlot | None = None
    ) -> Tensor:
        """``x [B, N, L, W]`` to the same shape (``cache``: the per-frame step, B = L = 1)."""
        x = x + self.temporal(self.norm_t(x), cos, sin, cache)
        if self.neural is not None:
            x = x + self.neural(self.norm_n(x))
        return x + self.mlp(self.norm_m(x))


class TemporalAttention(nn.Module):
    """Causal self-attention along each neuron's token chain (rotary, sliding window of C)."""

    def __init__(self, config: DATConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.head_dim = config.width // config.heads
        self.window = config.context_tokens
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=False)
        self.proj = nn.Linear(config.width, config.width, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: CacheSlot | None = None
    ) -> Tensor:
        *lead, length, width = x.shape
        qkv = self.qkv(x).view(*lead, length, 3, self.heads, self.head_dim)
        if cache is not None:
            # One new token per neuron: rotary of q and k, cache append at the
            # slot and softmax over the kept slots, in one op.
            q, k, v = qkv[0, :, 0].unbind(1)  # [N, H, d]
            att = ops.temporal_attention_step(
                q, k, v, cos, sin, cache.k, cache.v, cache.slot, cache.keep
            )
            return self.proj(att.reshape(x.shape))
        q, k, v = (t.transpose(-2, -3) for t in qkv.unbind(-3))  # [..., H, L, d]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        flat = [t.reshape(-1, self.heads, length, self.head_dim) for t in (q, k, v)]
        out = sliding_window_attention(*flat, window=self.window)
        out = out.view(*lead, self.heads, length, self.head_dim).transpose(-2, -3)
        return self.proj(out.reshape(*lead, length, width))


class NeuralAttention(nn.Module):
    """Bidirectional self-attention across all neurons at one time step.

    No positional information over neurons: the model is equivariant to
    their order, and any number of neurons works.
    """

    def __init__(self, config: DATConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.head_dim = config.width // config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=False)
        self.proj = nn.Linear(config.width, config.width, bias=False)

    def forward(self, x: Tensor, time_block: int = 64) -> Tensor:
        """``x [B, N, L, W]`` to the same shape."""
        b, n, length, width = x.shape
        qkv = self.qkv(x.transpose(1, 2)).view(b * length, n, 3, self.heads, self.head_dim)
        # One copy makes q, k and v contiguous [B*L, H, N, d] (what fast attention wants).
        q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        if b * length <= time_block:
            out = ops.neural_attention(q, k, v)
        else:
            out = torch.empty_like(q)
            for start in range(0, b * length, time_block):  # bounds the [N, N] score memory
                sl = slice(start, start + time_block)
                out[sl] = ops.neural_attention(q[sl], k[sl], v[sl])
        out = out.view(b, length, self.heads, n, self.head_dim)
        return self.proj(out.permute(0, 3, 1, 2, 4).reshape(b, n, length, width))


class CacheSlot(NamedTuple):
    """One layer's cache of one chain for one step: where the new token goes, what it sees."""

    k: Tensor  # [N, H, C, d] rotated keys (written in place at ``slot``)
    v: Tensor  # [N, H, C, d] values
    slot: int
    keep: Tensor | None  # [C] bool: slots inside the window; None: all of them


class KVCache(nn.Module):
    """Preallocated ring buffers of the last C keys and values of every chain and layer.

    ``k, v [layers, chains, N, H, C, d]``; ``slot_pos [chains, C]`` is the
    chain position each slot holds (``-C - 1``: empty), so a step attends
    exactly to the positions inside its window, as the offline forward does.
    Memory is fixed at construction and flat over a session of any length.
    """

    def __init__(
        self,
        layers: int,
        chains: int,
        neurons: int,
        heads: int,
        window: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.window = window
        shape = (layers, chains, neurons, heads, window, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        # Host-side bookkeeping: which chain position each slot holds.
        self.slot_pos = torch.full((chains, window), -window - 1, dtype=torch.int64)

    def reset(self) -> None:
        """Empty every slot (a new session, or a gap too long to bridge)."""
        self.k.zero_()
        self.v.zero_()
        self.slot_pos.fill_(-self.window - 1)

    def advance(self, chain: int, position: int) -> tuple[int, Tensor | None]:
        """Claim the slot of ``position`` on ``chain``; returns it and the window mask.

        The mask is None once the window is full (almost every frame), so
        the step needs no masking at all.
        """
        slot = position % self.window
        self.slot_pos[chain, slot] = position
        keep = self.slot_pos[chain] > position - self.window  # [C]: inside the window
        if bool(keep.all()):
            return slot, None
        return slot, keep.to(self.k.device)

    def layer(self, layer: int, chain: int) -> tuple[Tensor, Tensor]:
        """Views ``[N, H, C, d]`` of one layer's keys and values of one chain."""
        return self.k[layer, chain], self.v[layer, chain]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.slot_pos))


def sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, block: int = 128
) -> Tensor:
    """Causal attention where query i sees keys ``[i - window + 1, i]``.

    ``q, k, v [B, H, L, d]``. Long sequences are processed in query blocks so
    memory stays ``O(L * (block + window))`` instead of ``O(L^2)``.
    """
    length = q.shape[-2]
    out = torch.empty_like(q)
    for start in range(0, length, block):
        stop = min(start + block, length)
        k_lo = max(0, start - window + 1)
        qi = torch.arange(start, stop, device=q.device)[:, None]
        kj = torch.arange(k_lo, stop, device=q.device)[None, :]
        allowed = (kj <= qi) & (kj > qi - window)  # [Lq, Lk]
        out[..., start:stop, :] = F.scaled_dot_product_attention(
            q[..., start:stop, :], k[..., k_lo:stop, :], v[..., k_lo:stop, :], attn_mask=allowed
        )
    return out
