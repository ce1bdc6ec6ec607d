"""The NQ tokenizer: single-neuron trace windows to one shared discrete vocabulary.

A token summarises the P frames that end at its frame (a causal encoder over
the window), so every frame has a token and a token m chain steps ahead *is*
the next P frames. The decoder is a function of the code alone, so
``decode_table()`` is a ``[K, P]`` lookup table that turns a distribution
over codes into a forecast mean and spread.

    windows [M, P] --conv + rotary transformer (newest sample queries)-->
    codes [M, D] --nearest of K shared codes (Gumbel-softmax in training)--> ids [M]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from calm_rt.model import ops
from calm_rt.model.config import TokenizerConfig
from calm_rt.model.layers import RMSNorm, SwiGLU, rotary_cos_sin

__all__ = ["NQTokenizer", "frame_windows", "rotary_matrices"]


# Relative gap between the two nearest codes below which a window is
# re-tokenised in float64. float32 rounding is ~1e-7 relative, so 1e-5 is a
# 100x safety factor; 1e-4 sent a quarter of all windows down the slow path.
_TIE_MARGIN = 1e-5
# Up to this many windows on a GPU, the tie re-check runs on every row (no
# host sync); beyond (offline batches) only the near-ties are gathered.
_SYNC_FREE_ROWS = 1 << 16


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
            near = margin < _TIE_MARGIN * dist_scale  # [M] bool
            if near.device.type != "cpu" and near.shape[0] <= _SYNC_FREE_ROWS:
                # On a GPU (the live step: one window per neuron) every row is
                # also looked up in float64 and the near-ties take that answer:
                # a data-dependent row count would be a host sync mid-frame.
                twin = self._float64_twin()
                exact_ids = ops.codebook_lookup(twin(windows.double()), twin.codebook)[0]
                return torch.where(near, exact_ids, ids)
            close = torch.nonzero(near).flatten()
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
