"""CalM's continuous forecast head: the change from the last frame, from the raw context.

The token forecast sees the present only through a 7-bit code per 4
frames; a rig is scored on the continuous value. This head is the
continuous path beside the tokens: one small MLP shared by all neurons of a
session maps, per neuron and frame (all causal, all relative to z[i, t]),

    own past      z[i, t-C+1 .. t-1] - z[i, t]       [C - 1]
    own level     z[i, t]                             [1]
    CalM          token forecast mean[i, t, :H] - z[i, t]   [H]
                  hidden state[i, t] on its leading PCs     [r]

to the change z[i, t+1 .. t+H] - z[i, t], trained with MSE on the
session's own frames. It is fitted in seconds when a forecast calibration
is (:class:`calm_rt.live.forecast_calibration.ForecastCalibration`), which
blends it with the closed-form ridge by a weight chosen on held-out
windows: 0 when it does not help, so it never makes a calibration worse
there. Why an MLP and not more ridge features: calcium transients make the
best next value a nonlinear function of the recent trace (rise, decay and
noise at rest need different filters), and on the real 30 Hz suite2p
recording random nonlinear features in a ridge gained less than half of
what this head gains (docs/model.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["MIN_SAMPLES_PER_WEIGHT", "ContinuousHead", "head_inputs"]

# The head is fitted only on at least this many training samples (neuron x
# window) per weight of one member: a floor against fitting a nonlinear model
# to a handful of windows, not a guarantee. Just above it, on the 892-volume
# whole-brain recording (67 regions, one 150-frame validation block),
# validation chose the head (weight 0.6) and the test block scored worse than
# the ridge alone (0.228 against 0.262; docs/model.md). Left at 2 rather
# than raised to exclude that one recording.
MIN_SAMPLES_PER_WEIGHT = 2


def head_inputs(context: Tensor, calm_mean: Tensor, hidden_pcs: Tensor) -> Tensor:
    """``context [..., N, C]``, ``calm_mean [..., N, H]``, ``hidden_pcs [..., N, r]`` to ``[..., N, F]`` float32."""
    ctx = context.float()
    last = ctx[..., -1:]
    return torch.cat(
        [ctx[..., :-1] - last, last, calm_mean.float() - last, hidden_pcs.float()], dim=-1
    )


def _mlp(features: int, horizon: int, width: int) -> nn.Sequential:
    net = nn.Sequential(
        nn.Linear(features, width),
        nn.GELU(),
        nn.Linear(width, width),
        nn.GELU(),
        nn.Linear(width, horizon),
    )
    # Start at "no change" (copy-last), so early stopping can only move away from it.
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


class ContinuousHead(nn.Module):
    """The mean of ``members`` MLPs with two hidden layers of ``width`` GELU units, ``F -> H``.

    64 units: on the suite2p and hindbrain recordings 128 scored the same
    (0.392 / 0.446 against 0.390 / 0.449) at 2.8 times the per-frame work.

    Members differ only in their seed; averaging them halves the variance a
    few minutes of one session leave in any single fit.
    """

    def __init__(self, features: int, horizon: int, width: int = 64, members: int = 2) -> None:
        super().__init__()
        self.members = nn.ModuleList(_mlp(features, horizon, width) for _ in range(members))

    @staticmethod
    def weights(features: int, horizon: int, width: int = 64) -> int:
        """Trainable weights of one member (what the data must outnumber)."""
        return (features + 1) * width + (width + 1) * width + (width + 1) * horizon

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """``[..., F]`` (:func:`head_inputs`) to ``[..., H]`` float32."""
        x = x.float()
        return torch.stack([net(x) for net in self.members]).mean(0)

    @classmethod
    def fit(
        cls,
        x: Tensor,
        y: Tensor,
        x_val: Tensor,
        y_val: Tensor,
        steps: int = 2000,
        batch: int = 512,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> ContinuousHead:
        """Fit on ``x [S, F]``, ``y [S, H]``; each member keeps its step with the lowest validation MSE.

        Deterministic for a seed (its own generator: the process's RNG is
        left alone). Validation every ``steps // 10`` steps on at most 8192
        validation samples, so a long calibration costs no more than a short one.
        """
        x, y = x.float(), y.float()
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG
            head = cls(x.shape[-1], y.shape[-1])
        pick = torch.randperm(x_val.shape[0], generator=gen)[:8192]
        xv, yv = x_val[pick].float(), y_val[pick].float()
        for net in head.members:
            _train(net, x, y, xv, yv, steps, batch, lr, gen)
        head.eval()
        return head


def _train(
    net: nn.Sequential,
    x: Tensor,
    y: Tensor,
    xv: Tensor,
    yv: Tensor,
    steps: int,
    batch: int,
    lr: float,
    gen: torch.Generator,
) -> None:
    with torch.no_grad():
        for p in net[:-1].parameters():  # a seeded init, independent of torch's global RNG
            if p.dim() == 2:
                bound = 1.0 / math.sqrt(p.shape[1])
                p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
            else:
                p.zero_()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    every = max(1, steps // 10)
    best = float(yv.pow(2).mean())  # the zero-initialised output layer: copy-last
    best_state = {k: v.clone() for k, v in net.state_dict().items()}
    for step in range(steps):
        i = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=gen)
        with torch.enable_grad():  # the engine steps (and may fit) under no_grad
            loss = (net(x[i]) - y[i]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        if (step + 1) % every == 0:
            with torch.no_grad():
                err = float((net(xv) - yv).pow(2).mean())
            if err < best:
                best, best_state = err, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
