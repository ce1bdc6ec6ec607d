"""Closed-form ridge readout of behaviour from frozen CalM representations.

This is the fast calibration path: from a few minutes of labelled behaviour
it fits in well under a second, so the live service can calibrate at the
start of a session. Features at frame t are each neuron's DAT hidden state
projected onto the leading principal components of all hidden states
(``[N, W] -> [N, r]``), concatenated over neurons; the penalty is chosen on
held-out frames and the readout refitted on all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from calm_rt.errors import DataError

__all__ = ["RidgeReadout", "r2_score"]

_LAMBDAS = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


def r2_score(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficient of determination per column (``[T, B]`` inputs, NaN rows ignored)."""
    ok = np.isfinite(y).all(axis=1) & np.isfinite(pred).all(axis=1)
    p, t = pred[ok], y[ok]
    ss_res = ((p - t) ** 2).sum(0)
    ss_tot = ((t - t.mean(0)) ** 2).sum(0)
    return 1.0 - ss_res / np.maximum(ss_tot, 1e-12)


@dataclass
class RidgeReadout:
    """Ridge from per-neuron hidden states to behaviour (``components`` PCs per neuron).

    Two steps, so a live calibration never holds full hidden states for
    minutes: :meth:`fit_projection` on a short sample of hidden states, then
    :meth:`fit` on the (small) projected features of all labelled frames.
    """

    components: int = 8

    def fit_projection(self, hidden: Tensor) -> None:
        """Principal axes of hidden states ``[T, N, W]`` (pooled over frames and neurons)."""
        flat = hidden.double().reshape(-1, hidden.shape[-1])
        self.center = flat.mean(0)
        _, _, vh = torch.linalg.svd(flat - self.center, full_matrices=False)
        self.projection = vh[: self.components].T  # [W, r]

    def features(self, hidden: Tensor) -> Tensor:
        """``[..., N, W]`` to ``[..., N * r]`` float64 (before standardisation)."""
        return ((hidden.double() - self.center) @ self.projection).flatten(-2)

    def fit(
        self,
        features: Tensor,
        y: np.ndarray,
        train: np.ndarray | None = None,
        val: np.ndarray | None = None,
    ) -> dict[str, object]:
        """Fit on frames ``train`` (bool ``[T]``), choosing the penalty on ``val``.

        ``features [T, F]`` from :meth:`features`, ``y [T, B]``. Without
        masks the last 20% of the frames are held out to choose the penalty
        and report R2 (a block in time, never random frames), then the
        readout is refitted on all of them. Returns ``{"r2": [B], "lambda":
        float, "frames": int}`` on the held-out frames.
        """
        t = features.shape[0]
        if y.shape[0] != t:
            raise DataError(f"behaviour has {y.shape[0]} frames but representations have {t}")
        refit = train is None or val is None
        if refit:
            if t < 10:
                raise DataError(f"need at least 10 labelled frames to calibrate, got {t}")
            train = np.arange(t) < int(round(0.8 * t))
            val = ~train
        ok = np.isfinite(y).all(axis=1)
        train, val = train & ok, val & ok
        raw = features.double()
        self.mean, self.std = raw[train].mean(0), raw[train].std(0) + 1e-6
        x = (raw - self.mean) / self.std
        yt = torch.from_numpy(np.nan_to_num(y)).double()
        best = None
        for lam in _LAMBDAS:
            w = _solve(x[train], yt[train], lam)
            r2 = r2_score((x[val] @ w[:-1] + w[-1]).numpy(), y[val])
            if best is None or r2.mean() > best[0].mean():
                best = (r2, lam, w)
        assert best is not None
        r2, lam, w = best
        self.weights = _solve(x[train | val], yt[train | val], lam) if refit else w
        return {"r2": r2.tolist(), "lambda": lam, "frames": int(train.sum() + val.sum())}

    def predict(self, hidden: Tensor) -> Tensor:
        """``[..., N, W]`` hidden states to ``[..., B]`` behaviour."""
        x = (self.features(hidden) - self.mean) / self.std
        return (x @ self.weights[:-1] + self.weights[-1]).float()


def _solve(x: Tensor, y: Tensor, lam: float) -> Tensor:
    """Ridge with intercept; the dual form when features outnumber frames."""
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    n, f = xa.shape
    if f <= n:
        reg = torch.eye(f, dtype=x.dtype) * lam
        reg[-1, -1] = 0
        return torch.linalg.solve(xa.T @ xa + reg, xa.T @ y)
    alpha = torch.linalg.solve(xa @ xa.T + lam * torch.eye(n, dtype=x.dtype), y)
    return xa.T @ alpha
