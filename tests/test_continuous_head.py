"""CalM's continuous head: it learns what a ridge cannot, deterministically, and the calibration uses it only where it helps."""

from __future__ import annotations

import numpy as np
import torch

from calm_rt.live import fit_ridge, forecast_calibration
from calm_rt.live.continuous_head import ContinuousHead
from calm_rt.live.forecast_calibration import ForecastCalibration, HiddenProjection


def _rectified(seed: int, samples: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[S, 6]`` and a change ``[S, 2]`` that is |x0| and relu(x1): no linear fit explains it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 6, generator=g)
    y = torch.stack([x[:, 0].abs(), x[:, 1].clamp_min(0)], dim=1)
    return x, y + 0.05 * torch.randn(y.shape, generator=g)


def test_the_head_learns_a_nonlinear_change_a_ridge_cannot():
    x, y = _rectified(0)
    xv, yv = _rectified(1, 1000)
    head = ContinuousHead.fit(x, y, xv, yv, steps=300)
    ridge = fit_ridge(x.double(), y.double(), xv.double(), yv.double())
    head_mse = float((head(xv) - yv).pow(2).mean())
    ridge_mse = float((ridge.predict(xv.double()).float() - yv).pow(2).mean())
    assert head_mse < 0.25 * ridge_mse, (head_mse, ridge_mse)


def test_the_head_fit_is_deterministic_and_leaves_the_process_rng_alone():
    x, y = _rectified(0, 1000)
    xv, yv = _rectified(1, 200)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = ContinuousHead.fit(x, y, xv, yv, steps=100, seed=3)
    after = torch.rand(1)
    b = ContinuousHead.fit(x, y, xv, yv, steps=100, seed=3)
    assert torch.equal(before, after)  # the fit drew nothing from torch's global generator
    torch.testing.assert_close(a(xv), b(xv), rtol=0, atol=0)
    assert not torch.equal(a(xv), ContinuousHead.fit(x, y, xv, yv, steps=100, seed=4)(xv))


def _threshold_ar(neurons: int, frames: int, seed: int) -> np.ndarray:
    """A two-regime AR(1) per neuron: decays slowly above 0, flips sign below (nonlinear in z_t)."""
    rng = np.random.default_rng(seed)
    z = np.zeros((neurons, frames), np.float32)
    for t in range(1, frames):
        prev = z[:, t - 1]
        z[:, t] = np.where(prev > 0, 0.9, -0.6) * prev + 0.5 * rng.standard_normal(neurons)
    return z


def _calibrate(z: np.ndarray, fit: np.ndarray, val: np.ndarray, head_steps: int):
    n, t = z.shape
    h, w = 4, 8
    mean = torch.zeros(n, t, h)  # a token forecast that knows nothing: the head must find it alone
    std = torch.ones(n, t, h)
    hidden = torch.randn(n, t, w, generator=torch.Generator().manual_seed(0))
    projection = HiddenProjection.fit(hidden[:, :200], components=2)
    cal = ForecastCalibration.fit(
        z, mean, std, projection(hidden), projection, fit, val, context=16, head_steps=head_steps
    )
    return cal, (mean, std, hidden)


def _test_mse(cal: ForecastCalibration, z: np.ndarray, outputs, ends: np.ndarray) -> float:
    mean, std, hidden = outputs
    ctx = torch.from_numpy(np.stack([z[:, e - 15 : e + 1] for e in ends]))
    target = torch.from_numpy(np.stack([z[:, e + 1 : e + 5] for e in ends]))
    e = torch.from_numpy(ends)
    pred, _ = cal.predict(
        ctx, mean[:, e].transpose(0, 1), std[:, e].transpose(0, 1), hidden[:, e].transpose(0, 1)
    )
    return float((pred - target).pow(2).mean())


def test_the_calibration_blends_in_the_head_where_it_helps_held_out_windows(monkeypatch):
    monkeypatch.setattr(forecast_calibration, "MIN_SAMPLES_PER_WEIGHT", 0)
    z = _threshold_ar(8, 3000, seed=0)
    fit, val, test = np.arange(15, 2000), np.arange(2020, 2500), np.arange(2520, 2990)
    with_head, outputs = _calibrate(z, fit, val, head_steps=400)
    ridge_only, _ = _calibrate(z, fit, val, head_steps=0)
    assert with_head.head is not None and with_head.head_weight > 0
    assert ridge_only.head is None and ridge_only.head_weight == 0
    assert with_head.cv_gain > ridge_only.cv_gain
    # ... and the choice made on validation windows holds on windows neither saw.
    assert _test_mse(with_head, z, outputs, test) < 0.97 * _test_mse(ridge_only, z, outputs, test)


def test_a_calibration_on_too_few_samples_fits_no_head():
    """Under the data rule (2 samples per weight of one MLP) the ridge alone is used."""
    z = _threshold_ar(8, 600, seed=1)  # 8 neurons x ~300 windows: far fewer than 2 x 28k
    cal, _ = _calibrate(z, np.arange(15, 400), np.arange(420, 580), head_steps=800)
    assert cal.head is None and cal.head_weight == 0
