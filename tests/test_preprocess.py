"""Causal preprocessing: online (frame by frame) equals offline, and it is causal."""

from __future__ import annotations

import numpy as np
import pytest

from calm_rt.data import CausalPreprocessor, PreprocessConfig, preprocess_traces
from calm_rt.errors import ConfigError, DataError


def _raw(n: int = 16, t: int = 1500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    drift = 300 + np.cumsum(rng.normal(size=(n, t)), axis=1) * 0.5
    events = (rng.random((n, t)) < 0.01).astype(float)
    kernel = np.exp(-np.arange(60) / 15.0)
    calcium = np.stack([np.convolve(e, kernel)[:t] for e in events])
    f = drift * (1 + 0.5 * calcium) + rng.normal(scale=5.0, size=(n, t))
    neuropil = 100 + rng.normal(scale=2.0, size=(n, t))
    return f.astype(np.float32), neuropil.astype(np.float32)


def test_frame_by_frame_equals_whole_array_bit_for_bit():
    f, npil = _raw()
    f[3, 200:260] = np.nan  # a gap must be handled identically on both paths
    offline = preprocess_traces(f, fps=30.0, kind="F", neuropil=npil)
    pre = CausalPreprocessor(f.shape[0], fps=30.0, kind="F")
    online = np.stack([pre.step(f[:, t], npil[:, t]) for t in range(f.shape[1])], axis=1)
    np.testing.assert_array_equal(online, offline)


def test_chunked_run_continues_state():
    f, _ = _raw(t=900)
    whole = preprocess_traces(f, fps=15.0, kind="F")
    pre = CausalPreprocessor(f.shape[0], fps=15.0, kind="F")
    parts = [pre.run(f[:, a:b]) for a, b in [(0, 1), (1, 400), (400, 900)]]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)


def test_causal_future_does_not_change_past():
    f, npil = _raw()
    a = preprocess_traces(f, fps=30.0, neuropil=npil)
    g = f.copy()
    g[:, 1000:] *= 3.0  # rewrite the future
    b = preprocess_traces(g, fps=30.0, neuropil=npil)
    np.testing.assert_array_equal(a[:, :1000], b[:, :1000])
    assert not np.allclose(a[:, 1000:], b[:, 1000:])


def test_nan_is_masked_and_does_not_poison_state():
    f, _ = _raw(n=4, t=600)
    g = f.copy()
    g[1, 300] = np.nan
    a = preprocess_traces(f, fps=30.0)
    b = preprocess_traces(g, fps=30.0)
    assert np.isnan(b[1, 300])
    assert np.isfinite(np.delete(b, 300, axis=1)).all()
    # Other neurons are untouched by one neuron's gap.
    np.testing.assert_array_equal(a[[0, 2, 3]], b[[0, 2, 3]])


def test_output_is_normalised_and_removes_drift():
    f, _ = _raw(n=8, t=6000)
    z = preprocess_traces(f, fps=30.0)
    late = z[:, 3000:]
    assert np.all(np.abs(late.mean(axis=1)) < 0.5)
    assert np.all((late.std(axis=1) > 0.5) & (late.std(axis=1) < 1.5))
    assert np.abs(z).max() <= PreprocessConfig().clip


def test_neuropil_subtraction_uses_coefficient():
    rng = np.random.default_rng(1)
    cell = 200 + 50 * (rng.random((1, 3000)) < 0.02).astype(np.float32)
    npil = (100 + 40 * np.sin(np.arange(3000) / 50.0))[None].astype(np.float32)
    cfg = PreprocessConfig(neuropil_coef=0.7)
    with_sub = preprocess_traces(cell + 0.7 * npil, 30.0, "F", npil, cfg)
    clean = preprocess_traces(cell + 0.7 * 100, 30.0, "F", None, cfg)
    contaminated = preprocess_traces(cell + 0.7 * npil, 30.0, "F", None, cfg)
    err_sub = np.abs(with_sub - clean)[:, 1000:].mean()
    err_raw = np.abs(contaminated - clean)[:, 1000:].mean()
    assert err_sub < 0.2 * err_raw


def test_dff_kind_skips_baseline():
    rng = np.random.default_rng(2)
    dff = rng.normal(size=(3, 2000)).astype(np.float32)
    z = preprocess_traces(dff, 30.0, kind="dff")
    # Normalisation of an already standard signal is close to the identity.
    assert np.corrcoef(z[0, 500:], dff[0, 500:])[0, 1] > 0.99


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ConfigError, match="fps"):
        CausalPreprocessor(4, fps=0.0)
    with pytest.raises(ConfigError, match="kind"):
        CausalPreprocessor(4, fps=10.0, kind="spikes")
    pre = CausalPreprocessor(4, fps=10.0)
    with pytest.raises(DataError, match=r"shape \(4,\)"):
        pre.step(np.zeros(5, np.float32))
    with pytest.raises(DataError, match="neuropil"):
        pre.step(np.zeros(4, np.float32), np.zeros(3, np.float32))
    with pytest.raises(DataError, match="kind='F'"):
        CausalPreprocessor(4, fps=10.0, kind="dff").step(np.zeros(4), np.zeros(4))
    with pytest.raises(ConfigError, match="baseline_percentile"):
        PreprocessConfig(baseline_percentile=150.0)


def test_reset_restarts_the_session():
    f, _ = _raw(n=4, t=300)
    pre = CausalPreprocessor(4, fps=30.0)
    first = pre.run(f)
    pre.reset()
    np.testing.assert_array_equal(pre.run(f), first)
    assert pre.state_nbytes > 0
