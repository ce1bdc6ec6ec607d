"""Rigid motion correction by phase correlation against a reference image.

Phase correlation of the central ``crop x crop`` square against a reference
image, whitened and smoothed by a Gaussian so that the peak is smooth; the
peak's sub-pixel position comes from a three-point Gaussian (log-parabola)
fit per axis. The reference is the running mean of the first
``reference_frames`` frames, each aligned to the mean of those before it; it
can then follow slow drift by an exponential average. An estimate beyond
``max_shift`` is flagged and not applied (the previous accepted shift is
used). See docs/extraction.md.

Shift sign convention: ``shift = (dy, dx)`` is how far the scene moved in
this frame relative to the ROIs' coordinates (the simulator's
``MovieTruth.shifts``); the corrected frame is ``raw(p + shift)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft

from calm_rt.errors import ConfigError, DataError
from calm_rt.extract._kernels import sample_region, whiten_times

__all__ = ["MotionConfig", "MotionCorrector", "MotionEstimate"]


@dataclass(frozen=True)
class MotionConfig:
    """Rigid motion correction knobs.

    Attributes:
        reference_frames: frames averaged (each aligned to the mean of those
            before it) into the reference image.
        crop: side in pixels of the central square used for phase
            correlation (None: the whole frame). 256 keeps a 512x512 frame's
            FFTs at a quarter of the cost; shifts up to ``crop / 2`` are
            measurable, and the square must hold some structure (cells).
        max_shift: the largest plausible shift as a fraction of the frame's
            height (for dy) and width (for dx); a larger estimate is flagged
            and not applied.
        smooth_sigma: Gaussian smoothing of the correlation surface in
            pixels; it suppresses noise-dominated high frequencies and makes
            the peak smooth enough for a sub-pixel fit.
        reference_tau: frames; > 0 updates the reference after the warm-up
            by an exponential average with this time constant (slow drift,
            bleaching); 0 keeps it fixed.
        anchor: where the reference's zero lies. ``"rois"``: registered to
            the ROI weights (cells are brighter than their surround in the
            mean image), falling back to ``"mean"`` when that is not
            confident; ``"mean"``: the mean position of the warm-up frames
            (ROIs drawn on a plain mean image of the raw movie); ``"none"``:
            the first frame's position.
    """

    reference_frames: int = 50
    crop: int | None = 256
    max_shift: float = 0.1
    smooth_sigma: float = 1.15
    reference_tau: float = 0.0
    anchor: str = "rois"

    def __post_init__(self) -> None:
        if self.reference_frames < 1:
            raise ConfigError(f"reference_frames must be >= 1, got {self.reference_frames}")
        if self.crop is not None and self.crop < 16:
            raise ConfigError(f"crop must be None or >= 16 pixels, got {self.crop}")
        if not 0.0 < self.max_shift <= 0.5:
            raise ConfigError(f"max_shift must be in (0, 0.5] of the frame, got {self.max_shift}")
        if self.smooth_sigma <= 0:
            raise ConfigError(f"smooth_sigma must be positive, got {self.smooth_sigma}")
        if self.reference_tau < 0:
            raise ConfigError(f"reference_tau must be >= 0 frames, got {self.reference_tau}")
        if self.anchor not in ("rois", "mean", "none"):
            raise ConfigError(f"anchor must be 'rois', 'mean' or 'none', got {self.anchor!r}")


@dataclass(frozen=True)
class MotionEstimate:
    """One frame's motion: ``dy, dx`` applied (pixels, scene displacement), and how it went."""

    dy: float
    dx: float
    peak: float
    rejected: bool
    warmup: bool


class _Correlator:
    """Whitened, Gaussian-smoothed phase correlation on a fixed window of the frame."""

    def __init__(self, shape: tuple[int, int], box: tuple[int, int, int, int], sigma: float):
        self.shape = shape
        self.y0, self.x0, self.h, self.w = box
        ty = _taper(self.h)
        tx = _taper(self.w)
        self.window = np.outer(ty, tx).astype(np.float32)  # [h, w]
        fy = np.fft.fftfreq(self.h)[:, None]
        fx = np.fft.rfftfreq(self.w)[None, :]
        # A Gaussian of sigma px in space is exp(-2 pi^2 sigma^2 f^2) in frequency.
        self.gauss = np.exp(-2.0 * math.pi**2 * sigma**2 * (fy**2 + fx**2)).astype(np.float32)
        # The surface's value for a perfect match, to normalise peaks to (0, 1].
        self.norm = float(
            scipy.fft.irfft2(self.gauss.astype(np.complex64), s=(self.h, self.w))[0, 0]
        )
        self._buf = np.empty((self.h, self.w), np.float32)

    def window_of(self, image: np.ndarray, cropped: bool = False) -> np.ndarray:
        """The tapered, mean-free window of ``image`` (float32 ``[h, w]``, a reused buffer).

        ``cropped``: ``image`` is already the window's pixels ``[h, w]``.
        """
        buf = self._buf
        buf[...] = (
            image if cropped else image[self.y0 : self.y0 + self.h, self.x0 : self.x0 + self.w]
        )
        buf -= buf.mean()
        buf *= self.window
        return buf

    def template(self, image: np.ndarray, cropped: bool = False) -> np.ndarray:
        """The conjugate whitened, smoothed spectrum of a reference ``image``."""
        spec = scipy.fft.rfft2(self.window_of(image, cropped))
        eps = np.float32(1e-6 * (np.abs(spec).max() + 1e-30))
        return (np.conj(spec) / (np.abs(spec) + eps) * self.gauss).astype(np.complex64)

    def surface(self, image: np.ndarray, template: np.ndarray) -> np.ndarray:
        """Correlation surface ``[h, w]`` of ``image`` against a :meth:`template`."""
        buf = self.window_of(image)
        # Parseval: sqrt(sum x^2) is the spectrum's rms magnitude, so eps is
        # a tiny fraction of a typical bin (whitening, not division by zero).
        eps = np.float32(1e-4 * math.sqrt(float(np.dot(buf.ravel(), buf.ravel()))) + 1e-30)
        spec = scipy.fft.rfft2(buf)
        whiten_times(spec, template, eps)
        return scipy.fft.irfft2(spec, s=(self.h, self.w))

    def peak(self, surf: np.ndarray) -> tuple[float, float, float]:
        """``(dy, dx, peak)``: the surface's maximum, sub-pixel, as a displacement."""
        h, w = surf.shape
        iy, ix = divmod(int(np.argmax(surf)), w)
        c = float(surf[iy, ix])
        dy = iy + _subpixel(float(surf[(iy - 1) % h, ix]), c, float(surf[(iy + 1) % h, ix]))
        dx = ix + _subpixel(float(surf[iy, (ix - 1) % w]), c, float(surf[iy, (ix + 1) % w]))
        # Indices past the middle are negative displacements (the FFT wraps).
        dy = dy - h if dy > h / 2 else dy
        dx = dx - w if dx > w / 2 else dx
        return dy, dx, c / self.norm


def _taper(n: int, fraction: float = 0.125) -> np.ndarray:
    """1 in the middle, a raised-cosine ramp over ``fraction`` of each end (a Tukey window)."""
    ramp = max(1, int(round(fraction * n)))
    t = np.ones(n)
    edge = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
    t[:ramp] = edge
    t[n - ramp :] = edge[::-1]
    return t


def _subpixel(left: float, centre: float, right: float) -> float:
    """Offset of a peak from its centre sample in [-0.5, 0.5].

    A Gaussian fit through the three samples (a parabola through their logs)
    is exact for the Gaussian-smoothed peak; a plain parabola when a sample
    is not positive.
    """
    if left > 0 and centre > 0 and right > 0:
        left, centre, right = math.log(left), math.log(centre), math.log(right)
    denom = left - 2.0 * centre + right
    if denom >= 0:  # not a maximum (flat or noise): no refinement
        return 0.0
    return float(min(0.5, max(-0.5, 0.5 * (left - right) / denom)))


def _fourier_shift(image: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """``image`` moved by ``(dy, dx)`` pixels, exactly for band-limited images (edges wrap).

    Used for one-off moves of the reference, where a bilinear shift would
    blur it and a spline (scipy.ndimage.shift) costs ~30 ms at 512x512.
    """
    h, w = image.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    spec = scipy.fft.rfft2(np.asarray(image, np.float32))
    # The phase ramp is separable: two small exponentials instead of H*W.
    spec *= np.exp(-2j * np.pi * fy * dy).astype(np.complex64)
    spec *= np.exp(-2j * np.pi * fx * dx).astype(np.complex64)
    return scipy.fft.irfft2(spec, s=(h, w)).astype(np.float32)


def _centre_box(shape: tuple[int, int], crop: int | None) -> tuple[int, int, int, int]:
    h, w = shape
    ch = h if crop is None else min(crop, h)
    cw = w if crop is None else min(crop, w)
    ch, cw = ch - ch % 2, cw - cw % 2  # even sides: the rfft half-spectrum is simplest
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class MotionCorrector:
    """Rigid motion estimation, one frame at a time, against a reference image.

    Args:
        shape: ``(H, W)`` of the session's frames.
        config: :class:`MotionConfig`.
        reference: ``[H, W]`` an image already in the ROIs' coordinates (e.g.
            suite2p's ``meanImg``); skips the warm-up.
        anchor_map: ``[H, W]`` the ROI weights summed, for ``anchor="rois"``.

    :meth:`register` takes each frame and returns a :class:`MotionEstimate`;
    it never modifies the frame.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        config: MotionConfig | None = None,
        *,
        reference: np.ndarray | None = None,
        anchor_map: np.ndarray | None = None,
    ) -> None:
        self.config = config or MotionConfig()
        self.shape = (int(shape[0]), int(shape[1]))
        h, w = self.shape
        if min(h, w) < 16:
            raise ConfigError(
                f"motion correction needs frames of 16x16 pixels or more, got {shape}"
            )
        self.max_shift = (self.config.max_shift * h, self.config.max_shift * w)
        self._crop = _Correlator(
            self.shape, _centre_box(self.shape, self.config.crop), self.config.smooth_sigma
        )
        self._anchor_map = None if anchor_map is None else np.asarray(anchor_map, np.float32)
        self._full: _Correlator | None = None
        self._anchor_template: np.ndarray | None = None
        if self.config.anchor == "rois" and self._anchor_map is not None and reference is None:
            # Whole-frame correlator and the ROI map's spectrum, built now
            # rather than on the first frame (a one-off ~10 ms at 512x512).
            self._full = _Correlator(self.shape, (0, 0, h, w), self.config.smooth_sigma)
            self._anchor_template = self._full.template(self._anchor_map)
        self._given_reference = None
        if reference is not None:
            ref = np.asarray(reference, np.float32)
            if ref.shape != self.shape or not np.isfinite(ref).all():
                raise DataError(
                    f"reference must be a finite image of the frames' shape {self.shape}, "
                    f"got {ref.shape}",
                    field="reference",
                )
            self._given_reference = ref
        self.reset()

    def reset(self) -> None:
        """Forget the reference (rebuilt from the next frames) and the last shift."""
        self.reference: np.ndarray | None = None  # [H, W] float32 once ready
        self._template: np.ndarray | None = None
        self._sum = np.zeros(self.shape, np.float64)
        self._n = 0
        self._warmup_shifts: list[tuple[float, float]] = []
        self._frame_buf = np.empty(self.shape, np.float32)
        self._crop_buf = np.empty((self._crop.h, self._crop.w), np.float32)
        self.last = (0.0, 0.0)  # last accepted shift
        self.last_estimate = (0.0, 0.0)  # last raw estimate, accepted or not
        # How the origin was set ("given", "rois", "mean", "none"), and the
        # ROI-map registration's peak in robust s.d. (NaN until tried).
        self.anchor_used = "given" if self._given_reference is not None else "pending"
        self.anchor_z = math.nan
        if self._given_reference is not None:
            self._set_reference(self._given_reference.copy())

    @property
    def ready(self) -> bool:
        """True once the reference image is final (after the warm-up)."""
        return self.reference is not None

    def _set_reference(self, image: np.ndarray) -> None:
        self.reference = image
        self._template = self._crop.template(image)

    def register(self, frame: np.ndarray) -> MotionEstimate:
        """Estimate ``frame``'s shift; during the warm-up also add it to the reference."""
        warmup = not self.ready
        if self._template is None:  # the very first frame
            first = np.asarray(frame, np.float32)
            o = self._anchor_offset(first, (0.0, 0.0))
            if o != (0.0, 0.0):
                first = _fourier_shift(first, -o[0], -o[1])
            self._accumulate_warmup(first, o, shifted=True)
            self.last = self.last_estimate = o
            return MotionEstimate(o[0], o[1], 1.0, False, True)
        dy, dx, peak = self._crop.peak(self._crop.surface(frame, self._template))
        self.last_estimate = (dy, dx)
        rejected = abs(dy) > self.max_shift[0] or abs(dx) > self.max_shift[1]
        if rejected:
            dy, dx = self.last
        else:
            self.last = (dy, dx)
            if warmup:
                self._accumulate_warmup(frame, (dy, dx), shifted=False)
            elif self.config.reference_tau > 0:
                self._update_reference(frame, dy, dx)
        return MotionEstimate(float(dy), float(dx), float(peak), bool(rejected), warmup)

    def _accumulate_warmup(
        self, frame: np.ndarray, shift: tuple[float, float], shifted: bool
    ) -> None:
        if shifted:
            self._sum += frame
        else:
            sample_region(frame, 0, 0, shift[0], shift[1], self._frame_buf)
            self._sum += self._frame_buf
        self._n += 1
        self._warmup_shifts.append(shift)
        if self._n < self.config.reference_frames:
            c = self._crop  # only the crop of the running mean is needed until the end
            window = self._sum[c.y0 : c.y0 + c.h, c.x0 : c.x0 + c.w] / self._n
            self._template = c.template(window, cropped=True)
            return
        self._finish_reference((self._sum / self._n).astype(np.float32))

    def _finish_reference(self, mean: np.ndarray) -> None:
        anchor = self.config.anchor
        o = (0.0, 0.0)
        if anchor == "rois":
            o = self._anchor_offset(mean, None)
            if self.anchor_used != "rois":
                anchor = "mean"
        if anchor == "mean":
            s = np.mean(np.asarray(self._warmup_shifts), axis=0)
            o = (-float(s[0]), -float(s[1]))
            self.anchor_used = "mean"
        elif anchor == "none":
            self.anchor_used = "none"
        if abs(o[0]) > 1e-3 or abs(o[1]) > 1e-3:
            mean = _fourier_shift(mean, -o[0], -o[1])
            # The last accepted shift is now expressed in the new coordinates.
            self.last = (self.last[0] + o[0], self.last[1] + o[1])
        self._set_reference(mean)
        self._sum = np.zeros((0, 0))  # free the accumulator

    def _anchor_offset(
        self, image: np.ndarray, default: tuple[float, float] | None
    ) -> tuple[float, float]:
        """Offset of ``image`` from the ROI map when confidently found, else ``default``/(0, 0)."""
        if self.config.anchor != "rois" or self._anchor_map is None:
            return (0.0, 0.0) if default is None else default
        if self._full is None or self._anchor_template is None:
            self._full = _Correlator(self.shape, (0, 0, *self.shape), self.config.smooth_sigma)
            self._anchor_template = self._full.template(self._anchor_map)
        surf = self._full.surface(image, self._anchor_template)
        dy, dx, _ = self._full.peak(surf)
        sample = surf[::3, ::3]  # robust spread from a ninth of the surface: plenty, and fast
        med = float(np.median(sample))
        spread = 1.4826 * float(np.median(np.abs(sample - med))) + 1e-12
        z = (float(surf.max()) - med) / spread
        self.anchor_z = z
        if z >= _ANCHOR_MIN_Z and abs(dy) <= self.max_shift[0] and abs(dx) <= self.max_shift[1]:
            self.anchor_used = "rois"
            return (float(dy), float(dx))
        self.anchor_used = "mean"
        return (0.0, 0.0) if default is None else default

    def _update_reference(self, frame: np.ndarray, dy: float, dx: float) -> None:
        c = self._crop
        sample_region(frame, c.y0, c.x0, dy, dx, self._crop_buf)
        alpha = 1.0 / self.config.reference_tau
        ref = self.reference[c.y0 : c.y0 + c.h, c.x0 : c.x0 + c.w]
        ref += alpha * (self._crop_buf - ref)
        self._template = c.template(self.reference)

    def corrected(self, frame: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
        """``frame`` moved back by ``shift`` (bilinear), as float32 ``[H, W]`` (a new array)."""
        out = np.empty(self.shape, np.float32)
        sample_region(frame, 0, 0, float(shift[0]), float(shift[1]), out)
        return out


# The ROI-map registration's peak must stand this many robust standard
# deviations above the correlation surface's median to be trusted.
_ANCHOR_MIN_Z = 12.0
