"""The one ridge regression of calm-rt: live readouts, baselines and analysis probes.

One rule everywhere, so that a comparison between two ridges compares their
features, never their penalty grids:

* features are standardised with the fitting frames' mean and s.d.;
* the intercept is not penalised;
* the penalty is chosen from :data:`PENALTIES` by held-out error: on
  validation samples when given, otherwise by blocked cross-validation over
  contiguous folds in time (never random frames: neighbouring frames are
  nearly copies of each other);
* held-out error is the mean over outputs of MSE / variance of that output
  (1 - R2), so outputs in different units count alike and an output that
  never varies does not count.

One thin SVD per fit serves the whole penalty path when features are many;
with many more samples than features, one eigendecomposition of the Gram
matrix (built from sums, so cross-validation folds cost a subtraction). Leading batch dimensions (``x [..., S, F]``) fit
independent ridges with one shared penalty (per-neuron forecasters).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from calm_rt.errors import DataError

__all__ = ["PENALTIES", "RidgeModel", "fit_ridge", "fit_ridge_at", "fit_ridge_cv", "r2_score"]

PENALTIES: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4, 1e5)


def r2_score(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficient of determination per column (``[T, B]`` inputs, NaN rows ignored)."""
    ok = np.isfinite(y).all(axis=1) & np.isfinite(pred).all(axis=1)
    p, t = pred[ok], y[ok]
    ss_res = ((p - t) ** 2).sum(0)
    ss_tot = ((t - t.mean(0)) ** 2).sum(0)
    return 1.0 - ss_res / np.maximum(ss_tot, 1e-12)


@dataclass
class RidgeModel:
    """A fitted ridge: ``predict(x) = ((x - mean) / std) @ weights[:-1] + weights[-1]``."""

    mean: Tensor  # [..., 1, F]
    std: Tensor  # [..., 1, F]
    weights: Tensor  # [..., F + 1, O], intercept last
    penalty: float

    def predict(self, x: Tensor) -> Tensor:
        """``x [..., S, F]`` to ``[..., S, O]`` (float64)."""
        xs = (x.double() - self.mean) / self.std
        return xs @ self.weights[..., :-1, :] + self.weights[..., -1:, :]


def _standardiser(x: Tensor) -> tuple[Tensor, Tensor]:
    mean = x.mean(-2, keepdim=True)
    std = x.std(-2, keepdim=True) + 1e-6
    return mean, std


def _path(x: Tensor, y: Tensor, penalties: tuple[float, ...]) -> list[Tensor]:
    """Ridge weights ``[..., F + 1, O]`` on standardised ``x [..., S, F]`` for each penalty."""
    x_mean, y_mean = x.mean(-2, keepdim=True), y.mean(-2, keepdim=True)
    u, s, vh = torch.linalg.svd(x - x_mean, full_matrices=False)
    uty = u.transpose(-1, -2) @ (y - y_mean)  # [..., r, O]
    out = []
    for lam in penalties:
        w = vh.transpose(-1, -2) @ ((s / (s * s + lam))[..., None] * uty)  # [..., F, O]
        out.append(torch.cat([w, y_mean - x_mean @ w], dim=-2))
    return out


def _fit(x: Tensor, y: Tensor, penalties: tuple[float, ...]) -> list[RidgeModel]:
    if x.shape[-2] >= 2 * x.shape[-1]:  # many samples, few features: the Gram path is cheaper
        return _fit_moments(_Moments.of(x, y), penalties)
    mean, std = _standardiser(x)
    paths = _path((x - mean) / std, y, penalties)
    return [RidgeModel(mean, std, w, lam) for w, lam in zip(paths, penalties)]


@dataclass
class _Moments:
    """Sums that determine a ridge fit: count, sum x, sum y, sum x x', sum x y'."""

    n: int
    sx: Tensor  # [..., F]
    sy: Tensor  # [..., O]
    sxx: Tensor  # [..., F, F]
    sxy: Tensor  # [..., F, O]

    @classmethod
    def of(cls, x: Tensor, y: Tensor) -> _Moments:
        xt = x.transpose(-1, -2)
        return cls(x.shape[-2], x.sum(-2), y.sum(-2), xt @ x, xt @ y)

    def __sub__(self, other: _Moments) -> _Moments:
        return _Moments(
            self.n - other.n,
            self.sx - other.sx,
            self.sy - other.sy,
            self.sxx - other.sxx,
            self.sxy - other.sxy,
        )


def _fit_moments(m: _Moments, penalties: tuple[float, ...]) -> list[RidgeModel]:
    """The same fits as the SVD path, from sums (so CV folds cost a subtraction, not an SVD).

    Standardised, centred Gram ``G = D^-1 (X'X - n m m') D^-1`` (D: the
    features' s.d. as :func:`_standardiser` computes it); weights
    ``(G + lam I)^-1 X~'y~`` through one eigendecomposition of ``G``.
    """
    n = m.n
    mean = m.sx / n  # [..., F]
    ymean = m.sy / n
    cov = m.sxx - n * mean[..., :, None] * mean[..., None, :]  # centred X'X
    std = (cov.diagonal(dim1=-2, dim2=-1).clamp_min(0) / max(n - 1, 1)).sqrt() + 1e-6
    gram = cov / (std[..., :, None] * std[..., None, :])
    cross = (m.sxy - n * mean[..., :, None] * ymean[..., None, :]) / std[..., :, None]
    evals, evecs = torch.linalg.eigh(gram)
    proj = evecs.transpose(-1, -2) @ cross  # [..., F, O]
    out = []
    for lam in penalties:
        w = evecs @ (proj / (evals.clamp_min(0) + lam)[..., None])
        # The SVD path's intercept: mean y minus the (zero) mean of standardised x times w.
        out.append(
            RidgeModel(
                mean[..., None, :], std[..., None, :], torch.cat([w, ymean[..., None, :]], -2), lam
            )
        )
    return out


def _held_out_error(pred: Tensor, y: Tensor) -> float:
    """Mean over outputs that vary of MSE / variance (all leading dims are outputs too)."""
    var = y.var(-2, correction=0)
    err = ((pred - y) ** 2).mean(-2)
    varied = var > 1e-12
    if not bool(varied.any()):
        return float(err.mean())
    return float((err[varied] / var[varied]).mean())


def _check(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
    if x.shape[:-1] != y.shape[:-1]:
        raise DataError(f"features {tuple(x.shape)} and targets {tuple(y.shape)} differ in samples")
    if x.shape[-2] < 2:
        raise DataError(f"need at least 2 samples to fit a ridge, got {x.shape[-2]}")
    return x, y


def fit_ridge(
    x: Tensor,
    y: Tensor,
    x_val: Tensor | None = None,
    y_val: Tensor | None = None,
    penalties: tuple[float, ...] = PENALTIES,
) -> RidgeModel:
    """Fit on ``x [..., S, F]``, ``y [..., S, O]``; choose the penalty on the validation samples.

    Without validation samples the penalty is chosen by :func:`fit_ridge_cv`.
    """
    x, y = _check(x, y)
    if x_val is None or y_val is None or x_val.shape[-2] == 0:
        return fit_ridge_cv(x, y, penalties=penalties)[0]
    xv, yv = _check(x_val, y_val)
    models = _fit(x, y, penalties)
    errors = [_held_out_error(m.predict(xv), yv) for m in models]
    return models[int(np.argmin(errors))]


def fit_ridge_at(x: Tensor, y: Tensor, penalty: float) -> RidgeModel:
    """Fit with a penalty already chosen (a refit on more samples)."""
    x, y = _check(x, y)
    return _fit(x, y, (penalty,))[0]


def fit_ridge_cv(
    x: Tensor, y: Tensor, folds: int = 5, penalties: tuple[float, ...] = PENALTIES
) -> tuple[RidgeModel, Tensor]:
    """Blocked cross-validation over ``folds`` contiguous blocks of samples, then a refit on all.

    Returns the refitted model and the pooled out-of-fold predictions
    ``[..., S, O]`` of the chosen penalty (what its held-out R2 is computed on).
    """
    x, y = _check(x, y)
    n = x.shape[-2]
    folds = max(2, min(folds, n // 2))
    fold_of = torch.arange(n) * folds // n
    held_out = [torch.empty_like(y) for _ in penalties]
    by_moments = n >= 2 * x.shape[-1]
    total = _Moments.of(x, y) if by_moments else None
    for k in range(folds):
        held = fold_of == k
        if total is not None:
            models = _fit_moments(total - _Moments.of(x[..., held, :], y[..., held, :]), penalties)
        else:
            models = _fit(x[..., ~held, :], y[..., ~held, :], penalties)
        xs = (x[..., held, :] - models[0].mean) / models[0].std  # one standardisation per fold
        for store, model in zip(held_out, models):
            store[..., held, :] = xs @ model.weights[..., :-1, :] + model.weights[..., -1:, :]
    errors = [_held_out_error(p, y) for p in held_out]
    best = int(np.argmin(errors))
    (model,) = _fit(x, y, (penalties[best],))
    return model, held_out[best]
