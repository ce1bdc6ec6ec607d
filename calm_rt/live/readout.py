"""Closed-form ridge readout of behaviour from CalM's forecasts, its population state and the activity.

This is the fast calibration path: from a few minutes of labelled behaviour
it fits in well under a second, so the live service can calibrate at the
start of a session. Features at frame t (all causal: made from frames up
to t):

* per neuron, concatenated over neurons: CalM's forecast of the neuron for
  :data:`DECODE_HORIZONS` frames ahead (a denoised summary of the dynamics
  the neuron is in) and its normalised activity now and :data:`DECODE_LAGS`
  frames back (the supervised ``ridge`` baseline's features, so the readout
  adds what CalM knows on top of them);
* CalM's population state: its hidden states averaged over neurons ``[W]``
  (what neural attention gathered from the whole population).

The penalty is chosen by blocked cross-validation in time and the readout
refitted on all frames (:mod:`calm_rt.live.ridge`, the same ridge the
baselines use).

Per-neuron hidden states were tried first: their 8 PCs per neuron added more
features than a few minutes of behaviour can fit and decoded worse than the
lagged activity alone. Their mean over neurons is one small vector and
decoded best of what was tried (lags of it helped the simulated animals a
little and hurt the hindbrain recording; docs/model.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from calm_rt.errors import DataError
from calm_rt.live.ridge import fit_ridge, fit_ridge_cv, r2_score

__all__ = ["DECODE_HORIZONS", "DECODE_LAGS", "RidgeReadout", "lagged_activity"]

DECODE_LAGS: tuple[int, ...] = (0, 1, 2, 4, 8, 16)  # frames back; the ridge baseline's lags
DECODE_HORIZONS: tuple[int, ...] = (1, 4, 8, 16)  # frames ahead of CalM's forecast used


def lagged_activity(z: np.ndarray, lags: tuple[int, ...] = DECODE_LAGS) -> Tensor:
    """Causal lags of ``z [N, T]`` (NaN as 0, 0 before the start): ``[T, N, L]`` float32."""
    x = np.nan_to_num(np.asarray(z, np.float32))
    out = np.zeros((x.shape[1], x.shape[0], len(lags)), np.float32)
    for j, lag in enumerate(lags):
        out[lag:, :, j] = x[:, : x.shape[1] - lag].T
    return torch.from_numpy(out)


@dataclass
class RidgeReadout:
    """Ridge from CalM's forecasts at :data:`DECODE_HORIZONS` and lagged activity to behaviour."""

    horizons: tuple[int, ...] = DECODE_HORIZONS
    folds: int = 5

    def features(self, forecast: Tensor, lagged: Tensor, hidden: Tensor) -> Tensor:
        """``forecast [..., N, H]``, ``lagged [..., N, L]`` and ``hidden [..., N, W]`` to ``[..., N * (h + L) + W]``.

        ``forecast`` is CalM's published forecast, ``hidden`` its hidden
        states (only their mean over neurons is used). Horizons beyond the
        forecast's ``H`` are left out.
        """
        idx = [h - 1 for h in self.horizons if h <= forecast.shape[-1]]
        own = torch.cat([forecast[..., idx].double(), lagged.double()], dim=-1).flatten(-2)
        return torch.cat([own, hidden.double().mean(-2)], dim=-1)

    def fit(
        self,
        features: Tensor,
        y: np.ndarray,
        train: np.ndarray | None = None,
        val: np.ndarray | None = None,
    ) -> dict[str, object]:
        """Fit the readout and report its R2 on frames it was not fitted on.

        ``features [T, F]`` from :meth:`features`, ``y [T, B]``. With masks
        (bool ``[T]``) it is fitted on ``train`` with the penalty chosen on
        ``val`` (:func:`calm_rt.live.ridge.fit_ridge`). Without them (the
        live calibration) the penalty is chosen by blocked cross-validation
        over ``folds`` contiguous blocks in time, the reported R2 is that of
        the pooled out-of-fold predictions, and the readout is refitted on
        all frames. A single held-out block is not enough here: a
        calibration of a few seconds has a last block in which behaviour
        hardly varies, and R2 on it says nothing. Returns ``{"r2": [B],
        "lambda": float, "frames": int}``; a variable constant over the
        scored frames has R2 None.
        """
        t = features.shape[0]
        if y.shape[0] != t:
            raise DataError(f"behaviour has {y.shape[0]} frames but representations have {t}")
        ok = np.isfinite(y).all(axis=1)
        x, yt = features.double(), torch.from_numpy(np.where(ok[:, None], y, 0.0)).double()
        if train is not None and val is not None:
            fit_on, scored_on = train & ok, val & ok
            self.model = fit_ridge(x[fit_on], yt[fit_on], x[scored_on], yt[scored_on])
            held_out = self.model.predict(x[scored_on])
        else:
            n = int(ok.sum())
            if n < 10:
                raise DataError(f"need at least 10 labelled frames to calibrate, got {n}")
            scored_on = ok
            self.model, held_out = fit_ridge_cv(x[ok], yt[ok], self.folds)
        truth = y[scored_on]
        # A variable that never varied in the scored frames (no running in a
        # short calibration, say) has no R2: report None, not a perfect 1.
        varied = truth.std(0) > 1e-6 * (np.abs(truth).max(0) + 1e-12)
        r2 = r2_score(held_out.numpy(), truth)
        scores = [float(v) if ok_ else None for v, ok_ in zip(r2, varied)]
        return {"r2": scores, "lambda": self.model.penalty, "frames": int(scored_on.sum())}

    def predict(self, forecast: Tensor, lagged: Tensor, hidden: Tensor) -> Tensor:
        """``forecast [..., N, H]``, ``lagged [..., N, L]`` (:func:`lagged_activity`), ``hidden [..., N, W]`` to ``[..., B]``."""
        x = self.features(forecast, lagged, hidden)
        return self.model.predict(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1).float()
