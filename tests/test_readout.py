"""The closed-form ridge readout: exact ridge, and an R2 that is honestly out of sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calm_rt.live import PENALTIES, RidgeReadout, r2_score


def _linear_data(rng: np.random.Generator, frames: int, features: int, noise: float, w=None):
    """Behaviour ``[T, 2]`` linear in Gaussian features plus noise (``w`` drawn when None)."""
    if w is None:
        w = rng.standard_normal((features, 2))
    x = rng.standard_normal((frames, features))
    y = x @ w / np.sqrt(features) + noise * rng.standard_normal((frames, 2))
    return torch.from_numpy(x), y, w


def _reference_ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """Textbook ridge on standardised features with an unpenalised intercept."""
    z = (x - x.mean(0)) / (x.std(0, ddof=1) + 1e-6)
    a = np.concatenate([z, np.ones((len(z), 1))], 1)
    reg = lam * np.eye(a.shape[1])
    reg[-1, -1] = 0
    return np.linalg.solve(a.T @ a + reg, a.T @ y)


@pytest.mark.parametrize("features", [12, 300])  # fewer and more features than frames
def test_fit_with_masks_is_the_textbook_ridge(features):
    rng = np.random.default_rng(0)
    x, y, _ = _linear_data(rng, 200, features, noise=0.5)
    train = np.arange(200) < 150
    readout = RidgeReadout()
    report = readout.fit(x, y, train, ~train)
    w = _reference_ridge(x.numpy()[train], y[train], report["lambda"])
    np.testing.assert_allclose(readout.model.weights.numpy(), w, rtol=1e-6, atol=1e-8)
    # and the penalty it chose is the best on the validation frames
    scores = []
    for lam in PENALTIES:
        ref = _reference_ridge(x.numpy()[train], y[train], lam)
        xs = (x.numpy()[~train] - x.numpy()[train].mean(0)) / (
            x.numpy()[train].std(0, ddof=1) + 1e-6
        )
        scores.append(r2_score(xs @ ref[:-1] + ref[-1], y[~train]).mean())
    assert report["lambda"] == PENALTIES[int(np.argmax(scores))]


def test_cross_validated_r2_predicts_r2_on_new_frames():
    rng = np.random.default_rng(1)
    x, y, w = _linear_data(rng, 600, 40, noise=0.5)
    readout = RidgeReadout()
    report = readout.fit(x, y)  # the live calibration path: no masks
    fresh_x, fresh_y, _ = _linear_data(rng, 4000, 40, noise=0.5, w=w)
    pred = ((fresh_x - readout.model.mean) / readout.model.std) @ readout.model.weights[
        :-1
    ] + readout.model.weights[-1]
    fresh_r2 = r2_score(pred.numpy(), fresh_y)
    assert fresh_r2.min() > 0.6
    np.testing.assert_allclose(report["r2"], fresh_r2, atol=0.08)


def test_noise_features_report_no_skill():
    """In-sample R2 would be near 1 here (more features than frames); out-of-fold is not."""
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((150, 400)))
    y = rng.standard_normal((150, 2))
    report = RidgeReadout().fit(x, y)
    assert max(report["r2"]) < 0.05


def test_unlabelled_frames_are_skipped_and_too_few_are_refused():
    rng = np.random.default_rng(3)
    x, y, _ = _linear_data(rng, 100, 10, noise=0.1)
    y[::3] = np.nan
    report = RidgeReadout().fit(x, y)
    assert report["frames"] == int(np.isfinite(y).all(1).sum()) and min(report["r2"]) > 0.8
    with pytest.raises(Exception, match="at least 10 labelled frames"):
        RidgeReadout().fit(x[:9], y[:9])


def test_features_are_each_neurons_forecast_and_lags_then_the_population_state():
    rng = np.random.default_rng(4)
    forecast = torch.from_numpy(rng.standard_normal((5, 16)))  # [N, H]
    lagged = torch.from_numpy(rng.standard_normal((5, 6)))  # [N, L]
    hidden = torch.from_numpy(rng.standard_normal((5, 8)))  # [N, W]
    x = RidgeReadout().features(forecast, lagged, hidden)
    assert x.shape == (5 * (4 + 6) + 8,)
    np.testing.assert_array_equal(x[:4].numpy(), forecast[0, [0, 3, 7, 15]].numpy())
    np.testing.assert_array_equal(x[4:10].numpy(), lagged[0].numpy())
    np.testing.assert_allclose(x[-8:].numpy(), hidden.mean(0).numpy())
    # The engine may hand over the mean alone ([1, W]): the same features.
    pooled = RidgeReadout().features(forecast, lagged, hidden.mean(0, keepdim=True))
    np.testing.assert_allclose(pooled.numpy(), x.numpy())
