"""Read-outs of the DAT's hidden states: the token forecast and the behaviour head."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["BehaviorHead", "token_forecast"]


def token_forecast(logits: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    """``[..., k, K]`` logits to forecast mean and s.d. ``[..., k * P]``.

    The token m chain steps ahead is the P frames after the m-1 before it,
    and ``table [K, P]`` (the tokenizer's decode table) is what each code
    decodes to: the forecast is the expected decoded window under each
    head's distribution, its spread the mixture's s.d.
    """
    probs = logits.softmax(-1)
    mean = probs @ table  # [..., k, P]
    second = probs @ (table * table)
    std = (second - mean * mean).clamp_min(0).sqrt()
    return mean.flatten(-2), std.flatten(-2)


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
