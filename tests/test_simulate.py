"""The simulator has the properties the rest of the project relies on."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from scipy.optimize import curve_fit

from calm_rt.data import (
    INDICATORS,
    LATENT_FAMILIES,
    SimConfig,
    load_corpus,
    make_animal,
    preprocess_traces,
    render_movie,
    simulate_corpus,
    simulate_session,
    varied_config,
)
from calm_rt.errors import ConfigError


@pytest.fixture(scope="module")
def long_session():
    config = SimConfig(neurons=100, frames=6000, indicator="GCaMP6f", seed=3)
    return config, *simulate_session(config, make_animal(config, 0), 0)


def test_deterministic_for_a_seed():
    config = SimConfig(neurons=20, frames=300, seed=11)
    a, _ = simulate_session(config, make_animal(config, 1), 0)
    b, _ = simulate_session(config, make_animal(config, 1), 0)
    c, _ = simulate_session(
        SimConfig(neurons=20, frames=300, seed=12),
        make_animal(SimConfig(neurons=20, frames=300, seed=12), 1),
        0,
    )
    np.testing.assert_array_equal(a.traces, b.traces)
    np.testing.assert_array_equal(a.behavior, b.behavior)
    assert not np.array_equal(a.traces, c.traces)


def _structure_over_shuffled(session, skip: int) -> float:
    """Top-5 PC variance share of the activity over that of each neuron circularly shifted.

    Circular shifts keep each neuron's own autocorrelation but break the
    coordination across neurons: a strict control.
    """
    z = preprocess_traces(session.traces, session.fps, "F", session.neuropil)[:, skip:]
    z = z - z.mean(axis=1, keepdims=True)

    def top5(x: np.ndarray) -> float:
        ev = np.linalg.svd(x, compute_uv=False) ** 2
        return float(ev[:5].sum() / ev.sum())

    rng = np.random.default_rng(0)
    shift = z.shape[1] // 6
    shuffled = np.stack([np.roll(row, rng.integers(shift, z.shape[1] - shift)) for row in z])
    return top5(z) / top5(shuffled)


def test_population_structure_beats_time_shuffled(long_session):
    _, session, _ = long_session
    assert _structure_over_shuffled(session, 600) > 1.5


@pytest.mark.parametrize("family", LATENT_FAMILIES)
def test_every_latent_family_coordinates_the_population(family):
    # At a light-sheet rate (3 Hz) and a two-photon one (30 Hz), with a fast indicator.
    for fps in (3.0, 30.0):
        config = SimConfig(
            neurons=60, frames=3000, fps=fps, latent_family=family, indicator="GCaMP6f", seed=8
        )
        session, truth = simulate_session(config, make_animal(config, 0), 0)
        assert truth.latents.shape == (3000, config.latent_dim)
        assert np.isfinite(truth.latents).all() and truth.latents.std(axis=0).min() > 0
        ratio = _structure_over_shuffled(session, int(60 * fps) // 2)
        assert ratio > 1.5, (family, fps, ratio)


def test_a_varied_corpus_gives_every_animal_its_own_recording_conditions(tmp_path):
    base = SimConfig(animals=16, sessions=1, neurons=400, frames=200, seed=21, varied=True)
    configs = [varied_config(base, a) for a in range(16)]
    assert configs[3] == varied_config(base, 3)  # deterministic for (seed, animal)
    assert all(1.0 <= c.fps <= 30.0 and 50 <= c.neurons <= 400 for c in configs)
    assert len({c.fps for c in configs}) == 16 and len({c.latent_family for c in configs}) >= 3
    assert len({c.indicator for c in configs}) >= 2 and not any(c.varied for c in configs)
    assert varied_config(replace(base, varied=False), 3) == replace(base, varied=False)
    simulate_corpus(replace(base, animals=3), tmp_path)
    for entry, c in zip(
        json.loads((tmp_path / "simulation.json").read_text())["sessions"], configs
    ):
        assert (entry["fps"], entry["neurons"], entry["latent_family"]) == (
            c.fps, c.neurons, c.latent_family,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="latent_family"):
        SimConfig(latent_family="lorenz")


def test_behaviour_is_decodable_from_latents(long_session):
    _, session, truth = long_session
    x = np.hstack([truth.latents, np.ones((session.n_frames, 1))])
    half = session.n_frames // 2
    for j, name in enumerate(session.behavior_names[:2]):
        w = np.linalg.lstsq(x[:half], session.behavior[:half, j], rcond=None)[0]
        pred, y = x[half:] @ w, session.behavior[half:, j]
        r2 = 1 - np.mean((pred - y) ** 2) / np.var(y)
        assert r2 > 0.4, f"{name}: held-out R2 {r2:.2f} from the latents"


def test_sessions_of_an_animal_share_latents_but_sample_different_neurons():
    config = SimConfig(neurons=40, frames=200, seed=5)
    animal = make_animal(config, 0)
    _, t0 = simulate_session(config, animal, 0)
    _, t1 = simulate_session(config, animal, 1)
    assert not np.array_equal(t0.pool_index, t1.pool_index)
    assert len(set(t0.pool_index) & set(t1.pool_index)) > 0  # re-found cells
    other = make_animal(config, 1)
    assert not np.allclose(animal.recurrent, other.recurrent)


@pytest.mark.parametrize("name", sorted(INDICATORS))
def test_indicator_decay_time_as_configured(name):
    """Fit the decay of the spike-triggered average of the *observed* dF/F.

    Spikes are taken when the cell was quiet before (little residual calcium,
    so saturation barely bends the curve) and silent for 3 decay times after;
    the fit starts once the rise is over and allows a constant offset.
    """
    indicator = INDICATORS[name]
    config = SimConfig(neurons=60, frames=12000, indicator=name, seed=1)
    session, truth = simulate_session(config, make_animal(config, 0), 0)
    w = int(3 * indicator.tau_decay_s * config.fps) + 2
    corrected = session.traces - truth.neuropil_coef[:, None] * session.neuropil
    dff = corrected / np.percentile(corrected, 10, axis=1, keepdims=True) - 1
    segments = []
    for i in range(session.n_neurons):
        for t in np.flatnonzero(truth.spikes[i] == 1):
            quiet_before = truth.calcium[i, t - 1] < 0.25
            if (
                2 <= t < session.n_frames - w
                and quiet_before
                and truth.spikes[i, t - 2 : t + w].sum() == 1
            ):
                segments.append(dff[i, t : t + w] - dff[i, t - 1])
    assert len(segments) > 100
    sta = np.mean(segments, axis=0)
    start = int(np.argmax(sta)) + 1 + int(np.ceil(4 * indicator.tau_rise_s * config.fps))
    tt = np.arange(sta.size) / config.fps

    def decay(t, a, tau, c):
        return a * np.exp(-t / tau) + c

    (_, tau_hat, _), _ = curve_fit(decay, tt[start:], sta[start:], p0=(sta[start], 0.5, 0.0))
    assert tau_hat == pytest.approx(indicator.tau_decay_s, rel=0.15)
    # One isolated spike gives about the configured dF/F.
    assert sta.max() == pytest.approx(indicator.dff_per_spike, rel=0.3)


def test_movie_matches_saved_footprints_and_shifts():
    config = SimConfig(neurons=25, frames=240, movie=True, movie_size=96, motion_px=1.5, seed=2)
    session, truth = simulate_session(config, make_animal(config, 0), 0)
    frames_iter, mtruth = render_movie(session, truth, config)
    movie = np.concatenate(list(frames_iter())).astype(np.float32)
    assert movie.shape == (240, 96, 96)
    # Shifts: phase correlation against the mean of the motion-undone frames
    # recovers the saved shifts (integer precision is enough here).
    from scipy import ndimage

    undone = np.stack(
        [ndimage.shift(f, -s, order=1, mode="nearest") for f, s in zip(movie, mtruth.shifts)]
    )
    ref = undone.mean(axis=0)
    fr = np.conj(np.fft.fft2(ref - ref.mean()))
    errors = []
    for f, s in zip(movie[::10], mtruth.shifts[::10]):
        xc = np.fft.ifft2(np.fft.fft2(f - f.mean()) * fr).real
        dy, dx = np.unravel_index(np.argmax(xc), xc.shape)
        dy = dy - 96 if dy > 48 else dy
        dx = dx - 96 if dx > 48 else dx
        errors.append(np.hypot(dy - s[0], dx - s[1]))
    assert np.median(errors) <= 0.75
    assert mtruth.shifts.std() > 0.5
    # Footprints: weighted sums over each footprint of the motion-undone movie
    # follow the saved cell fluorescence.
    fp = mtruth.footprint_images().reshape(25, -1)
    extracted = fp @ undone.reshape(240, -1).T
    r = [np.corrcoef(extracted[i], mtruth.cell_fluorescence[i])[0, 1] for i in range(25)]
    assert np.median(r) > 0.75  # silent cells (flat truth) pull some r to ~0
    assert np.allclose(fp.sum(axis=1), 1.0, atol=1e-4)
    # Cells sit where the motion-corrected mean image is bright.
    centers = np.rint(mtruth.centers).astype(int)
    assert np.median(ref[centers[:, 0], centers[:, 1]]) > np.percentile(ref, 75)


def test_corpus_on_disk_reads_back(tmp_path):
    config = SimConfig(animals=2, sessions=2, neurons=30, frames=400, seed=4)
    paths = simulate_corpus(config, tmp_path)
    assert len(paths) == 4
    sessions = load_corpus(tmp_path)
    assert [s.session_id for s in sessions] == sorted(p.stem for p in paths)
    assert {s.animal_id for s in sessions} == {"sim4-animal00", "sim4-animal01"}
    for s in sessions:
        assert s.traces.shape == (30, 400) and s.behavior.shape == (400, 3)
        assert s.neuropil is not None and s.kind == "F"
    manifest = json.loads((tmp_path / "simulation.json").read_text())
    assert len(manifest["sessions"]) == 4
    assert (tmp_path / "truth" / f"{sessions[0].session_id}.truth.npz").exists()


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="indicator"):
        SimConfig(indicator="GCaMP3")
    with pytest.raises(ConfigError, match="fps"):
        SimConfig(fps=0)
