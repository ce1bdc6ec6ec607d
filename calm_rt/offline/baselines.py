"""The baselines a neuroscientist would otherwise use, fitted on the same split.

Forecasters map a context ``[B, N, C]`` of one session to ``[B, N, H]``;
decoders map a session's activity ``[T, N]`` to behaviour ``[T, B]``. All are
fitted on training frames only (the validation blocks choose ridge
penalties and early stopping) and scored on test blocks by
:mod:`calm_rt.offline.evaluate`.

- ``copy_last``: the last frame, repeated (the protocol's reference).
- ``linear_ar``: per-neuron ridge on the neuron's own past 48 frames and on
  the population's recent past (leading principal components), both taken
  relative to the last frame (:mod:`calm_rt.live.ridge`, the rule every ridge
  in calm-rt follows).
- ``poco_mlp``: a POCO-style learned forecaster (arXiv 2506.14957): each
  neuron's past through an MLP, conditioned (FiLM) on a population encoding
  that learned latent queries pool from all neurons with per-session unit
  embeddings; one model for all sessions.
- decoders ``ridge`` (lagged activity) and ``gru`` (a small recurrent net).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from calm_rt.data.splits import TRAIN, VAL, PreparedSession, Protocol
from calm_rt.errors import ConfigError
from calm_rt.live.forecast_calibration import population_loadings
from calm_rt.live.readout import DECODE_LAGS, lagged_activity
from calm_rt.live.ridge import RidgeModel, fit_ridge

__all__ = [
    "CopyLast",
    "GRUDecoder",
    "LinearAR",
    "POCOForecaster",
    "RidgeDecoder",
    "dense_window_starts",
    "windows_at",
]


def windows_at(
    z: np.ndarray, starts: np.ndarray, context: int, horizon: int
) -> tuple[Tensor, Tensor]:
    """Context ``[B, N, C]`` and target ``[B, N, H]`` windows at ``starts`` (NaN to 0)."""
    idx = starts[:, None] + np.arange(context + horizon)[None, :]
    w = np.nan_to_num(z[:, idx], nan=0.0).transpose(1, 0, 2)  # [B, N, C + H]
    w = torch.from_numpy(np.ascontiguousarray(w))
    return w[..., :context], w[..., context:]


class CopyLast:
    name = "copy_last"

    def fit(self, sessions: Sequence[PreparedSession], protocol: Protocol) -> None:
        self.horizon = protocol.horizon

    def predict(self, k: int, context: Tensor) -> Tensor:
        return context[..., -1:].expand(*context.shape[:-1], self.horizon)


class LinearAR:
    """Per-neuron ridge on its own past ``context`` frames and population PCs over the last ``pop_lags``.

    Both relative to the last frame; fitted on every ``stride``-th training window.
    """

    name = "linear_ar"

    def __init__(self, n_pcs: int = 8, pop_lags: int = 4, stride: int = 2) -> None:
        self.n_pcs, self.pop_lags, self.stride = n_pcs, pop_lags, stride

    def _features(self, k: int, context: Tensor) -> Tensor:
        # [B, N, C] -> [N, B, C - 1 + pcs * lags]: the change from the last frame is
        # forecast from the context relative to that frame, so a level that drifts
        # between training and test blocks does not pull the forecast back to the
        # training mean (it did, and lost to copy_last on short sessions).
        rel = context - context[..., -1:]
        pcs = torch.einsum("bnc,np->bpc", rel[..., -self.pop_lags :], self.loadings[k])
        pop = pcs.reshape(context.shape[0], -1)[:, None, :].expand(-1, context.shape[1], -1)
        return torch.cat([rel[..., :-1], pop], dim=-1).transpose(0, 1).double()

    def fit(self, sessions: Sequence[PreparedSession], protocol: Protocol) -> None:
        self.loadings: list[Tensor] = []
        self.models: list[RidgeModel] = []
        for k, s in enumerate(sessions):
            train = s.z[:, s.labels == TRAIN]
            self.loadings.append(population_loadings(train, self.n_pcs).float())
            # Every `stride`-th training window, not the protocol's test stride:
            # an 80-feature ridge needs the samples, and overlap costs nothing here.
            starts = dense_window_starts(s.labels, TRAIN, protocol)[:: max(1, self.stride)]
            ctx, tgt = windows_at(s.z, starts, protocol.context, protocol.horizon)
            x = self._features(k, ctx)
            y = (tgt - ctx[..., -1:]).transpose(0, 1).double()
            vs = protocol.window_starts(s.labels, VAL)
            if vs.size:
                vc, vt = windows_at(s.z, vs, protocol.context, protocol.horizon)
                xv, yv = self._features(k, vc), (vt - vc[..., -1:]).transpose(0, 1).double()
            else:
                xv = yv = None
            # One ridge per neuron [N, S, F], one penalty for the session.
            self.models.append(fit_ridge(x, y, xv, yv))

    def predict(self, k: int, context: Tensor) -> Tensor:
        delta = self.models[k].predict(self._features(k, context)).transpose(0, 1).float()
        return context[..., -1:] + delta


def dense_window_starts(labels: np.ndarray, split: int, protocol: Protocol) -> np.ndarray:
    """Every window start inside ``split`` blocks (used when stride skips them all)."""
    return Protocol(
        protocol.context, protocol.horizon, protocol.block_frames, protocol.pattern, 1
    ).window_starts(labels, split)


class _POCONet(nn.Module):
    def __init__(
        self, context: int, horizon: int, n_units: int, width: int = 64, latents: int = 8
    ) -> None:
        super().__init__()
        self.unit = nn.Embedding(n_units, width)
        self.encode = nn.Sequential(nn.Linear(context, width), nn.GELU(), nn.Linear(width, width))
        self.latents = nn.Parameter(torch.randn(latents, width) / math.sqrt(width))
        self.pool = nn.MultiheadAttention(width, 4, batch_first=True)
        self.mix = nn.TransformerEncoderLayer(
            width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.read = nn.MultiheadAttention(width, 4, batch_first=True)
        self.film = nn.Linear(width, 2 * width)
        self.forecast = nn.Sequential(nn.Linear(context, width), nn.GELU(), nn.Linear(width, width))
        self.out = nn.Sequential(nn.GELU(), nn.Linear(width, horizon))

    def forward(self, context: Tensor, units: Tensor) -> Tensor:
        b, _n, _ = context.shape
        tokens = self.encode(context) + self.unit(units)[None]  # [B, N, W]
        lat, _ = self.pool(self.latents.expand(b, -1, -1), tokens, tokens)
        lat = self.mix(lat)
        pop, _ = self.read(tokens, lat, lat)  # each neuron reads the population state
        gamma, beta = self.film(pop).chunk(2, dim=-1)
        h = self.forecast(context) * (1 + gamma) + beta
        return context[..., -1:] + self.out(h)


class POCOForecaster:
    """POCO-style multi-session forecaster, trained on training windows of all sessions.

    With ``runs`` > 1, that many models are trained from seeds ``seed``,
    ``seed + 1``, ..: one training run is a noisy measurement (on the
    hindbrain recording, the same seed scored 0.404 with one torch thread
    and 0.460 with two, from float rounding alone), so ``eval`` reports the
    mean score over runs with its range (:meth:`predict_runs`).
    """

    name = "poco_mlp"

    def __init__(
        self, steps: int = 1500, batch: int = 16, lr: float = 1e-3, seed: int = 0, runs: int = 1
    ) -> None:
        if runs < 1:
            raise ConfigError(f"POCO needs at least one training run, got runs={runs}")
        self.steps, self.batch, self.lr, self.seed, self.runs = steps, batch, lr, seed, runs

    def fit(self, sessions: Sequence[PreparedSession], protocol: Protocol) -> None:
        self.offsets = np.cumsum([0] + [s.n_neurons for s in sessions])
        self.nets = [self._fit_one(sessions, protocol, self.seed + r) for r in range(self.runs)]

    def _fit_one(
        self, sessions: Sequence[PreparedSession], protocol: Protocol, seed: int
    ) -> _POCONet:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        net = _POCONet(protocol.context, protocol.horizon, int(self.offsets[-1]))
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=1e-4)
        train = [dense_window_starts(s.labels, TRAIN, protocol) for s in sessions]
        val = [protocol.window_starts(s.labels, VAL) for s in sessions]
        usable = [k for k, t in enumerate(train) if t.size]
        best, best_state = math.inf, None
        for step in range(self.steps):
            k = usable[int(rng.integers(len(usable)))]
            starts = rng.choice(train[k], size=min(self.batch, train[k].size), replace=False)
            ctx, tgt = windows_at(sessions[k].z, starts, protocol.context, protocol.horizon)
            loss = F.mse_loss(net(ctx, self._units(k, sessions[k].n_neurons)), tgt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            if (step + 1) % 250 == 0 and any(v.size for v in val):
                with torch.no_grad():
                    errs = [
                        float(F.mse_loss(net(c, self._units(j, sessions[j].n_neurons)), t))
                        for j, v in enumerate(val)
                        if v.size
                        for c, t in [
                            windows_at(sessions[j].z, v[:64], protocol.context, protocol.horizon)
                        ]
                    ]
                if np.mean(errs) < best:
                    best, best_state = (
                        float(np.mean(errs)),
                        {n: p.clone() for n, p in net.state_dict().items()},
                    )
        if best_state is not None:
            net.load_state_dict(best_state)
        return net

    def _units(self, k: int, n: int) -> Tensor:
        return torch.arange(self.offsets[k], self.offsets[k] + n)

    @torch.no_grad()
    def predict(self, k: int, context: Tensor) -> Tensor:
        """The first run's forecast (one POCO model)."""
        return self.nets[0](context, self._units(k, context.shape[1]))

    @torch.no_grad()
    def predict_runs(self, k: int, context: Tensor) -> list[Tensor]:
        """Each run's forecast: scored separately, then averaged (not an ensemble)."""
        units = self._units(k, context.shape[1])
        return [net(context, units) for net in self.nets]


# ---------------------------------------------------------------------------
# Behaviour decoders (per session)


class RidgeDecoder:
    """Ridge from the activity at t and a few past lags to behaviour at t."""

    name = "ridge"

    def __init__(self, lags: tuple[int, ...] = DECODE_LAGS) -> None:
        self.lags = tuple(lags)

    def fit_predict(self, s: PreparedSession) -> np.ndarray:
        """Fit on train frames (penalty chosen on val frames); predict every frame ``[T, B]``."""
        return fit_predict_ridge(
            lagged_activity(s.z, self.lags).flatten(1).double().numpy(), s.behavior, s.labels
        )


def fit_predict_ridge(features: np.ndarray, y: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Ridge fitted on train frames (penalty chosen on val frames); predictions for all frames."""
    tr, va = labels == TRAIN, labels == VAL
    ok = np.isfinite(y).all(axis=1)
    x, yt = torch.from_numpy(features).double(), torch.from_numpy(np.nan_to_num(y)).double()
    fit_on, val_on = tr & ok, va & ok
    model = fit_ridge(x[fit_on], yt[fit_on], x[val_on], yt[val_on])
    return model.predict(x).float().numpy()


class GRUDecoder:
    """A one-layer GRU over the activity, trained on train-block sequences."""

    name = "gru"

    def __init__(
        self, hidden: int = 64, steps: int = 400, seq: int = 64, batch: int = 16, seed: int = 0
    ) -> None:
        self.hidden, self.steps, self.seq, self.batch, self.seed = hidden, steps, seq, batch, seed

    def fit_predict(self, s: PreparedSession) -> np.ndarray:
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        x = torch.from_numpy(np.nan_to_num(s.z.T)).float()  # [T, N]
        y_raw = np.nan_to_num(s.behavior)
        tr = s.labels == TRAIN
        mu, sd = y_raw[tr].mean(0), y_raw[tr].std(0) + 1e-6
        y = torch.from_numpy((y_raw - mu) / sd).float()
        gru = nn.GRU(x.shape[1], self.hidden, batch_first=True)
        head = nn.Linear(self.hidden, y.shape[1])
        opt = torch.optim.Adam([*gru.parameters(), *head.parameters()], lr=3e-3)
        run = np.zeros(len(tr), int)
        acc = 0
        for i, v in enumerate(tr):
            acc = acc + 1 if v else 0
            run[i] = acc
        ends = np.flatnonzero(run >= self.seq)
        for _ in range(self.steps):
            e = rng.choice(ends, size=self.batch)
            idx = e[:, None] - np.arange(self.seq - 1, -1, -1)[None, :]
            out, _ = gru(x[idx])
            loss = F.mse_loss(head(out), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            out, _ = gru(x[None])
            pred = head(out[0]).numpy()
        return pred * sd + mu
