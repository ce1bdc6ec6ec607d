"""Render a simulated session as a two-photon movie with known footprints and motion.

The same cells as the traces, as footprints on a 2D field with a smooth
background and neuropil, rigid motion jitter, shot and read noise, as uint16
frames - with footprints, shifts and true traces kept in :class:`MovieTruth`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage, sparse

from calm_rt.data._movies import labels_from_weights
from calm_rt.data._session import Session
from calm_rt.data._simulate import SessionTruth, SimConfig, _dff_response, _lowpass, _rng

__all__ = ["MovieTruth", "render_movie"]


@dataclass(frozen=True, eq=False)
class MovieTruth:
    """Ground truth of a rendered movie.

    ``shifts[t] = (dy, dx)`` is how far the scene moved in frame t, in pixels;
    a motion corrector must shift frame t by ``-shifts[t]`` to undo it.
    Footprints are sparse: footprint i's pixels are
    ``footprint_pixels[indptr[i]:indptr[i+1]]`` (flat indices into H*W) with
    weights summing to 1, so the footprint-weighted sum of a motion-free,
    noise-free frame is the cell's fluorescence.
    """

    shape: tuple[int, int]
    centers: np.ndarray  # [N, 2] (y, x) pixels
    footprint_indptr: np.ndarray  # [N + 1]
    footprint_pixels: np.ndarray  # [nnz] flat pixel index
    footprint_weights: np.ndarray  # [nnz] float32
    shifts: np.ndarray  # [T, 2] float32 (dy, dx)
    cell_fluorescence: np.ndarray  # [N, T] photons per frame (summed over the footprint)
    gain_adu_per_photon: float
    offset_adu: float

    def footprint_images(self) -> np.ndarray:
        """Dense ``[N, H, W]`` float32 footprints (for tests and display)."""
        n = self.centers.shape[0]
        h, w = self.shape
        out = np.zeros((n, h * w), np.float32)
        for i in range(n):
            sl = slice(self.footprint_indptr[i], self.footprint_indptr[i + 1])
            out[i, self.footprint_pixels[sl]] = self.footprint_weights[sl]
        return out.reshape(n, h, w)

    def weights(self) -> Any:
        """Sparse ``[N, H*W]`` CSR float32 footprints (what ``Footprints.weights`` holds)."""
        n = self.centers.shape[0]
        return sparse.csr_matrix(
            (self.footprint_weights, self.footprint_pixels, self.footprint_indptr),
            shape=(n, self.shape[0] * self.shape[1]),
        )

    def label_image(self) -> np.ndarray:
        """``[H, W]`` int32: 1 + the index of the strongest footprint, 0 for none."""
        return labels_from_weights(self.weights(), self.shape)


def _place_cells(rng: np.random.Generator, n: int, size: int, radius: float) -> np.ndarray:
    """Centres at least ~2 radii apart (relaxed if the field is crowded)."""
    margin = radius + 2
    centers: list[np.ndarray] = []
    min_dist = 2.2 * radius
    tries = 0
    while len(centers) < n:
        c = rng.uniform(margin, size - margin, size=2)
        if all(np.hypot(*(c - o)) >= min_dist for o in centers):
            centers.append(c)
        tries += 1
        if tries > 200 * n:
            min_dist *= 0.9
            tries = 0
    return np.array(centers)


def render_movie(
    session: Session,
    truth: SessionTruth,
    config: SimConfig,
    seed_key: int = 0,
    chunk: int = 256,
) -> tuple[Callable[[], Iterator[np.ndarray]], MovieTruth]:
    """Render the session's cells as a uint16 movie ``[T, H, W]``.

    Returns a generator factory yielding chunks of frames (so a long movie
    never sits in memory whole) and the movie's truth.
    """
    rng = _rng(config.seed, 1000 + seed_key, 7)
    size = config.movie_size
    n, frames = session.n_neurons, session.n_frames
    radius = 4.5
    centers = _place_cells(rng, n, size, radius)

    # Elliptical Gaussian footprints truncated at ~2 sigma, normalised to sum 1.
    yy, xx = np.mgrid[0:size, 0:size]
    indptr = [0]
    pixels: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for cy, cx in centers:
        sy, sx = rng.uniform(0.7, 1.1, size=2) * radius / 1.6
        theta = rng.uniform(0, np.pi)
        y0, y1 = int(max(cy - 3 * radius, 0)), int(min(cy + 3 * radius + 1, size))
        x0, x1 = int(max(cx - 3 * radius, 0)), int(min(cx + 3 * radius + 1, size))
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u = dy * math.cos(theta) + dx * math.sin(theta)
        v = -dy * math.sin(theta) + dx * math.cos(theta)
        g = np.exp(-0.5 * ((u / sy) ** 2 + (v / sx) ** 2))
        keep = g > math.exp(-0.5 * 2.0**2)
        flat = (yy[y0:y1, x0:x1][keep] * size + xx[y0:y1, x0:x1][keep]).astype(np.int64)
        wv = g[keep] / g[keep].sum()
        pixels.append(flat)
        weights.append(wv.astype(np.float32))
        indptr.append(indptr[-1] + flat.size)
    indptr_arr = np.array(indptr, np.int64)
    pix = np.concatenate(pixels)
    wts = np.concatenate(weights)

    # Motion: an AR(1) wander with rare small jumps, in pixels.
    steps = rng.normal(0.0, 0.35, size=(frames, 2))
    jumps = (rng.random(frames) < 0.002)[:, None] * rng.normal(0.0, 2.0, size=(frames, 2))
    shifts = np.zeros((frames, 2))
    s = np.zeros(2)
    for t in range(frames):
        s = 0.97 * s + steps[t] * (1 - 0.97**2) ** 0.5 * 3.0 + jumps[t]
        s = np.clip(s, -3 * config.motion_px, 3 * config.motion_px)
        shifts[t] = s
    shifts *= config.motion_px / (shifts.std() + 1e-8) if config.motion_px > 0 else 0.0
    shifts = shifts.astype(np.float32)

    # Static background and a smooth neuropil field, in photons per pixel.
    background = ndimage.gaussian_filter(rng.random((size, size)), size / 8)
    background = 0.5 + background / background.max()
    npil_field = ndimage.gaussian_filter(rng.random((size, size)), size / 16)
    npil_field = 1.0 + npil_field / npil_field.max()
    npil_level = float(np.median(session.neuropil)) / 80.0 if session.neuropil is not None else 1.0

    cell_f = truth.cell_fluorescence  # [N, T], photons summed over the footprint
    from scipy import sparse

    a = sparse.csr_matrix((wts, pix, indptr_arr), shape=(n, size * size)).T.tocsr()  # [HW, N]
    # The same population signal that modulates the session's neuropil traces.
    pop = _lowpass(_dff_response(truth.calcium, truth.indicator).mean(axis=0), 0.5 * config.fps)
    gain, offset = 8.0, 100.0

    def frames_iter() -> Iterator[np.ndarray]:
        noise_rng = _rng(config.seed, 1000 + seed_key, 8)
        for start in range(0, frames, chunk):
            stop = min(start + chunk, frames)
            cells_img = (a @ cell_f[:, start:stop]).T.reshape(stop - start, size, size)
            out = np.empty((stop - start, size, size), np.uint16)
            for j in range(stop - start):
                t = start + j
                img = background + npil_level * npil_field * (1.0 + 2.0 * pop[t]) + cells_img[j]
                img = ndimage.shift(img, shifts[t], order=1, mode="nearest")
                photons = noise_rng.poisson(np.clip(img, 0, None))
                adu = gain * photons + offset + noise_rng.normal(0.0, 3.0, size=img.shape)
                out[j] = np.clip(np.rint(adu), 0, 65535).astype(np.uint16)
            yield out

    truth_movie = MovieTruth(
        shape=(size, size),
        centers=centers.astype(np.float32),
        footprint_indptr=indptr_arr,
        footprint_pixels=pix,
        footprint_weights=wts,
        shifts=shifts,
        cell_fluorescence=cell_f,
        gain_adu_per_photon=gain,
        offset_adu=offset,
    )
    return frames_iter, truth_movie
