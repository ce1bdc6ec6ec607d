"""A two-photon calcium-imaging simulator with known ground truth.

The model, the extraction and the benchmarks are measured against it, so it
follows the biophysics rather than being convenient:

* **Animals.** Each animal has a low-dimensional latent dynamical system
  driven by its behaviour: a small random rate RNN by default, or damped
  oscillators, switching population states or sparse assembly bursts
  (:mod:`calm_rt.data._latents`). Sessions of one
  animal share that system and sample different, overlapping subsets of the
  animal's neurons (chronic imaging of one field, re-found cells).
* **Behaviour.** Locomotion bouts (running speed, two-state Markov bouts),
  slow arousal (pupil: an Ornstein-Uhlenbeck process pulled up by running)
  and discrete stimulus presentations (1 s boxcars at Poisson onsets).
* **Neurons.** Mixed tuning: every neuron mixes latent, running, pupil and
  stimulus drive, with one dominant (its functional ``type``). Log-rates are
  linear in the drive; spikes are Poisson per frame.
* **Calcium and fluorescence.** Spikes through a double-exponential indicator
  kernel with GCaMP6s/6f/8m rise and decay times, a saturating dF/F response,
  slow multiplicative baseline drift (bleaching), neuropil contamination with
  a per-neuron coefficient, then photon shot noise and read noise.
* **Movies** (optional): the same cells rendered as footprints on a 2D field
  with a smooth background and neuropil, rigid motion jitter, shot and read
  noise, as uint16 frames - with footprints, shifts and true traces saved.

``SimConfig(varied=True)`` gives every animal its own frame rate (1-30 Hz),
neuron count, indicator, latent family, time constants, firing rates, photon
budget and neuropil (:func:`varied_config`): the pretraining corpus of a model
that must transfer to recordings nobody here has seen.

Everything is deterministic for a seed: each animal, session and component
draws from its own child of one ``numpy.random.SeedSequence``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import signal

from calm_rt.data._latents import LATENT_FAMILIES, simulate_latents
from calm_rt.data._session import Session, validate_session
from calm_rt.errors import ConfigError

__all__ = [
    "BEHAVIOR_NAMES",
    "INDICATORS",
    "LATENT_FAMILIES",
    "NEURON_TYPES",
    "AnimalModel",
    "Indicator",
    "SessionTruth",
    "SimConfig",
    "make_animal",
    "simulate_session",
    "varied_config",
]

BEHAVIOR_NAMES = ("running_speed", "pupil", "stimulus")
NEURON_TYPES = ("latent", "running", "pupil", "stimulus")
_TYPE_PROBS = (0.4, 0.25, 0.15, 0.2)


@dataclass(frozen=True)
class Indicator:
    """A genetically encoded calcium indicator's response to one spike.

    Attributes:
        tau_rise_s, tau_decay_s: double-exponential kernel time constants.
        dff_per_spike: dF/F of an isolated spike, below saturation.
        saturation_spikes: calcium level (in single-spike peaks) at which
            the dF/F response is half of its linear extrapolation.
    """

    name: str
    tau_rise_s: float
    tau_decay_s: float
    dff_per_spike: float
    saturation_spikes: float = 12.0


# Values in the range reported by Chen et al. 2013 (GCaMP6) and Zhang et al.
# 2023 (jGCaMP8) for single action potentials in cortical neurons.
INDICATORS: dict[str, Indicator] = {
    "GCaMP6s": Indicator("GCaMP6s", tau_rise_s=0.08, tau_decay_s=1.2, dff_per_spike=0.25),
    "GCaMP6f": Indicator("GCaMP6f", tau_rise_s=0.04, tau_decay_s=0.45, dff_per_spike=0.18),
    "GCaMP8m": Indicator("GCaMP8m", tau_rise_s=0.01, tau_decay_s=0.25, dff_per_spike=0.30),
}


@dataclass(frozen=True)
class SimConfig:
    """What to simulate. ``neurons`` and ``frames`` are per session."""

    animals: int = 2
    sessions: int = 2
    neurons: int = 120
    frames: int = 3000
    fps: float = 30.0
    indicator: str = "mixed"  # a key of INDICATORS, or "mixed": cycle over animals
    latent_dim: int = 8
    latent_tau_s: float = 0.8
    latent_gain: float = 1.4
    latent_noise: float = 0.4
    latent_family: str = "rnn"  # one of LATENT_FAMILIES
    mean_rate_hz: float = 1.5  # median base firing rate of the animal's cells
    pool_factor: float = 1.5  # each animal has pool_factor * neurons cells
    baseline_photons: float = 400.0
    read_noise_photons: float = 4.0
    neuropil_level: float = 0.5  # neuropil brightness relative to the cell's
    movie: bool = False
    movie_size: int = 256
    motion_px: float = 1.5
    seed: int = 0
    # Each animal draws its own rate, neurons (up to ``neurons``), indicator, latent
    # family, time constants, firing rates, photons and neuropil (varied_config).
    varied: bool = False

    def __post_init__(self) -> None:
        for name in ("animals", "sessions", "neurons", "frames", "latent_dim"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.frames < 10:
            raise ConfigError(f"frames must be >= 10, got {self.frames}")
        if not 1.0 <= self.fps <= 200.0:
            raise ConfigError(f"fps must be in [1, 200] Hz, got {self.fps}")
        if self.indicator != "mixed" and self.indicator not in INDICATORS:
            raise ConfigError(
                f"indicator must be 'mixed' or one of {sorted(INDICATORS)}, got {self.indicator!r}"
            )
        if self.latent_family not in LATENT_FAMILIES:
            raise ConfigError(
                f"latent_family must be one of {LATENT_FAMILIES}, got {self.latent_family!r}"
            )
        if self.pool_factor < 1.0:
            raise ConfigError(f"pool_factor must be >= 1, got {self.pool_factor}")
        if self.movie and self.movie_size < 32:
            raise ConfigError(f"movie_size must be >= 32 pixels, got {self.movie_size}")

    def indicator_for(self, animal: int) -> Indicator:
        if self.indicator == "mixed":
            return list(INDICATORS.values())[animal % len(INDICATORS)]
        return INDICATORS[self.indicator]


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent generator for one (animal, session, component) key."""
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def varied_config(config: SimConfig, index: int) -> SimConfig:
    """Animal ``index``'s own configuration in a varied corpus (``config.varied``).

    Ranges cover what two-photon and light-sheet labs record: 1-30 Hz,
    50 to ``config.neurons`` cells (log-uniform), GCaMP6s/6f/8m, every latent
    family, latent time constants of 0.3-3 s, median firing rates of
    0.3-5 Hz, 100-2,000 photons per frame at baseline, neuropil at 0.2-0.8
    of the cell's brightness. Deterministic for (seed, index).
    """
    if not config.varied:
        return config
    rng = _rng(config.seed, index, 0, 99)
    low = min(50, config.neurons)
    return replace(
        config,
        varied=False,
        fps=round(_log_uniform(rng, 1.0, 30.0), 2),
        neurons=int(round(_log_uniform(rng, low, config.neurons))),
        indicator=str(rng.choice(sorted(INDICATORS))),
        latent_family=str(rng.choice(LATENT_FAMILIES)),
        latent_dim=int(rng.integers(4, 13)),
        latent_tau_s=_log_uniform(rng, 0.3, 3.0),
        latent_gain=float(rng.uniform(1.0, 1.8)),
        latent_noise=float(rng.uniform(0.2, 0.8)),
        mean_rate_hz=_log_uniform(rng, 0.3, 5.0),
        baseline_photons=_log_uniform(rng, 100.0, 2000.0),
        neuropil_level=float(rng.uniform(0.2, 0.8)),
    )


# ---------------------------------------------------------------------------
# Animals: latent system and neuron pool


@dataclass(frozen=True, eq=False)
class AnimalModel:
    """What sessions of one animal share."""

    index: int
    seed: int
    indicator: Indicator
    recurrent: np.ndarray  # [D, D] latent RNN weights
    input_weights: np.ndarray  # [D, 3] behaviour -> latent drive
    latent_bias: np.ndarray  # [D]
    neuron_types: np.ndarray  # [P] index into NEURON_TYPES
    mix: np.ndarray  # [P, 4] weight of latent, running, pupil, stimulus drive
    latent_readout: np.ndarray  # [P, D] unit vectors
    base_rate_hz: np.ndarray  # [P]
    rate_gain: np.ndarray  # [P]
    baseline_photons: np.ndarray  # [P]
    neuropil_coef: np.ndarray  # [P] true contamination coefficient

    @property
    def pool_size(self) -> int:
        return int(self.neuron_types.shape[0])

    @property
    def animal_id(self) -> str:
        # The seed is part of the id: animal 0 of seed 1 and of seed 2 are
        # different animals, and held-out-animal splits must know it.
        return f"sim{self.seed}-animal{self.index:02d}"


def make_animal(config: SimConfig, index: int) -> AnimalModel:
    """Draw one animal's latent system and neuron pool."""
    rng = _rng(config.seed, index, 0)
    d = config.latent_dim
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    recurrent = config.latent_gain * q  # orthogonal * gain: rich, bounded by tanh
    input_weights = rng.normal(scale=1.2, size=(d, len(BEHAVIOR_NAMES)))
    latent_bias = rng.normal(scale=0.2, size=d)
    pool = int(math.ceil(config.pool_factor * config.neurons))
    types = rng.choice(len(NEURON_TYPES), size=pool, p=_TYPE_PROBS)
    mix = 0.3 * rng.random((pool, len(NEURON_TYPES)))
    mix[np.arange(pool), types] += 1.0
    mix /= np.linalg.norm(mix, axis=1, keepdims=True)
    readout = rng.normal(size=(pool, d))
    readout /= np.linalg.norm(readout, axis=1, keepdims=True)
    return AnimalModel(
        index=index,
        seed=config.seed,
        indicator=config.indicator_for(index),
        recurrent=recurrent,
        input_weights=input_weights,
        latent_bias=latent_bias,
        neuron_types=types,
        mix=mix,
        latent_readout=readout,
        base_rate_hz=np.exp(rng.normal(math.log(config.mean_rate_hz), 0.6, size=pool)),
        rate_gain=rng.uniform(0.9, 1.6, size=pool),
        baseline_photons=config.baseline_photons * np.exp(rng.normal(0.0, 0.35, size=pool)),
        neuropil_coef=rng.uniform(0.6, 0.8, size=pool),
    )


# ---------------------------------------------------------------------------
# Behaviour and latents


def _lowpass(x: np.ndarray, tau_frames: float, axis: int = 0) -> np.ndarray:
    """Causal first-order low-pass filter with time constant ``tau_frames``."""
    a = math.exp(-1.0 / max(tau_frames, 1e-6))
    return signal.lfilter([1.0 - a], [1.0, -a], x, axis=axis)


def _simulate_behavior(rng: np.random.Generator, frames: int, fps: float) -> np.ndarray:
    """``[T, 3]``: running speed (cm/s), pupil (a.u.), stimulus on (0/1)."""
    dt = 1.0 / fps
    running = np.zeros(frames, bool)
    state = False
    p_start, p_stop = dt / 8.0, dt / 4.0  # mean rest 8 s, mean bout 4 s
    u = rng.random(frames)
    for t in range(frames):
        state = (u[t] >= p_stop) if state else (u[t] < p_start)
        running[t] = state
    # Each bout has its own target speed; the animal accelerates smoothly.
    bout_id = np.cumsum(np.diff(running.astype(int), prepend=0) == 1)
    targets = rng.uniform(10.0, 35.0, size=bout_id.max() + 2)
    target = np.where(running, targets[bout_id], 0.0)
    speed = _lowpass(target, 0.4 * fps) + rng.normal(0.0, 0.8, frames) * running
    speed = np.clip(speed, 0.0, None)
    arousal = _lowpass(running.astype(float), 2.0 * fps)
    ou = _lowpass(rng.normal(0.0, math.sqrt(2.0 * 8.0 * fps), frames), 8.0 * fps)
    pupil = 1.0 + 0.15 * ou + 0.5 * arousal + rng.normal(0.0, 0.01, frames)
    stim = np.zeros(frames)
    t = int(rng.exponential(5.0 * fps))
    while t < frames:
        stim[t : t + int(round(1.0 * fps))] = 1.0
        t += int(round(3.0 * fps + rng.exponential(7.0 * fps)))
    return np.stack([speed, pupil, stim], axis=1).astype(np.float32)


def _standardize(x: np.ndarray, axis: int = 0) -> np.ndarray:
    return (x - x.mean(axis=axis, keepdims=True)) / (x.std(axis=axis, keepdims=True) + 1e-8)


def _simulate_latents(
    rng: np.random.Generator, animal: AnimalModel, behavior_z: np.ndarray, config: SimConfig
) -> np.ndarray:
    """``[T, D]`` latent trajectory of the animal's system driven by behaviour."""
    return simulate_latents(
        rng, animal, behavior_z, config.latent_family, config.fps, config.latent_tau_s,
        config.latent_noise,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# Spikes to fluorescence


def _calcium(spikes: np.ndarray, indicator: Indicator, fps: float) -> np.ndarray:
    """Double-exponential indicator kernel, peak-normalised to 1 per spike. ``[N, T]``."""
    dt = 1.0 / fps
    ad = math.exp(-dt / indicator.tau_decay_s)
    ar = math.exp(-dt / indicator.tau_rise_s)
    decay = signal.lfilter([1.0], [1.0, -ad], spikes, axis=1)
    rise = signal.lfilter([1.0], [1.0, -ar], spikes, axis=1)
    kernel = decay - rise
    # Peak of the continuous kernel exp(-t/td) - exp(-t/tr) to normalise.
    td, tr = indicator.tau_decay_s, indicator.tau_rise_s
    t_peak = td * tr / (td - tr) * math.log(td / tr)
    peak = math.exp(-t_peak / td) - math.exp(-t_peak / tr)
    # Sampled at frame times the peak is a little lower; keep the continuous
    # normalisation so one spike means the same calcium at any frame rate.
    return (kernel / peak).astype(np.float32)


def _dff_response(calcium: np.ndarray, indicator: Indicator) -> np.ndarray:
    """Saturating dF/F: linear for few spikes, saturating for bursts."""
    k = indicator.saturation_spikes
    return indicator.dff_per_spike * k * calcium / (calcium + k)


@dataclass(frozen=True, eq=False)
class SessionTruth:
    """What the simulator knows and a real experiment does not."""

    spikes: np.ndarray  # [N, T] uint8 counts per frame
    rates_hz: np.ndarray  # [N, T] float32
    calcium: np.ndarray  # [N, T] float32, single-spike peaks
    cell_fluorescence: np.ndarray  # [N, T] float32, noiseless cell F (no neuropil)
    latents: np.ndarray  # [T, D] float32
    neuron_types: tuple[str, ...]
    pool_index: np.ndarray  # [N] which of the animal's cells
    neuropil_coef: np.ndarray  # [N]
    indicator: Indicator
    stimulus_onsets: np.ndarray  # frame indices


def simulate_session(
    config: SimConfig, animal: AnimalModel, session_index: int
) -> tuple[Session, SessionTruth]:
    """Simulate one session of ``animal``; returns the session and its truth."""
    rng = _rng(config.seed, animal.index, session_index + 1)
    frames, fps, n = config.frames, config.fps, config.neurons
    behavior = _simulate_behavior(rng, frames, fps)
    behavior_z = _standardize(behavior)
    latents = _simulate_latents(rng, animal, behavior_z, config)
    cells = np.sort(rng.choice(animal.pool_size, size=n, replace=False))

    # Drive: each neuron mixes a latent projection with the behaviour channels.
    latent_drive = _standardize(latents @ animal.latent_readout[cells].T)  # [T, N]
    stim_drive = _standardize(_lowpass(behavior[:, 2], 0.15 * fps))
    components = np.stack(
        [
            latent_drive,
            np.broadcast_to(behavior_z[:, :1], latent_drive.shape),
            np.broadcast_to(behavior_z[:, 1:2], latent_drive.shape),
            np.broadcast_to(stim_drive[:, None], latent_drive.shape),
        ],
        axis=-1,
    )  # [T, N, 4]
    drive = np.einsum("tnk,nk->nt", components, animal.mix[cells])
    gain = animal.rate_gain[cells, None]
    rates = animal.base_rate_hz[cells, None] * np.exp(gain * drive - 0.5 * gain**2)
    rates = np.minimum(rates, 40.0).astype(np.float32)
    spikes = rng.poisson(rates / fps).astype(np.uint8)

    indicator = animal.indicator
    calcium = _calcium(spikes.astype(np.float32), indicator, fps)
    dff = _dff_response(calcium, indicator)

    # Slow multiplicative drift (bleaching plus wander) of each cell's baseline.
    t_axis = np.arange(frames) / frames
    wander = _lowpass(rng.normal(0.0, 1.0, size=(n, frames)), 60.0 * fps, axis=1)
    wander *= 0.05 / (wander.std(axis=1, keepdims=True) + 1e-8)
    drift = (1.0 - 0.05 * t_axis)[None, :] * (1.0 + wander)
    f0 = animal.baseline_photons[cells, None] * drift
    cell_f = (f0 * (1.0 + dff)).astype(np.float32)

    # Neuropil: the local population's smoothed activity plus slow background.
    pop = _lowpass(dff.mean(axis=0), 0.5 * fps)
    local = _lowpass(rng.normal(0.0, 1.0, size=(n, frames)), 2.0 * fps, axis=1)
    local *= 0.03 / (local.std(axis=1, keepdims=True) + 1e-8)
    npil_true = config.neuropil_level * f0 * (1.0 + 2.0 * pop[None, :] + local)
    coef = animal.neuropil_coef[cells]
    measured = cell_f + coef[:, None] * npil_true

    # Photon shot noise and read noise; the neuropil annulus collects ~4x the
    # photons of the soma, hence its relatively lower noise.
    read = config.read_noise_photons
    traces = rng.poisson(np.clip(measured, 0, None)).astype(np.float32)
    traces += rng.normal(0.0, read, size=traces.shape).astype(np.float32)
    neuropil = rng.poisson(4.0 * np.clip(npil_true, 0, None)).astype(np.float32) / 4.0
    neuropil += rng.normal(0.0, read / 2.0, size=neuropil.shape).astype(np.float32)

    onsets = np.flatnonzero(np.diff(behavior[:, 2], prepend=0.0) > 0.5)
    pool_ids = tuple(f"{animal.animal_id}-n{c:04d}" for c in cells)
    session = validate_session(
        Session(
            traces=traces,
            fps=fps,
            behavior=behavior,
            behavior_names=BEHAVIOR_NAMES,
            kind="F",
            neuropil=neuropil,
            animal_id=animal.animal_id,
            session_id=f"{animal.animal_id}-s{session_index:02d}",
            neuron_ids=pool_ids,
        )
    )
    truth = SessionTruth(
        spikes=spikes,
        rates_hz=rates,
        calcium=calcium,
        cell_fluorescence=cell_f,
        latents=latents,
        neuron_types=tuple(NEURON_TYPES[k] for k in animal.neuron_types[cells]),
        pool_index=cells,
        neuropil_coef=coef.astype(np.float32),
        indicator=indicator,
        stimulus_onsets=onsets,
    )
    return session, truth
