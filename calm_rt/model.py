"""CalM: the NQ trace tokenizer, the dual-axis transformer (DAT) and its heads.

How a recording becomes predictions (shapes for one session of N neurons)::

    z [N, T]              normalised traces (calm_rt.data preprocessing)
    windows [N, T, P]     the last P frames before each frame (zeros before t=0)
    tokens [N, T]         NQ tokenizer: causal encoder + shared codebook argmin
    chains                tokens at stride P: chain phi holds frames phi, phi+P, ...
    DAT                   per chain: temporal attention (causal, sliding window of
                          C tokens, rotary), neural attention (all N at one step),
                          SwiGLU MLP
    logits [N, T, k, K]   multi-token heads: token m steps ahead = frames
                          t+(m-1)P+1 .. t+mP
    forecast [N, T, kP]   expected decoded window under each head's distribution,
                          with its standard deviation

Because a token summarises exactly the P frames that end at its frame, the
token m chain steps ahead *is* the next P frames, and the tokenizer's decoder
(a function of the code alone) turns a distribution over codes into a
forecast mean and spread with one ``[K, P]`` table. Every frame has a token,
so the streaming engine advances exactly one of the P chains per frame and
answers every frame.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from calm_rt import ops
from calm_rt.errors import ConfigError

__all__ = [
    "PRESETS",
    "BehaviorHead",
    "CalM",
    "CalMConfig",
    "DATConfig",
    "DualAxisTransformer",
    "NQTokenizer",
    "TokenizerConfig",
    "load_checkpoint",
    "save_checkpoint",
]


# ---------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TokenizerConfig:
    """Shape of the NQ tokenizer. ``patch`` frames per token, ``codebook_size`` codes."""

    patch: int = 4
    codebook_size: int = 128
    code_dim: int = 16
    width: int = 16
    layers: int = 1
    heads: int = 2


@dataclass(frozen=True)
class DATConfig:
    """Shape of the dual-axis transformer.

    ``context_tokens`` is the temporal attention window C per chain (the
    context in frames is ``C * patch``); ``horizon_tokens`` the number of
    multi-token heads k (the forecast horizon in frames is ``k * patch``).
    """

    width: int = 64
    layers: int = 3
    heads: int = 4
    context_tokens: int = 12
    horizon_tokens: int = 4
    mlp_ratio: float = 8 / 3
    neural_attention: bool = True
    rope_base: float = 1000.0


@dataclass(frozen=True)
class CalMConfig:
    """The whole model. ``behavior_names`` is empty until a head is fine-tuned."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    dat: DATConfig = field(default_factory=DATConfig)
    behavior_names: tuple[str, ...] = ()
    behavior_queries: int = 4

    def __post_init__(self) -> None:
        t, d = self.tokenizer, self.dat
        if t.patch < 1 or t.codebook_size < 2 or t.code_dim < 1:
            raise ConfigError("tokenizer needs patch >= 1, codebook_size >= 2, code_dim >= 1")
        if t.width % t.heads or d.width % d.heads:
            raise ConfigError("width must be divisible by heads")
        if (t.width // t.heads) % 2 or (d.width // d.heads) % 2:
            raise ConfigError("head dimension must be even for rotary embeddings")
        if d.context_tokens < 1 or d.horizon_tokens < 1:
            raise ConfigError("context_tokens and horizon_tokens must be >= 1")

    @property
    def patch(self) -> int:
        return self.tokenizer.patch

    @property
    def context_frames(self) -> int:
        return self.dat.context_tokens * self.tokenizer.patch

    @property
    def horizon_frames(self) -> int:
        return self.dat.horizon_tokens * self.tokenizer.patch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalMConfig:
        try:
            return cls(
                tokenizer=TokenizerConfig(**data["tokenizer"]),
                dat=DATConfig(**data["dat"]),
                behavior_names=tuple(data.get("behavior_names", ())),
                behavior_queries=int(data.get("behavior_queries", 4)),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"not a CalM configuration ({exc}); was it written by calm-rt?"
            ) from exc


PRESETS: dict[str, CalMConfig] = {
    # For tests: trains in seconds on a laptop core.
    "tiny": CalMConfig(
        tokenizer=TokenizerConfig(
            patch=4, codebook_size=64, code_dim=8, width=16, layers=1, heads=2
        ),
        dat=DATConfig(width=32, layers=2, heads=2, context_tokens=12, horizon_tokens=4),
    ),
    # The shipped default: a few MB, pretrains on 2 CPU cores in under an hour.
    "small": CalMConfig(),
}


# ---------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.w_gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


def rotary_cos_sin(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``[L, head_dim/2]`` for integer ``positions`` ``[L]``.

    Angles are computed in float64 so that a position of 10^6 (hours of
    recording) rotates as precisely as position 0: the streaming engine and
    the offline model then agree however long the session runs.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) by the angles. ``x [..., L, d]``, tables ``[L, d/2]``."""
    half = x.shape[-1] // 2
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


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


# ---------------------------------------------------------------------------
# NQ tokenizer

# Relative gap between the two nearest codes below which a window is
# re-tokenised in float64. float32 rounding is ~1e-7 relative, so 1e-5 is a
# 100x safety factor; 1e-4 sent a quarter of all windows down the slow path.
_TIE_MARGIN = 1e-5


def rotary_matrices(positions: Tensor, width: int, heads: int, base: float) -> Tensor:
    """Rotary embedding as matrices: ``x @ R[p]`` rotates ``x [..., W]`` to position ``p``.

    Same convention as :func:`apply_rotary` (each head's halves are the
    pair), block-diagonal over heads. Returns ``[L, W, W]`` float32.
    """
    d = width // heads
    cos, sin = rotary_cos_sin(positions, d, base)  # [L, d/2]
    rot = torch.zeros(len(positions), width, width, dtype=torch.float64)
    for h in range(heads):
        for i in range(d // 2):
            a, b = h * d + i, h * d + i + d // 2
            rot[:, a, a] = cos[:, i]
            rot[:, b, b] = cos[:, i]
            rot[:, a, b] = sin[:, i]
            rot[:, b, a] = -sin[:, i]
    return rot.float()


class _EncoderLayer(nn.Module):
    """Pre-norm transformer layer over the P samples of one window (rotary).

    Windows are a handful of samples. Everything is laid out position-major
    (``[P, M, W]``) so that each op is one large contiguous matrix product or
    elementwise pass, and the rotary rotation of each position is a matrix
    product. With ``last_only`` only the newest sample queries the window:
    the token is the window as seen from its present frame, at a quarter of
    the attention and MLP cost.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = RMSNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.norm2 = RMSNorm(width)
        self.mlp = SwiGLU(width, 2.0)

    def forward(self, x: Tensor, rot: Tensor, last_only: bool) -> Tensor:
        """``x [P, M, W]`` to ``[P, M, W]``, or ``[M, W]`` (newest sample) when ``last_only``."""
        p, m, w = x.shape
        hd = (self.heads, w // self.heads)
        wq, wk, wv = self.qkv.weight.chunk(3, dim=0)
        h = self.norm1(x)
        k = torch.bmm(h @ wk.T, rot).view(p, m, *hd)  # rotated to each sample's position
        v = (h @ wv.T).view(p, m, *hd)
        scale = hd[1] ** -0.5
        if last_only:
            q = (h[-1] @ wq.T @ rot[-1]).view(m, *hd)  # [M, H, d]
            probs = ((q[None] * k).sum(-1) * scale).softmax(dim=0)  # [P, M, H]
            att = (probs[..., None] * v).sum(0).view(m, w)
            x = x[-1] + self.proj(att)
        else:
            q = torch.bmm(h @ wq.T, rot).view(p, m, *hd)
            # The window ends at the present frame, so attending within it is causal.
            probs = ((q[:, None] * k[None]).sum(-1) * scale).softmax(dim=1)  # [Pq, Pk, M, H]
            att = (probs[..., None] * v[None]).sum(1).view(p, m, w)
            x = x + self.proj(att)
        return x + self.mlp(self.norm2(x))


class NQTokenizer(nn.Module):
    """VQ-VAE over single-neuron windows of P frames with one shared codebook.

    Encoder: causal convolution over the window's samples, transformer
    layers with rotary positions (the last queried from the newest sample),
    projection to the code space.
    Quantiser: nearest of K codes (Gumbel-softmax relaxation in training).
    Decoder: an MLP from a code to the P samples - a function of the code
    alone, so ``decode_table()`` is a ``[K, P]`` lookup table.
    """

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.conv = nn.Conv1d(1, w, kernel_size=3, padding=2)
        self.layers = nn.ModuleList(_EncoderLayer(w, config.heads) for _ in range(config.layers))
        self.norm = RMSNorm(w)
        self.to_code = nn.Linear(w, config.code_dim)
        self.codebook = nn.Parameter(torch.randn(config.codebook_size, config.code_dim) * 0.5)
        rot = rotary_matrices(torch.arange(config.patch), w, config.heads, 100.0)
        self.register_buffer("rope", rot, persistent=False)  # [P, W, W]
        self.decoder = nn.Sequential(
            nn.Linear(config.code_dim, 2 * w), nn.GELU(), nn.Linear(2 * w, 2 * w), nn.GELU(),
            nn.Linear(2 * w, config.patch),
        )  # fmt: skip

    def forward(self, windows: Tensor) -> Tensor:
        """Encode ``[M, P]`` windows (oldest sample first) to ``[M, code_dim]`` vectors."""
        # Causal convolution (kernel 3, left padding) as one product: sample i sees inputs <= i.
        taps = F.pad(windows, (2, 0)).unfold(1, 3, 1).transpose(0, 1)  # [P, M, 3]
        h = taps @ self.conv.weight[:, 0].T + self.conv.bias  # [P, M, W]
        for i, layer in enumerate(self.layers):
            h = layer(h, self.rope, last_only=i == len(self.layers) - 1)
        if not self.layers:
            h = h[-1]
        return self.to_code(self.norm(h))

    @torch.no_grad()
    def tokenize_windows(self, windows: Tensor, exact: bool = True) -> Tensor:
        """Hard token ids ``[M]`` for windows ``[M, P]`` (nearest code, ties to the lowest id).

        A window must get the same token whether it arrives alone (streaming)
        or in a batch of a million (offline), but float32 rounding differs
        between batch shapes. With ``exact=True`` every window whose two
        nearest codes are closer than a safety margin (far above float32
        rounding, rare in practice) is re-tokenised in float64, where batch
        shape no longer matters. ``exact=False`` (training data) skips that.
        """
        codes = self(windows.float())
        ids, _, margin = ops.codebook_lookup(codes, self.codebook, with_margin=True)
        if exact:
            dist_scale = 1.0 + codes.pow(2).sum(-1) + self.codebook.pow(2).sum(-1).max()
            close = torch.nonzero(margin < _TIE_MARGIN * dist_scale).flatten()
            if close.numel():
                twin = self._float64_twin()
                ids[close] = ops.codebook_lookup(twin(windows[close].double()), twin.codebook)[0]
        return ids

    def _float64_twin(self) -> NQTokenizer:
        """A float64 copy for exact tokenisation, rebuilt only when the weights change."""
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        twin = self.__dict__.get("_twin")
        if twin is None or self.__dict__.get("_twin_key") != key:
            twin = NQTokenizer(self.config).to(self.codebook.device)
            twin.load_state_dict(self.state_dict())
            twin = twin.double().eval()
            # Kept out of the module tree so it is neither saved nor trained.
            self.__dict__["_twin"], self.__dict__["_twin_key"] = twin, key
        return twin

    def quantize_train(self, z: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        """Training quantiser on encodings ``z [M, D]``.

        Returns the reconstruction ``[M, P]`` from a hard Gumbel-softmax sample
        (straight-through gradients reach the encoder and the codebook), the
        nearest-code ids ``[M]`` (for usage statistics) and the commitment loss.
        """
        dist = (z * z).sum(-1, keepdim=True) - 2 * z @ self.codebook.T + (self.codebook**2).sum(-1)
        one_hot = F.gumbel_softmax(-dist, tau=temperature, hard=True)
        zq = one_hot @ self.codebook
        commit = F.mse_loss(z, zq.detach())
        return self.decoder(zq), dist.detach().argmin(-1), commit

    def orthogonality_loss(self) -> Tensor:
        """Mean squared cosine similarity between distinct codes (spreads the codebook)."""
        e = F.normalize(self.codebook, dim=-1)
        gram = e @ e.T
        k = gram.shape[0]
        off = gram - torch.eye(k, device=gram.device, dtype=gram.dtype)
        return (off**2).sum() / (k * (k - 1))

    def decode_table(self) -> Tensor:
        """``[K, P]``: the window each code decodes to."""
        return self.decoder(self.codebook)


def frame_windows(z: Tensor, patch: int) -> Tensor:
    """``[..., T]`` traces to ``[..., T, P]`` windows ending at each frame (zeros before 0)."""
    padded = F.pad(z, (patch - 1, 0))
    return padded.unfold(-1, patch, 1)


# ---------------------------------------------------------------------------
# Dual-axis transformer


class TemporalAttention(nn.Module):
    """Causal self-attention along each neuron's token chain (rotary, sliding window)."""

    def __init__(self, config: DATConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.head_dim = config.width // config.heads
        self.window = config.context_tokens
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=False)
        self.proj = nn.Linear(config.width, config.width, bias=False)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [..., L, W]`` to rotated q, k and v ``[..., H, L, d]``."""
        *lead, length, _ = x.shape
        qkv = self.qkv(x).view(*lead, length, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(-3)  # [..., L, H, d]
        q, k, v = (t.transpose(-2, -3) for t in (q, k, v))  # [..., H, L, d]
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def step(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        slot: int,
        keep: Tensor | None,
    ) -> Tensor:
        """One new token per neuron: ``x [N, W]``; caches ``[N, H, C, d]`` updated at ``slot``.

        The query attends over the cached tokens that ``keep [C]`` (bool)
        marks as inside its window - the last C positions of the chain,
        itself included - exactly the window of :meth:`forward`. ``None``
        means every slot.
        """
        n, w = x.shape
        q, k, v = (self.qkv(x).view(n, 3, self.heads, self.head_dim)).unbind(1)  # [N, H, d]
        # Rotary of q and k, cache append at slot, softmax over the kept slots.
        att = ops.temporal_attention_step(q, k, v, cos, sin, k_cache, v_cache, slot, keep)
        return self.proj(att.reshape(n, w))  # att [N, H, d]

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        *lead, length, width = x.shape
        q, k, v = self.project(x, cos, sin)
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

    def step(self, x: Tensor) -> Tensor:
        """One time step: ``x [N, W]`` to ``[N, W]``."""
        n, w = x.shape
        qkv = self.qkv(x).view(n, 3, self.heads, self.head_dim).permute(1, 2, 0, 3)
        # One copy makes q, k and v contiguous [H, N, d] (what fast attention wants).
        q, k, v = qkv.contiguous().unbind(0)
        out = ops.neural_attention(q, k, v)  # [H, N, d]
        return self.proj(out.transpose(0, 1).reshape(n, w))

    def forward(self, x: Tensor, time_block: int = 64) -> Tensor:
        """``x [B, N, L, W]`` to the same shape."""
        b, n, length, width = x.shape
        xt = x.transpose(1, 2)  # [B, L, N, W]
        qkv = self.qkv(xt).view(b, length, n, 3, self.heads, self.head_dim)
        q, k, v = (
            t.reshape(b * length, self.heads, n, self.head_dim)
            for t in qkv.permute(3, 0, 1, 4, 2, 5)
        )
        out = torch.empty_like(q)  # [B * L, H, N, d]
        for start in range(0, b * length, time_block):  # bounds the [N, N] score memory
            sl = slice(start, start + time_block)
            out[sl] = F.scaled_dot_product_attention(q[sl], k[sl], v[sl])
        out = out.view(b, length, self.heads, n, self.head_dim)
        out = out.permute(0, 3, 1, 2, 4).reshape(b, n, length, width)
        return self.proj(out)


class DATBlock(nn.Module):
    def __init__(self, config: DATConfig) -> None:
        super().__init__()
        self.norm_t = RMSNorm(config.width)
        self.temporal = TemporalAttention(config)
        self.norm_n = RMSNorm(config.width) if config.neural_attention else None
        self.neural = NeuralAttention(config) if config.neural_attention else None
        self.norm_m = RMSNorm(config.width)
        self.mlp = SwiGLU(config.width, config.mlp_ratio)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.temporal(self.norm_t(x), cos, sin)
        if self.neural is not None:
            x = x + self.neural(self.norm_n(x))
        return x + self.mlp(self.norm_m(x))


class DualAxisTransformer(nn.Module):
    """Token chains ``[B, N, L]`` to hidden states ``[B, N, L, W]`` and logits ``[B, N, L, k, K]``."""

    def __init__(self, config: DATConfig, codebook_size: int) -> None:
        super().__init__()
        self.config = config
        self.codebook_size = codebook_size
        self.embed = nn.Embedding(codebook_size, config.width)
        self.blocks = nn.ModuleList(DATBlock(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.width)
        self.heads = nn.Linear(config.width, config.horizon_tokens * codebook_size)

    def rotary(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return rotary_cos_sin(
            positions, self.config.width // self.config.heads, self.config.rope_base
        )

    def forward(self, tokens: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        length = tokens.shape[-1]
        if positions is None:
            positions = torch.arange(length, device=tokens.device)
        cos, sin = self.rotary(positions)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        hidden = self.norm(x)
        return hidden, self.logits(hidden)

    def logits(self, hidden: Tensor) -> Tensor:
        """``[..., W]`` to ``[..., k, K]`` (token m steps ahead along the chain)."""
        out = self.heads(hidden)
        return out.view(*hidden.shape[:-1], self.config.horizon_tokens, self.codebook_size)


class BehaviorHead(nn.Module):
    """Attention pooling over neurons, then an MLP: ``[B, N, W]`` to ``[B, n_behavior]``.

    A few learned queries attend over the neurons' hidden states, so the head
    works for any number of neurons in any order.
    """

    def __init__(self, width: int, n_behavior: int, queries: int = 4) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(queries, width) / math.sqrt(width))
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(queries * width, width), nn.GELU(), nn.Linear(width, n_behavior)
        )

    def forward(self, hidden: Tensor) -> Tensor:
        scores = torch.einsum("qw,...nw->...qn", self.queries, self.key(hidden)) / math.sqrt(
            hidden.shape[-1]
        )
        pooled = torch.einsum("...qn,...nw->...qw", scores.softmax(-1), self.value(hidden))
        return self.mlp(pooled.flatten(-2))


# ---------------------------------------------------------------------------
# The model


@dataclass
class OfflineOutput:
    """Per-frame outputs of :meth:`CalM.run_offline` for one session.

    ``forecast[:, t, h]`` predicts frame ``t + 1 + h`` from frames ``<= t``.
    """

    tokens: Tensor  # [N, T] int64
    forecast: Tensor  # [N, T, H]
    forecast_std: Tensor  # [N, T, H]
    hidden: Tensor  # [N, T, W]
    behavior: Tensor | None  # [T, B] in behaviour units, when a head is fitted


class CalM(nn.Module):
    """Tokenizer + DAT + heads, with the offline (whole-recording) forward pass.

    ``behavior_mean`` / ``behavior_std`` buffers map the head's standardised
    output back to behaviour units.
    """

    def __init__(self, config: CalMConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = NQTokenizer(config.tokenizer)
        self.dat = DualAxisTransformer(config.dat, config.tokenizer.codebook_size)
        n_beh = len(config.behavior_names)
        self.behavior_head = (
            BehaviorHead(config.dat.width, n_beh, config.behavior_queries) if n_beh else None
        )
        self.register_buffer("behavior_mean", torch.zeros(n_beh))
        self.register_buffer("behavior_std", torch.ones(n_beh))

    def with_behavior(self, names: tuple[str, ...]) -> CalM:
        """A copy with a fresh behaviour head for ``names`` (backbone shared by value)."""
        model = CalM(replace(self.config, behavior_names=tuple(names)))
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("behavior")}
        model.load_state_dict(state, strict=False)
        return model

    # -- tokens and forecasts -------------------------------------------------

    def tokenize(self, z: Tensor) -> Tensor:
        """Traces ``[N, T]`` (NaN already replaced) to token ids ``[N, T]``."""
        windows = frame_windows(z, self.config.patch)  # [N, T, P]
        n, t, p = windows.shape
        return self.tokenizer.tokenize_windows(windows.reshape(n * t, p)).view(n, t)

    def forecast_from_logits(
        self, logits: Tensor, table: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``[..., k, K]`` logits to forecast mean and s.d. ``[..., k * P]``.

        ``table`` is the tokenizer's ``[K, P]`` decode table (computed when
        not given; the streaming engine passes its cached copy).
        """
        if table is None:
            table = self.tokenizer.decode_table()
        probs = logits.softmax(-1)
        mean = probs @ table  # [..., k, P]
        second = probs @ (table * table)
        std = (second - mean * mean).clamp_min(0).sqrt()
        return mean.flatten(-2), std.flatten(-2)

    @torch.no_grad()
    def run_offline(self, z: Tensor) -> OfflineOutput:
        """Run the model over a whole recording, as the streaming engine would.

        ``z [N, T]`` normalised traces, NaN allowed (treated as 0, the running
        mean). Every frame gets outputs computed from frames up to it only.
        """
        z = torch.nan_to_num(z.float(), nan=0.0)
        n, t = z.shape
        p = self.config.patch
        tokens = self.tokenize(z)
        h = self.config.horizon_frames
        forecast = torch.empty(n, t, h)
        spread = torch.empty(n, t, h)
        hidden = torch.empty(n, t, self.config.dat.width)
        for phase in range(min(p, t)):
            chain = tokens[:, phase::p]  # [N, L]
            hid, logits = self.dat(chain[None])
            mean, std = self.forecast_from_logits(logits[0])
            forecast[:, phase::p] = mean
            spread[:, phase::p] = std
            hidden[:, phase::p] = hid[0]
        behavior = None
        if self.behavior_head is not None:
            behavior = (
                self.behavior_head(hidden.transpose(0, 1)) * self.behavior_std + self.behavior_mean
            )
        return OfflineOutput(tokens, forecast, spread, hidden, behavior)

    @torch.no_grad()
    def forecast_windows(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Forecast after each context window: ``z [B, N, Tc]`` to mean, s.d. ``[B, N, H]``.

        Uses only the window (the evaluation protocol's fixed context): the
        chain ending at the window's last frame, at most C tokens.
        """
        z = torch.nan_to_num(z.float(), nan=0.0)
        b, n, tc = z.shape
        p = self.config.patch
        ends = torch.arange(tc - 1, -1, -p).flip(0)[-self.config.dat.context_tokens :]
        windows = frame_windows(z, p)[:, :, ends]  # [B, N, L, P]
        ids = self.tokenizer.tokenize_windows(windows.reshape(-1, p)).view(b, n, -1)
        _, logits = self.dat(ids)
        return self.forecast_from_logits(logits[:, :, -1])


# ---------------------------------------------------------------------------
# Checkpoints: safetensors weights + a JSON config, never pickle


def save_checkpoint(model: CalM, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / "model.safetensors")
    meta = {
        "format": "calm-rt-checkpoint",
        "version": 1,
        "config": model.config.to_dict(),
        **(extra or {}),
    }
    (folder / "config.json").write_text(json.dumps(meta, indent=2))
    return folder


def load_checkpoint(folder: str | Path | None = None) -> tuple[CalM, dict[str, Any]]:
    """Load a checkpoint folder (the shipped default when None); returns model and metadata."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else default_checkpoint_path()
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg_path.exists() or not weights.exists():
        raise ConfigError(
            f"{folder} is not a calm-rt checkpoint (needs config.json and model.safetensors); "
            "train one with `calm-rt pretrain` or omit --checkpoint for the shipped default"
        )
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != "calm-rt-checkpoint":
        raise ConfigError(f"{cfg_path} is not a calm-rt checkpoint config")
    model = CalM(CalMConfig.from_dict(meta["config"]))
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{weights} does not match its config (missing {missing}, unexpected {unexpected})"
        )
    model.eval()
    return model, meta


def default_checkpoint_path() -> Path:
    """The checkpoint shipped inside the package."""
    return Path(__file__).resolve().parent / "checkpoints" / "default"
