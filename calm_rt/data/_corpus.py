"""Simulate a whole corpus into a folder: sessions, ground truth, optional movies, a manifest."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from calm_rt.data._render import MovieTruth, render_movie
from calm_rt.data._session import write_npz
from calm_rt.data._simulate import (
    NEURON_TYPES,
    SessionTruth,
    SimConfig,
    make_animal,
    simulate_session,
    varied_config,
)

__all__ = ["simulate_corpus"]


@dataclass
class CorpusManifest:
    """The small JSON summary written beside a simulated corpus."""

    config: dict
    sessions: list[dict] = field(default_factory=list)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))


def _write_truth(path: Path, truth: SessionTruth) -> None:
    np.savez_compressed(
        path,
        spikes=truth.spikes,
        rates_hz=truth.rates_hz,
        calcium=truth.calcium,
        cell_fluorescence=truth.cell_fluorescence,
        latents=truth.latents,
        neuron_types=np.array(truth.neuron_types, dtype=np.str_),
        pool_index=truth.pool_index,
        neuropil_coef=truth.neuropil_coef,
        indicator=np.str_(truth.indicator.name),
        tau_rise_s=np.float64(truth.indicator.tau_rise_s),
        tau_decay_s=np.float64(truth.indicator.tau_decay_s),
        stimulus_onsets=truth.stimulus_onsets,
    )


def _write_movie(
    path: Path,
    truth_path: Path,
    frames_iter: Callable[[], Iterator[np.ndarray]],
    truth: MovieTruth,
    fps: float,
) -> None:
    import tifffile

    with tifffile.TiffWriter(path, imagej=True) as tif:
        for chunk in frames_iter():
            for frame in chunk:
                tif.write(frame, contiguous=True, metadata={"axes": "TYX", "fps": fps})
    np.savez_compressed(
        truth_path,
        shape=np.array(truth.shape),
        centers=truth.centers,
        footprint_indptr=truth.footprint_indptr,
        footprint_pixels=truth.footprint_pixels,
        footprint_weights=truth.footprint_weights,
        shifts=truth.shifts,
        cell_fluorescence=truth.cell_fluorescence,
        labels=truth.label_image(),
        gain_adu_per_photon=np.float64(truth.gain_adu_per_photon),
        offset_adu=np.float64(truth.offset_adu),
    )


def simulate_corpus(
    config: SimConfig,
    out_dir: str | Path,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Simulate ``animals x sessions`` sessions into ``out_dir``.

    Writes ``<session_id>.npz`` (the session format), ``truth/<session_id>.truth.npz``,
    optionally ``movies/<session_id>.tif`` with ``movies/<session_id>.truth.npz``,
    and ``simulation.json`` (config and a per-session summary). Returns the
    session file paths.
    """
    out = Path(out_dir)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    manifest = CorpusManifest(config=asdict(config))
    paths: list[Path] = []
    for a in range(config.animals):
        own = varied_config(config, a)  # config itself unless config.varied
        animal = make_animal(own, a)
        for s in range(config.sessions):
            session, truth = simulate_session(own, animal, s)
            path = write_npz(out / f"{session.session_id}.npz", session)
            _write_truth(out / "truth" / f"{session.session_id}.truth.npz", truth)
            entry = {
                "file": path.name,
                "session_id": session.session_id,
                "animal_id": session.animal_id,
                "neurons": session.n_neurons,
                "frames": session.n_frames,
                "fps": session.fps,
                "indicator": asdict(truth.indicator),
                "latent_family": own.latent_family,
                "neuron_types": {k: truth.neuron_types.count(k) for k in NEURON_TYPES},
                "mean_rate_hz": float(truth.rates_hz.mean()),
                "stimulus_presentations": int(truth.stimulus_onsets.size),
            }
            if config.movie:
                (out / "movies").mkdir(exist_ok=True)
                frames_iter, mtruth = render_movie(session, truth, own, seed_key=a * 1000 + s)
                movie_path = out / "movies" / f"{session.session_id}.tif"
                _write_movie(
                    movie_path,
                    out / "movies" / f"{session.session_id}.truth.npz",
                    frames_iter,
                    mtruth,
                    own.fps,
                )
                entry["movie"] = str(movie_path.relative_to(out))
            manifest.sessions.append(entry)
            paths.append(path)
            if progress is not None:
                progress(session.summary())
    manifest.write(out / "simulation.json")
    return paths
