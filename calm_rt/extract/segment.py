"""Automatic segmentation: learn ROIs from the first seconds of a stream.

With no ROIs at all, :class:`AutoSegmenter` learns them from the stream: it
motion-corrects the first ``frames`` frames, accumulates the mean image and
the local-correlation image (each pixel's mean correlation over time with its
eight neighbours, Smith & Häusser 2010), then finds cells as peaks of the
smoothed correlation image grown into regions (see :class:`SegmentConfig`).
docs/extraction.md has the details and the measured recall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from scipy import ndimage

from calm_rt.errors import ConfigError, DataError
from calm_rt.extract._kernels import sample_region
from calm_rt.extract.motion import MotionConfig, MotionCorrector
from calm_rt.extract.rois import Footprints, footprints_from_array

__all__ = ["AutoSegmenter", "SegmentConfig", "Segmentation", "detect_cells", "segment_movie"]


@dataclass(frozen=True)
class SegmentConfig:
    """How :class:`AutoSegmenter` finds cells.

    Attributes:
        frames: frames to learn from (300 = 10 s at 30 Hz).
        cell_diameter: expected soma diameter in pixels; sets the smoothing,
            the peak spacing and the size limits.
        threshold: a peak of the smoothed correlation image must exceed the
            image's median by this many robust standard deviations (MAD).
        grow_fraction: a region grows from its peak over connected pixels
            above ``median + grow_fraction * (peak - median)``.
        min_area, max_area: region size limits as multiples of the area of a
            disc of ``cell_diameter``; regions outside them are dropped.
        mean_weight: weight of the high-passed mean image's robust z-score
            added to the correlation image's (0: correlation image only,
            which finds only cells that fired during the frames).
    """

    frames: int = 300
    cell_diameter: float = 10.0
    threshold: float = 4.0
    grow_fraction: float = 0.5
    min_area: float = 0.25
    max_area: float = 2.5
    mean_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.frames < 10:
            raise ConfigError(f"frames must be >= 10, got {self.frames}")
        if self.cell_diameter < 3:
            raise ConfigError(f"cell_diameter must be >= 3 pixels, got {self.cell_diameter}")
        if not 0 < self.grow_fraction < 1:
            raise ConfigError(f"grow_fraction must be in (0, 1), got {self.grow_fraction}")
        if not 0 < self.min_area < self.max_area:
            raise ConfigError("need 0 < min_area < max_area")
        if self.mean_weight < 0:
            raise ConfigError(f"mean_weight must be >= 0, got {self.mean_weight}")


@dataclass(frozen=True, eq=False)
class Segmentation:
    """What :class:`AutoSegmenter` found.

    Attributes:
        footprints: the cells as binary masks (weights 1).
        mean_image, correlation_image: ``[H, W]`` float32, motion-corrected.
        motion: the motion corrector the images were aligned with (None if
            off); pass it to ``RoiExtractor(footprints, motion=...)`` so the
            traces use the same coordinates.
        frames: frames used.
    """

    footprints: Footprints | None
    mean_image: np.ndarray
    correlation_image: np.ndarray
    motion: MotionCorrector | None
    frames: int


# Neighbour offsets (dy, dx) whose products are accumulated; the other four
# of the eight neighbours are the same pairs seen from the other pixel.
_OFFSETS = np.array([[0, 1], [1, 0], [1, 1], [1, -1]], np.int64)


@numba.njit(cache=True, nogil=True)
def _accumulate(img, base, s1, s2, prod, offsets):  # pragma: no cover - compiled
    """Add one frame's sums, squares and neighbour products (about ``base``, for precision)."""
    h, w = img.shape
    for y in range(h):
        for x in range(w):
            v = img[y, x] - base[y, x]
            s1[y, x] += v
            s2[y, x] += v * v
            for k in range(offsets.shape[0]):
                yy = y + offsets[k, 0]
                xx = x + offsets[k, 1]
                if 0 <= yy < h and 0 <= xx < w:
                    prod[k, y, x] += v * (img[yy, xx] - base[yy, xx])


@numba.njit(cache=True, nogil=True)
def _subtract_lowpass(img, b, means):  # pragma: no cover - compiled
    """In place: ``img -= `` its ``b x b`` block means, bilinearly interpolated between block centres.

    A cheap spatial high-pass (about 1 ms for 512x512, against ~30 ms for a
    Gaussian filter of the same reach): it removes the background and the
    neuropil's frame-wide fluctuations, which would otherwise correlate every
    pixel with its neighbours.
    """
    h, w = img.shape
    hb, wb = means.shape
    for i in range(hb):
        for j in range(wb):
            acc = 0.0
            cnt = 0
            for y in range(i * b, min((i + 1) * b, h)):
                for x in range(j * b, min((j + 1) * b, w)):
                    acc += img[y, x]
                    cnt += 1
            means[i, j] = acc / max(cnt, 1)
    for y in range(h):
        fy = min(max((y + 0.5) / b - 0.5, 0.0), hb - 1.0)
        i0 = int(fy)
        i1 = min(i0 + 1, hb - 1)
        ty = fy - i0
        for x in range(w):
            fx = min(max((x + 0.5) / b - 0.5, 0.0), wb - 1.0)
            j0 = int(fx)
            j1 = min(j0 + 1, wb - 1)
            tx = fx - j0
            low = (1.0 - ty) * ((1.0 - tx) * means[i0, j0] + tx * means[i0, j1]) + ty * (
                (1.0 - tx) * means[i1, j0] + tx * means[i1, j1]
            )
            img[y, x] -= low


class AutoSegmenter:
    """Learn ROIs from the first frames of a stream.

    Push frames with :meth:`push` until it returns True, then call
    :meth:`result`. Blank or non-finite frames are skipped.

    Args:
        shape: ``(H, W)``.
        config: :class:`SegmentConfig`.
        motion: True (default :class:`MotionConfig` anchored at the first
            frame), False, or a :class:`MotionConfig`.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        config: SegmentConfig | None = None,
        motion: bool | MotionConfig = True,
    ) -> None:
        self.config = config or SegmentConfig()
        self.shape = (int(shape[0]), int(shape[1]))
        if isinstance(motion, MotionConfig):
            self.motion: MotionCorrector | None = MotionCorrector(self.shape, motion)
        elif motion:
            self.motion = MotionCorrector(self.shape, MotionConfig(anchor="none"))
        else:
            self.motion = None
        h, w = self.shape
        self._img = np.empty((h, w), np.float32)
        self._block = max(4, int(round(3 * self.config.cell_diameter)))
        self._means = np.empty((-(-h // self._block), -(-w // self._block)), np.float64)
        self._sum = np.zeros((h, w))
        self._border = 0
        self._base: np.ndarray | None = None
        self._s1 = np.zeros((h, w))
        self._s2 = np.zeros((h, w))
        self._prod = np.zeros((len(_OFFSETS), h, w))
        self.n = 0

    @property
    def done(self) -> bool:
        return self.n >= self.config.frames

    def push(self, frame: np.ndarray) -> bool:
        """Add one ``[H, W]`` frame; returns True once enough frames were seen."""
        frame = np.asarray(frame)
        if frame.shape != self.shape:
            raise DataError(f"frame shape {frame.shape} differs from {self.shape}", field="frame")
        if self.done:
            return True
        fl = frame.astype(np.float32, copy=False)
        if not np.isfinite(fl).all() or fl.min() == fl.max():
            return False
        if self.motion is not None:
            est = self.motion.register(frame)
            # Whole-pixel shifts: interpolating would mix neighbouring pixels'
            # noise and so correlate them everywhere, which is what the
            # correlation image must not see. Half a pixel is nothing to a cell.
            iy, ix = round(est.dy), round(est.dx)
            sample_region(frame, 0, 0, float(iy), float(ix), self._img)
            # Rows and columns filled from the edge are copies: mask them later.
            self._border = max(self._border, abs(iy), abs(ix))
        else:
            self._img[...] = fl
        self._sum += self._img
        _subtract_lowpass(self._img, self._block, self._means)
        if self._base is None:
            self._base = self._img.copy()
        _accumulate(self._img, self._base, self._s1, self._s2, self._prod, _OFFSETS)
        self.n += 1
        return self.done

    def images(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean image, local-correlation image)`` of the frames so far, ``[H, W]`` float32."""
        if self.n < 2 or self._base is None:
            raise DataError(f"needs at least 2 usable frames, got {self.n}")
        n = self.n
        m = self._s1 / n
        var = np.maximum(self._s2 / n - m * m, 0.0)
        sd = np.sqrt(var)
        h, w = self.shape
        total = np.zeros((h, w))
        count = np.zeros((h, w))
        for k, (dy, dx) in enumerate(_OFFSETS):
            # pixel p and its neighbour q = p + (dy, dx), both inside the frame
            ys = slice(0, h - dy)
            xs = slice(max(0, -dx), w - max(0, dx))
            yq = slice(dy, h)
            xq = slice(max(0, dx), w - max(0, -dx))
            cov = self._prod[k, ys, xs] / n - m[ys, xs] * m[yq, xq]
            denom = sd[ys, xs] * sd[yq, xq]
            corr = np.where(denom > 0, cov / np.where(denom > 0, denom, 1.0), 0.0)
            total[ys, xs] += corr
            count[ys, xs] += 1
            total[yq, xq] += corr
            count[yq, xq] += 1
        corr = total / np.maximum(count, 1)
        e = self._border + 1
        if 0 < 2 * e < min(h, w):
            inner = corr[e:-e, e:-e]
            fill = float(np.median(inner))
            corr[:e], corr[-e:], corr[:, :e], corr[:, -e:] = fill, fill, fill, fill
        return (self._sum / n).astype(np.float32), corr.astype(np.float32)

    def result(self) -> Segmentation:
        """Detect cells in the images of the frames pushed so far."""
        mean, corr = self.images()
        score = _robust_z(corr)
        if self.config.mean_weight > 0:
            # Cells are brighter than their surround in the mean image too,
            # active or not; its high-pass adds them to the correlation's evidence.
            flat = mean - ndimage.gaussian_filter(mean, self.config.cell_diameter)
            e = self._border + 1
            if 0 < 2 * e < min(self.shape):
                flat[:e], flat[-e:], flat[:, :e], flat[:, -e:] = 0, 0, 0, 0
            score = score + self.config.mean_weight * _robust_z(flat)
        masks = detect_cells(score, self.config)
        fp = footprints_from_array(masks, reference=mean) if masks.shape[0] else None
        return Segmentation(fp, mean, corr, self.motion, self.n)


def _robust_z(image: np.ndarray) -> np.ndarray:
    med = float(np.median(image))
    return (image - med) / (1.4826 * float(np.median(np.abs(image - med))) + 1e-12)


def detect_cells(score: np.ndarray, config: SegmentConfig | None = None) -> np.ndarray:
    """Cells in a score image (e.g. a correlation image): ``[R, H, W]`` bool masks, best first.

    1. Smooth with a Gaussian of ``cell_diameter / 6`` px.
    2. Peaks: local maxima within ``cell_diameter / 2`` that exceed the
       median by ``threshold`` robust standard deviations.
    3. From each peak, strongest first, grow the 4-connected region of
       unclaimed pixels above ``median + grow_fraction * (peak - median)``
       within one diameter of the peak.
    4. Keep regions whose area lies within the size limits.
    """
    cfg = config or SegmentConfig()
    d = cfg.cell_diameter
    c = ndimage.gaussian_filter(np.asarray(score, np.float64), d / 6.0)
    med = float(np.median(c))
    spread = 1.4826 * float(np.median(np.abs(c - med))) + 1e-12
    size = max(3, int(round(d / 2)) | 1)
    peaks = (c == ndimage.maximum_filter(c, size=size)) & (c > med + cfg.threshold * spread)
    py, px = np.nonzero(peaks)
    order = np.argsort(-c[py, px])
    disc_area = math.pi * (d / 2) ** 2
    lo, hi = cfg.min_area * disc_area, cfg.max_area * disc_area
    h, w = c.shape
    claimed = np.zeros((h, w), bool)
    masks = []
    radius = int(math.ceil(d))
    for y, x in zip(py[order], px[order]):
        if claimed[y, x]:
            continue
        y0, y1 = max(0, y - radius), min(h, y + radius + 1)
        x0, x1 = max(0, x - radius), min(w, x + radius + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        level = med + cfg.grow_fraction * (c[y, x] - med)
        ok = (c[y0:y1, x0:x1] >= level) & ~claimed[y0:y1, x0:x1]
        ok &= (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
        labels, _ = ndimage.label(ok)
        region = labels == labels[y - y0, x - x0]
        area = int(region.sum())
        if not lo <= area <= hi:
            continue
        mask = np.zeros((h, w), bool)
        mask[y0:y1, x0:x1] = region
        claimed |= mask
        masks.append(mask)
    if not masks:
        return np.zeros((0, h, w), bool)
    return np.stack(masks)


def segment_movie(
    frames: Any, config: SegmentConfig | None = None, motion: bool | MotionConfig = True
) -> Segmentation:
    """Run :class:`AutoSegmenter` over the first ``config.frames`` frames of ``frames`` ``[T, H, W]``.

    ``frames`` is an array, a :class:`calm_rt.data.Movie` or any iterable of frames.
    """
    cfg = config or SegmentConfig()
    seg: AutoSegmenter | None = None
    for frame in frames:
        if seg is None:
            seg = AutoSegmenter(np.shape(frame), cfg, motion)
        if seg.push(frame):
            break
    if seg is None:
        raise DataError("no frames to segment")
    return seg.result()
