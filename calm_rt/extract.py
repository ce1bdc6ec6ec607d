"""Frame-to-trace extraction: rigid motion correction, then ROI and neuropil fluorescence.

Per frame ``[H, W]`` (see docs/extraction.md for the numbers):

1. **Checks.** Wrong shape or dtype raises :class:`DataError` (the service
   counts it and goes on). One numba pass finds non-finite pixels, a blank
   frame (every pixel equal, e.g. shutter closed) and the saturated
   fraction; a non-finite or blank frame gives NaN traces and is flagged.
2. **Motion** (optional, :class:`MotionCorrector`). Phase correlation of the
   central ``crop x crop`` square against a reference image, whitened and
   smoothed by a Gaussian so that the peak is smooth; the peak's sub-pixel
   position comes from a three-point Gaussian (log-parabola) fit per axis.
   The reference is the running mean of the first ``reference_frames``
   frames, each aligned to the mean of those before it; it can then follow
   slow drift by an exponential average. An estimate beyond ``max_shift``
   is flagged and not applied (the previous accepted shift is used).
3. **Traces.** The frame is sampled bilinearly at the shifted positions of
   only the pixels some ROI or neuropil ring uses (not the whole frame),
   then one sparse matrix product gives every ROI's weighted mean ``F`` and
   its neuropil ring's mean ``Fneu``. Sampling the frame at ``p + shift`` is
   the same as moving the ROI weights with the scene, and costs one
   gather per used pixel instead of a full-frame warp.

Shift sign convention: ``shift = (dy, dx)`` is how far the scene moved in
this frame relative to the ROIs' coordinates (the simulator's
``MovieTruth.shifts``); the corrected frame is ``raw(p + shift)``.

The neuropil coefficient, baseline and dF/F are applied later by
:class:`calm_rt.data.CausalPreprocessor` (the engine's job), which takes
``F`` and ``Fneu``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numba
import numpy as np
import scipy.fft
from scipy import ndimage, sparse

from calm_rt.errors import ConfigError, DataError

if TYPE_CHECKING:
    from calm_rt.segment import Footprints

__all__ = ["FrameFlags", "MotionConfig", "MotionCorrector", "MotionEstimate", "RoiExtractor"]

# A frame with more than this fraction of saturated pixels is flagged.
_SATURATED_FLAG = 0.01


@dataclass(frozen=True)
class FrameFlags:
    """What happened to one frame; plain numbers only (the service sends ``__dict__`` as JSON).

    ``any`` is True for problems (non-finite, blank, saturated above 1 %, a
    rejected motion estimate). ``shift_y``/``shift_x`` are the shift applied
    (pixels, see the module's sign convention); ``motion_peak`` is the
    normalised phase-correlation peak in (0, 1] (0 when not estimated; a
    frame of pure noise gives about 0.04 on a 256 px crop, the simulator's
    frames about 0.36); ``motion_warmup`` marks frames seen while the
    reference image is still being built.
    """

    non_finite: bool = False
    blank: bool = False  # every pixel equal (e.g. all zero: shutter closed)
    saturated_fraction: float = 0.0
    shift_y: float = 0.0
    shift_x: float = 0.0
    motion_peak: float = 0.0
    motion_rejected: bool = False
    motion_warmup: bool = False

    @property
    def any(self) -> bool:
        return (
            self.non_finite
            or self.blank
            or self.saturated_fraction > _SATURATED_FLAG
            or self.motion_rejected
        )


# ---------------------------------------------------------------------------
# numba kernels (nogil: the service runs extraction beside its I/O threads)


@numba.njit(cache=True, nogil=True)
def _frame_stats(flat, saturation):  # pragma: no cover - compiled
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
def _frame_stats_float(flat, saturation):  # pragma: no cover - compiled
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
def _bilinear(frame, y, x):  # pragma: no cover - compiled
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
def _sample_pixels(frame, flat_idx, ys, xs, dy, dx, out):  # pragma: no cover - compiled
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
            out[k] = _bilinear(frame, ys[k] + dy, xs[k] + dx)


@numba.njit(cache=True, nogil=True)
def _sample_region(frame, y0, x0, dy, dx, out):  # pragma: no cover - compiled
    """``out[i, j] = frame(y0 + i + dy, x0 + j + dx)``, bilinear: a shifted window of the frame."""
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = _bilinear(frame, y0 + i + dy, x0 + j + dx)


@numba.njit(cache=True, nogil=True)
def _whiten_times(spec, cf, eps):  # pragma: no cover - compiled
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


# ---------------------------------------------------------------------------
# Motion correction


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
        _whiten_times(spec, template, eps)
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
            _sample_region(frame, 0, 0, shift[0], shift[1], self._frame_buf)
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
        _sample_region(frame, c.y0, c.x0, dy, dx, self._crop_buf)
        alpha = 1.0 / self.config.reference_tau
        ref = self.reference[c.y0 : c.y0 + c.h, c.x0 : c.x0 + c.w]
        ref += alpha * (self._crop_buf - ref)
        self._template = c.template(self.reference)

    def corrected(self, frame: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
        """``frame`` moved back by ``shift`` (bilinear), as float32 ``[H, W]`` (a new array)."""
        out = np.empty(self.shape, np.float32)
        _sample_region(frame, 0, 0, float(shift[0]), float(shift[1]), out)
        return out


# The ROI-map registration's peak must stand this many robust standard
# deviations above the correlation surface's median to be trusted.
_ANCHOR_MIN_Z = 12.0


# ---------------------------------------------------------------------------
# The extractor


class RoiExtractor:
    """Extract ``[R]`` ROI and neuropil fluorescence from ``[H, W]`` frames.

    Args:
        footprints: ``[R, H, W]`` non-negative weights (boolean masks work),
            or a :class:`calm_rt.segment.Footprints` (sparse, from any ROI
            file or the automatic segmentation).
        neuropil_inner, neuropil_outer: the ring around each ROI in pixels
            (excluding pixels of any ROI), as suite2p does.
        dtype: the frame dtype this session sends (checked on every frame).
        motion: False (frames used as they arrive), True (default
            :class:`MotionConfig`), a :class:`MotionConfig`, or a
            :class:`MotionCorrector` to reuse (e.g. the one the automatic
            segmentation built, whose reference the ROIs were found in).
        reference: ``[H, W]`` image in the ROIs' coordinates to register
            against from the first frame (default: the footprints' own
            reference when they carry one, else built from the first frames).

    Attributes:
        n_rois, shape, dtype: fixed for the session.
        motion: the :class:`MotionCorrector`, or None.
    """

    def __init__(
        self,
        footprints: np.ndarray | Footprints,
        neuropil_inner: int = 2,
        neuropil_outer: int = 8,
        dtype: np.dtype | str = np.uint16,
        *,
        motion: bool | MotionConfig | MotionCorrector = False,
        reference: np.ndarray | None = None,
    ) -> None:
        weights, shape, given_reference = _as_sparse_footprints(footprints)
        if not 0 <= neuropil_inner < neuropil_outer:
            raise ConfigError(
                f"need 0 <= neuropil_inner < neuropil_outer, got {neuropil_inner}, {neuropil_outer}"
            )
        r = weights.shape[0]
        self.shape = shape
        self.dtype = np.dtype(dtype)
        if self.dtype.kind not in "uif":
            raise ConfigError(f"frames must have integer or float pixels, got {self.dtype}")
        self.n_rois = r
        self.saturation = float(np.iinfo(self.dtype).max) if self.dtype.kind in "ui" else np.inf
        self._stats = _frame_stats_float if self.dtype.kind == "f" else _frame_stats
        sums = np.asarray(weights.sum(axis=1)).ravel()
        rois = sparse.diags(1.0 / sums) @ weights  # rows sum to 1: weighted means
        rings = _neuropil_rings(weights, shape, neuropil_inner, neuropil_outer)
        # One matrix [2R, K] over only the K pixels any ROI or ring uses.
        stacked = sparse.vstack([rois, rings]).tocsc()
        support = np.flatnonzero(np.diff(stacked.indptr))
        self._matrix = stacked[:, support].tocsr().astype(np.float32)
        self._support = support
        self._flat_idx = support.astype(np.int64)
        self._ys = (support // shape[1]).astype(np.int64)
        self._xs = (support % shape[1]).astype(np.int64)
        self._values = np.empty(support.size, np.float32)
        self._frame32 = np.empty(shape, np.float32)

        if reference is None:
            reference = given_reference
        if isinstance(motion, MotionCorrector):
            if motion.shape != shape:
                raise ConfigError(f"the motion corrector is for {motion.shape} frames, not {shape}")
            self.motion: MotionCorrector | None = motion
        elif motion:
            config = motion if isinstance(motion, MotionConfig) else MotionConfig()
            # Each ROI scaled to peak 1: a map of cells to register the mean image to.
            peaks = weights.max(axis=1).toarray().ravel()
            anchor_map = np.asarray((sparse.diags(1.0 / peaks) @ weights).sum(axis=0))
            anchor_map = anchor_map.reshape(shape)
            self.motion = MotionCorrector(shape, config, reference=reference, anchor_map=anchor_map)
        else:
            self.motion = None
        self._compile()

    def _compile(self) -> None:
        """Run every kernel once on tiny inputs so the first real frame is not a compile."""
        tiny = np.zeros((2, 2), self.dtype)
        self._stats(tiny.reshape(-1), self.saturation)
        idx = np.zeros(1, np.int64)
        _sample_pixels(tiny.astype(np.float32), idx, idx, idx, 0.0, 0.0, np.empty(1, np.float32))
        _sample_region(tiny, 0, 0, 0.0, 0.0, np.empty((1, 1), np.float32))
        _sample_region(tiny.astype(np.float32), 0, 0, 0.0, 0.0, np.empty((1, 1), np.float32))
        _whiten_times(np.ones((1, 1), np.complex64), np.ones((1, 1), np.complex64), np.float32(1))

    @property
    def support_pixels(self) -> int:
        """How many pixels the ROIs and rings use (what a frame costs to sample)."""
        return int(self._support.size)

    def check(self, frame: np.ndarray) -> None:
        """Raise :class:`DataError` unless ``frame`` has this session's shape and dtype."""
        if frame.shape != self.shape:
            raise DataError(
                f"frame shape {frame.shape} differs from the session's {self.shape}", field="frame"
            )
        if frame.dtype != self.dtype:
            raise DataError(
                f"frame dtype {frame.dtype} differs from the session's {self.dtype}", field="frame"
            )

    def extract(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, FrameFlags]:
        """``frame [H, W]`` to ROI fluorescence ``[R]``, neuropil ``[R]`` (float32) and flags.

        Both are weighted means in the frame's pixel units. A non-finite or
        blank frame gives NaN for every ROI (a missing sample the engine
        masks) and leaves the motion state untouched.
        """
        self.check(frame)
        frame = np.ascontiguousarray(frame)
        lo, hi, n_sat, n_bad = self._stats(frame.reshape(-1), self.saturation)
        non_finite = n_bad > 0
        blank = bool(n_bad == frame.size or lo == hi)
        saturated = n_sat / frame.size
        if non_finite or blank:
            nan = np.full(self.n_rois, np.nan, np.float32)
            return nan, nan.copy(), FrameFlags(non_finite, blank, saturated)
        if self.motion is None:
            est = MotionEstimate(0.0, 0.0, 0.0, False, False)
            np.copyto(self._values, frame.reshape(-1)[self._support], casting="unsafe")
        else:
            frame32 = self._frame32  # one conversion serves the registration and the sampling
            frame32[...] = frame
            est = self.motion.register(frame32)
            _sample_pixels(
                frame32, self._flat_idx, self._ys, self._xs, est.dy, est.dx, self._values
            )
        out = self._matrix @ self._values  # [2R]
        flags = FrameFlags(
            non_finite=False,
            blank=False,
            saturated_fraction=float(saturated),
            shift_y=est.dy,
            shift_x=est.dx,
            motion_peak=est.peak,
            motion_rejected=est.rejected,
            motion_warmup=est.warmup,
        )
        return out[: self.n_rois].astype(np.float32), out[self.n_rois :].astype(np.float32), flags


def _as_sparse_footprints(
    footprints: Any,
) -> tuple[sparse.csr_matrix, tuple[int, int], np.ndarray | None]:
    """``(weights [R, H*W] csr float32, (H, W), reference or None)`` from any accepted form."""
    if hasattr(footprints, "weights") and hasattr(footprints, "shape"):  # segment.Footprints
        return (
            footprints.weights.tocsr().astype(np.float32),
            tuple(footprints.shape),
            footprints.reference,
        )
    fp = np.asarray(footprints, dtype=np.float32)
    if fp.ndim != 3 or fp.shape[0] < 1:
        raise DataError(
            f"footprints must be [R, H, W] with R >= 1, got shape {fp.shape}", field="footprints"
        )
    if (fp < 0).any() or not np.isfinite(fp).all():
        raise DataError("footprints must be finite and non-negative", field="footprints")
    weights = sparse.csr_matrix(fp.reshape(fp.shape[0], -1))
    sums = np.asarray(weights.sum(axis=1)).ravel()
    if (sums <= 0).any():
        raise DataError(
            f"ROIs {np.flatnonzero(sums <= 0).tolist()} have no pixels", field="footprints"
        )
    return weights, (fp.shape[1], fp.shape[2]), None


def _neuropil_rings(
    weights: sparse.csr_matrix, shape: tuple[int, int], inner: int, outer: int
) -> sparse.csr_matrix:
    """``[R, H*W]`` rows: the mean over each ROI's ring ``inner < d <= outer`` px from it.

    The ring leaves out every ROI's pixels (their light is not neuropil); in
    a field so crowded that nothing is left, it keeps the ring's non-own
    pixels. Each ROI is handled inside its bounding box, so building costs
    the ROIs' area, not R frames.
    """
    h, w = shape
    any_roi = np.zeros(h * w, bool)
    any_roi[weights.indices] = True
    any_roi = any_roi.reshape(h, w)
    rows, cols, vals = [], [], []
    for i in range(weights.shape[0]):
        pix = weights.indices[weights.indptr[i] : weights.indptr[i + 1]]
        py, px = pix // w, pix % w
        y0, y1 = max(py.min() - outer - 1, 0), min(py.max() + outer + 2, h)
        x0, x1 = max(px.min() - outer - 1, 0), min(px.max() + outer + 2, w)
        inside = np.zeros((y1 - y0, x1 - x0), bool)
        inside[py - y0, px - x0] = True
        dist = ndimage.distance_transform_edt(~inside)
        band = (dist > inner) & (dist <= outer)
        ring = band & ~any_roi[y0:y1, x0:x1]
        if not ring.any():  # a crowded field: fall back to the band minus the ROI itself
            ring = band
        ry, rx = np.nonzero(ring)
        rows.append(np.full(ry.size, i))
        cols.append((ry + y0) * w + (rx + x0))
        vals.append(np.full(ry.size, 1.0 / max(ry.size, 1), np.float32))
    return sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(weights.shape[0], h * w),
    )
