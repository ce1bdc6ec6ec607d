"""Closed-form ridge readout of behaviour from frozen CalM representations.

This is the fast calibration path: from a few minutes of labelled behaviour
it fits in well under a second, so the live service can calibrate at the
start of a session. Features at frame t are each neuron's DAT hidden state
projected onto the leading principal components of all hidden states
(``[N, W] -> [N, r]``), concatenated over neurons; the penalty is chosen by
blocked cross-validation in time and the readout refitted on all frames.
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
    folds: int = 5

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
        """Fit the readout and report its R2 on frames it was not fitted on.

        ``features [T, F]`` from :meth:`features`, ``y [T, B]``. With masks
        (bool ``[T]``) it is fitted on ``train`` with the penalty chosen on
        ``val``. Without them (the live calibration) the penalty is chosen by
        blocked cross-validation over ``folds`` contiguous blocks in time,
        never random frames, the reported R2 is that of the pooled
        out-of-fold predictions, and the readout is refitted on all frames.
        A single held-out block is not enough here: a calibration of a few
        seconds has a last block in which behaviour hardly varies, and R2
        on it says nothing. Returns ``{"r2": [B], "lambda": float,
        "frames": int}``; a variable constant over the scored frames has R2
        None.
        """
        t = features.shape[0]
        if y.shape[0] != t:
            raise DataError(f"behaviour has {y.shape[0]} frames but representations have {t}")
        ok = np.isfinite(y).all(axis=1)
        x, yt = features.double(), torch.from_numpy(np.where(ok[:, None], y, 0.0)).double()
        if train is not None and val is not None:
            fit_on, scored_on = train & ok, val & ok
            held_out = dict(zip(_LAMBDAS, _ridge_path(x, yt, fit_on, scored_on)))
        else:
            n = int(ok.sum())
            if n < 10:
                raise DataError(f"need at least 10 labelled frames to calibrate, got {n}")
            fit_on = scored_on = ok
            xo, yo = x[ok], yt[ok]
            fold_of = np.arange(n) * self.folds // n  # contiguous blocks in time
            held_out = {lam: torch.empty_like(yo) for lam in _LAMBDAS}
            for k in range(self.folds):
                held = fold_of == k
                for lam, p in zip(_LAMBDAS, _ridge_path(xo, yo, ~held, held)):
                    held_out[lam][torch.from_numpy(held)] = p
        truth = y[scored_on]
        # A variable that never varied in the scored frames (no running in a
        # short calibration, say) has no R2: report None, not a perfect 1.
        varied = truth.std(0) > 1e-6 * (np.abs(truth).max(0) + 1e-12)
        r2 = {lam: r2_score(p.numpy(), truth) for lam, p in held_out.items()}
        lam = max(_LAMBDAS, key=lambda p: float(np.mean(r2[p][varied])) if varied.any() else 0.0)
        self.mean, self.std = x[fit_on].mean(0), x[fit_on].std(0) + 1e-6
        (self.weights,) = _ridge_weights((x[fit_on] - self.mean) / self.std, yt[fit_on], (lam,))
        scores = [float(v) if ok_ else None for v, ok_ in zip(r2[lam], varied)]
        return {"r2": scores, "lambda": lam, "frames": int(scored_on.sum())}

    def predict(self, hidden: Tensor) -> Tensor:
        """``[..., N, W]`` hidden states to ``[..., B]`` behaviour."""
        x = (self.features(hidden) - self.mean) / self.std
        return (x @ self.weights[:-1] + self.weights[-1]).float()


def _ridge_path(x: Tensor, y: Tensor, train: np.ndarray, held: np.ndarray) -> list[Tensor]:
    """Predictions on ``held`` of ridge fits on ``train``, one per penalty in ``_LAMBDAS``.

    Features are standardised with the training frames' statistics only.
    """
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    weights = _ridge_weights((x[train] - mean) / std, y[train], _LAMBDAS)
    xh = (x[held] - mean) / std
    return [xh @ w[:-1] + w[-1] for w in weights]


def _ridge_weights(x: Tensor, y: Tensor, lambdas: tuple[float, ...]) -> list[Tensor]:
    """Ridge weights ``[F + 1, B]`` (intercept last, not penalised) for each penalty.

    One thin SVD of the centred features serves every penalty, so the whole
    path costs about one solve whether features outnumber frames or not.
    """
    x_mean, y_mean = x.mean(0), y.mean(0)
    u, s, vh = torch.linalg.svd(x - x_mean, full_matrices=False)
    uty = u.T @ (y - y_mean)
    out = []
    for lam in lambdas:
        w = vh.T @ ((s / (s * s + lam))[:, None] * uty)
        out.append(torch.cat([w, (y_mean - x_mean @ w)[None]]))
    return out
