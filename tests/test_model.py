"""CalM model: shapes, causality, neuron-order equivariance, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calm_rt.errors import ConfigError
from calm_rt.model import PRESETS, CalM, frame_windows, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def model() -> CalM:
    torch.manual_seed(0)
    return CalM(PRESETS["tiny"]).eval()


def _z(n: int = 12, t: int = 160, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, t)).astype(np.float32))


def test_frame_windows_end_at_each_frame():
    z = torch.arange(6.0)[None]
    w = frame_windows(z, 3)
    assert w.shape == (1, 6, 3)
    assert w[0, 0].tolist() == [0, 0, 0] and w[0, 4].tolist() == [2, 3, 4]


def test_offline_outputs_have_documented_shapes(model):
    out = model.run_offline(_z())
    h = model.config.horizon_frames
    assert out.tokens.shape == (12, 160) and out.tokens.dtype == torch.int64
    assert out.forecast.shape == out.forecast_std.shape == (12, 160, h)
    assert out.hidden.shape == (12, 160, model.config.dat.width)
    assert (out.forecast_std >= 0).all() and out.behavior is None


def test_offline_is_causal(model):
    z = _z()
    g = z.clone()
    g[:, 100:] = 5.0  # rewrite the future
    a, b = model.run_offline(z), model.run_offline(g)
    torch.testing.assert_close(a.forecast[:, :100], b.forecast[:, :100])
    assert torch.equal(a.tokens[:, :100], b.tokens[:, :100])
    assert not torch.allclose(a.forecast[:, 100:], b.forecast[:, 100:])


def test_neural_axis_has_no_neuron_order(model):
    z = _z()
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    a, b = model.run_offline(z), model.run_offline(z[perm])
    torch.testing.assert_close(a.forecast[perm], b.forecast, rtol=1e-4, atol=1e-5)


def test_neural_attention_mixes_neurons(model):
    z = _z()
    g = z.clone()
    g[5] = -3.0  # change one neuron only
    a, b = model.run_offline(z), model.run_offline(g)
    assert not torch.allclose(a.forecast[0], b.forecast[0])  # neuron 0 sees neuron 5


def test_the_raw_window_enters_beside_the_tokens(model):
    """The continuous path: a change too small to move any token still reaches the model."""
    z = _z()
    g = z.clone()
    g[3, 90:] += 1e-3
    a, b = model.run_offline(z), model.run_offline(g)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.allclose(a.hidden[3, 90:], b.hidden[3, 90:], atol=0, rtol=0)
    torch.testing.assert_close(a.hidden[:, :90], b.hidden[:, :90], atol=0, rtol=0)


def test_the_continuous_forecast_is_published_and_the_token_forecast_kept(model):
    out = model.run_offline(_z())
    # Two forecasts per frame: the continuous head's (published) and the tokens' beside it.
    assert out.token_forecast.shape == out.forecast.shape
    assert not torch.allclose(out.token_forecast, out.forecast)
    tokens_only = CalM(PRESETS["small-tokens"]).eval()
    assert tokens_only.forecast_head is None and tokens_only.dat.value_in is None
    plain = tokens_only.run_offline(_z())
    assert torch.equal(plain.forecast, plain.token_forecast)


def test_any_number_of_neurons(model):
    for n in (1, 7, 33):
        assert model.run_offline(_z(n=n, t=40)).forecast.shape[0] == n


def test_forecast_windows_use_only_the_window(model):
    z = _z(t=200)
    ctx = z[None, :, 100:148]
    mean, std = model.forecast_windows(ctx)
    assert mean.shape == std.shape == (1, 12, model.config.horizon_frames)
    # The window's own offline run ends in the same forecast: nothing before it is used.
    torch.testing.assert_close(
        mean[0], model.run_offline(z[:, 100:148]).forecast[:, -1], rtol=1e-4, atol=1e-5
    )


def test_exact_and_fast_tokenization_agree(model):
    w = frame_windows(_z(n=64, t=200), model.config.patch).reshape(-1, model.config.patch)
    exact = model.tokenizer.tokenize_windows(w)
    fast = model.tokenizer.tokenize_windows(w, exact=False)
    assert (exact == fast).float().mean() > 0.99
    # The exact path does not depend on the batch it arrives in.
    assert torch.equal(exact[:37], model.tokenizer.tokenize_windows(w[:37]))


def test_checkpoint_roundtrip(model, tmp_path):
    save_checkpoint(model, tmp_path / "ckpt", extra={"note": "test"})
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["note"] == "test" and loaded.config == model.config
    z = _z(t=60)
    torch.testing.assert_close(loaded.run_offline(z).forecast, model.run_offline(z).forecast)


def test_bad_checkpoint_and_config_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a calm-rt checkpoint"):
        load_checkpoint(tmp_path)
    from dataclasses import replace

    with pytest.raises(ConfigError, match="divisible"):
        replace(PRESETS["tiny"], dat=replace(PRESETS["tiny"].dat, width=30, heads=4))
