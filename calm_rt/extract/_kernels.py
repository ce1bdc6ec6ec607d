"""numba kernels of the extraction (nogil: the service runs them beside its I/O threads).

Shared by motion correction, trace sampling and the automatic segmentation.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = [
    "bilinear",
    "frame_stats",
    "frame_stats_float",
    "sample_pixels",
    "sample_region",
    "whiten_times",
]


@numba.njit(cache=True, nogil=True)
def frame_stats(flat, saturation):  # pragma: no cover - compiled
    """``(min, max, saturated count, non-finite count)`` of a flat frame in one pass."""
    lo = flat[0]
    hi = flat[0]
    n_sat = 0
    for i in range(flat.size):
        v = flat[i]
        lo = min(lo, v)
        hi = max(hi, v)
        n_sat += v >= saturation
    return float(lo), float(hi), n_sat, 0


@numba.njit(cache=True, nogil=True)
def frame_stats_float(flat, saturation):  # pragma: no cover - compiled
    """:func:`_frame_stats` for float frames, which may hold NaN or inf."""
    lo = np.inf
    hi = -np.inf
    n_sat = 0
    n_bad = 0
    for i in range(flat.size):
        v = flat[i]
        if not (v - v == 0.0):  # NaN or +-inf
            n_bad += 1
            continue
        lo = min(lo, v)
        hi = max(hi, v)
        n_sat += v >= saturation
    return float(lo), float(hi), n_sat, n_bad


@numba.njit(cache=True, nogil=True, inline="always")
def bilinear(frame, y, x):  # pragma: no cover - compiled
    """``frame`` at the real position ``(y, x)``; outside the frame, the nearest edge."""
    h, w = frame.shape
    y = min(max(y, 0.0), h - 1.0)
    x = min(max(x, 0.0), w - 1.0)
    y0 = int(y)
    x0 = int(x)
    fy = y - y0
    fx = x - x0
    y1 = min(y0 + 1, h - 1)
    x1 = min(x0 + 1, w - 1)
    top = (1.0 - fx) * frame[y0, x0] + fx * frame[y0, x1]
    bottom = (1.0 - fx) * frame[y1, x0] + fx * frame[y1, x1]
    return (1.0 - fy) * top + fy * bottom


@numba.njit(cache=True, nogil=True)
def sample_pixels(frame, flat_idx, ys, xs, dy, dx, out):  # pragma: no cover - compiled
    """``out[k] = frame(ys[k] + dy, xs[k] + dx)``, bilinear; ``flat_idx[k] = ys[k] * W + xs[k]``.

    The shift is the same for every pixel, so the four bilinear weights are
    too: each pixel whose 2x2 neighbourhood lies inside the frame costs four
    loads at fixed offsets; only pixels near the edge take the clamped path.
    """
    h, w = frame.shape
    flat = frame.reshape(-1)  # float32: numba's uint16 -> float loads are ~2x slower
    iy = int(math.floor(dy))
    ix = int(math.floor(dx))
    fy = np.float32(dy - iy)
    fx = np.float32(dx - ix)
    one = np.float32(1.0)
    w00 = (one - fy) * (one - fx)
    w01 = (one - fy) * fx
    w10 = fy * (one - fx)
    w11 = fy * fx
    off = iy * w + ix
    for k in range(flat_idx.size):
        y = ys[k] + iy
        x = xs[k] + ix
        if 0 <= y < h - 1 and 0 <= x < w - 1:
            p = flat_idx[k] + off
            out[k] = w00 * flat[p] + w01 * flat[p + 1] + w10 * flat[p + w] + w11 * flat[p + w + 1]
        else:
            out[k] = bilinear(frame, ys[k] + dy, xs[k] + dx)


@numba.njit(cache=True, nogil=True)
def sample_region(frame, y0, x0, dy, dx, out):  # pragma: no cover - compiled
    """``out[i, j] = frame(y0 + i + dy, x0 + j + dx)``, bilinear: a shifted window of the frame."""
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = bilinear(frame, y0 + i + dy, x0 + j + dx)


@numba.njit(cache=True, nogil=True)
def whiten_times(spec, cf, eps):  # pragma: no cover - compiled
    """In place: ``spec = spec / (|spec| + eps) * cf`` (phase-only cross-power spectrum)."""
    s = spec.reshape(-1)
    c = cf.reshape(-1)
    for k in range(s.size):
        re = s[k].real
        im = s[k].imag
        cr = c[k].real
        ci = c[k].imag
        inv = np.float32(1.0) / (np.sqrt(re * re + im * im) + eps)
        s[k] = complex((re * cr - im * ci) * inv, (re * ci + im * cr) * inv)
