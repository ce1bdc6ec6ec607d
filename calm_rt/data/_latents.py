"""Latent population dynamics of a simulated animal: four families of dynamical system.

A pretrained model meets recordings whose population dynamics it has never
seen; one family in the pretraining corpus teaches it one kind of dynamics.
So an animal's latent system is one of:

* ``rnn``: a random rate network, ``x += dt/tau (-x + tanh(W x + drive))`` (the
  original simulator's; smooth, chaotic-ish trajectories).
* ``oscillator``: damped noise-driven rotations at 0.05-1.5 Hz (rhythmic
  population activity, travelling-wave-like phase shifts across neurons).
* ``switching``: a Markov chain over a few population states with dwell times
  of seconds (up/down-like switches between attractors), smoothed by tau.
* ``assemblies``: sparse Poisson-triggered bursts of each latent dimension,
  decaying with tau (synchronous ensemble events, as in zebrafish hindbrain
  and spontaneous cortical assemblies).

Every family is driven by the behaviour (running, pupil, stimulus) through
the animal's input weights. The family's own parameters (frequencies, state
means, event rates) belong to the animal, so its sessions share them; they
are drawn from a generator keyed by the animal alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import numpy as np

__all__ = ["LATENT_FAMILIES", "simulate_latents"]

LATENT_FAMILIES = ("rnn", "oscillator", "switching", "assemblies")


class _Animal(Protocol):
    index: int
    seed: int
    recurrent: np.ndarray  # [D, D]
    input_weights: np.ndarray  # [D, 3]
    latent_bias: np.ndarray  # [D]


def _animal_rng(animal: _Animal, family: str) -> np.random.Generator:
    """The family's parameters of one animal: the same for all its sessions."""
    key = LATENT_FAMILIES.index(family) + 1
    return np.random.default_rng(np.random.SeedSequence([animal.seed, animal.index, 0, 100 + key]))


def _rnn(
    rng: np.random.Generator,
    animal: _Animal,
    drive: np.ndarray,
    dt: float,
    tau: float,
    noise: float,
) -> np.ndarray:
    frames, d = drive.shape
    k = dt / tau
    eps = rng.normal(0.0, noise * math.sqrt(dt), size=(frames, d))
    x = np.zeros(d)
    out = np.empty((frames, d))
    for t in range(frames):
        x = x + k * (-x + np.tanh(animal.recurrent @ x + drive[t])) + eps[t]
        out[t] = x
    return out


def _oscillator(
    rng: np.random.Generator,
    animal: _Animal,
    drive: np.ndarray,
    dt: float,
    tau: float,
    noise: float,
) -> np.ndarray:
    frames, d = drive.shape
    params = _animal_rng(animal, "oscillator")
    pairs = d // 2
    freq = np.exp(params.uniform(math.log(0.05), math.log(1.5), size=pairs))  # Hz
    damping_s = np.exp(params.uniform(math.log(0.5), math.log(5.0), size=pairs))
    r = np.exp(-dt / damping_s)
    theta = 2 * math.pi * freq * dt
    cos, sin = r * np.cos(theta), r * np.sin(theta)
    # Stationary variance ~1 per pair whatever the frame rate: innovations scaled by sqrt(1 - r^2).
    scale = np.sqrt(np.clip(1.0 - r**2, 1e-6, None))
    eps = rng.normal(0.0, 1.0, size=(frames, pairs, 2)) * (noise + 0.6) * scale[None, :, None]
    push = drive[:, : 2 * pairs].reshape(frames, pairs, 2) * scale[None, :, None] * 0.5
    x = np.zeros((pairs, 2))
    out = np.zeros((frames, d))
    for t in range(frames):
        a, b = x[:, 0], x[:, 1]
        x = np.stack([cos * a - sin * b, sin * a + cos * b], axis=1) + eps[t] + push[t]
        out[t, : 2 * pairs] = x.reshape(-1)
    if d % 2:  # an odd dimension follows the behaviour drive alone
        out[:, -1] = _smooth(np.tanh(drive[:, -1]), tau / dt)
    return out


def _switching(
    rng: np.random.Generator,
    animal: _Animal,
    drive: np.ndarray,
    dt: float,
    tau: float,
    noise: float,
) -> np.ndarray:
    frames, d = drive.shape
    params = _animal_rng(animal, "switching")
    states = int(params.integers(3, 7))
    means = params.normal(0.0, 1.5, size=(states, d))
    dwell_s = float(np.exp(params.uniform(math.log(1.0), math.log(10.0))))
    # Running (the first behaviour channel) pulls the chain towards state 0.
    run = drive[:, 0] - drive[:, 0].mean()
    p_leave = 1.0 - math.exp(-dt / dwell_s)
    u, pick = rng.random(frames), rng.integers(0, states, size=frames)
    state = np.empty(frames, np.int64)
    s = 0
    for t in range(frames):
        if u[t] < p_leave:
            s = 0 if run[t] > 1.0 and pick[t] % 2 == 0 else int(pick[t])
        state[t] = s
    target = means[state] + 0.3 * np.tanh(drive)
    wobble = _smooth(rng.normal(0.0, noise, size=(frames, d)), 0.25 * tau / dt)
    return _smooth(target, tau / dt) + wobble


def _assemblies(
    rng: np.random.Generator,
    animal: _Animal,
    drive: np.ndarray,
    dt: float,
    tau: float,
    noise: float,
) -> np.ndarray:
    frames, d = drive.shape
    params = _animal_rng(animal, "assemblies")
    rate_hz = np.exp(params.uniform(math.log(0.02), math.log(0.3), size=d))
    # Behaviour modulates each assembly's event rate (up to e-fold).
    modulation = np.exp(np.clip(0.5 * drive, -1.5, 1.5))
    events = rng.random((frames, d)) < np.clip(rate_hz * dt * modulation, 0, 0.5)
    amplitude = rng.exponential(1.0, size=(frames, d)) * events
    bursts = _smooth(amplitude * (tau / dt), tau / dt)  # decays with tau, peak ~ amplitude
    background = _smooth(rng.normal(0.0, noise, size=(frames, d)), tau / dt)
    return 2.0 * bursts + background


def _smooth(x: np.ndarray, tau_frames: float) -> np.ndarray:
    """Causal first-order low-pass along time (axis 0)."""
    from scipy import signal

    a = math.exp(-1.0 / max(tau_frames, 1e-6))
    return signal.lfilter([1.0 - a], [1.0, -a], x, axis=0)


_FAMILIES: dict[str, Callable[..., np.ndarray]] = {
    "rnn": _rnn,
    "oscillator": _oscillator,
    "switching": _switching,
    "assemblies": _assemblies,
}


def simulate_latents(
    rng: np.random.Generator,
    animal: _Animal,
    behavior_z: np.ndarray,
    family: str,
    fps: float,
    tau_s: float,
    noise: float,
) -> np.ndarray:
    """``[T, D]`` float32 latent trajectory of ``animal``'s ``family`` driven by ``behavior_z [T, 3]``."""
    drive = behavior_z @ animal.input_weights.T + animal.latent_bias  # [T, D]
    return _FAMILIES[family](rng, animal, drive, 1.0 / fps, tau_s, noise).astype(np.float32)
