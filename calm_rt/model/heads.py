"""Read-outs of the DAT's hidden states: the token forecast, the continuous forecast, behaviour."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BehaviorHead", "ContinuousForecastHead", "token_forecast"]


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


class ContinuousForecastHead(nn.Module):
    """The forecast a rig is scored on: the change from the last frame, with its s.d.

    POCO's recipe (a per-neuron MLP over the neuron's own raw context,
    modulated by a population encoding) with CalM's per-neuron hidden state as
    the modulation: the hidden state carries the population through neural
    attention and the longer past through the token chain. Per neuron::

        x    = [context[:-1] - context[-1], context[-1]]          [C]
        u    = GELU(A x) * (1 + gamma(hidden)) + beta(hidden)      [F]  (FiLM)
        u    = GELU(B u)
        mean = context[-1] + D_mu u,   s.d. = exp(D_sigma u)       [H] each

    Trained with MSE on the mean and a Gaussian likelihood on the s.d. (whose
    gradient does not reach the mean), so the s.d. is the residual the model
    expects, tokens or not.
    """

    def __init__(self, context: int, horizon: int, width: int, features: int) -> None:
        super().__init__()
        self.context, self.horizon = context, horizon
        self.inp = nn.Linear(context, features)
        self.film = nn.Linear(width, 2 * features)
        self.mid = nn.Linear(features, features)
        self.out = nn.Linear(features, 2 * horizon)

    def forward(self, context: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """``context [..., C]`` (oldest first, 0 where missing), ``hidden [..., W]`` to mean, s.d. ``[..., H]``."""
        last = context[..., -1:]
        x = torch.cat([context[..., :-1] - last, last], dim=-1)
        gamma, beta = self.film(hidden).chunk(2, dim=-1)
        u = F.gelu(self.inp(x)) * (1.0 + gamma) + beta
        mu, log_sd = self.out(F.gelu(self.mid(u))).chunk(2, dim=-1)
        return last + mu, log_sd.clamp(-7.0, 4.0).exp()


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
