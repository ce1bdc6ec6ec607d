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

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse

from calm_rt.errors import ConfigError, DataError
from calm_rt.extract._kernels import (
    frame_stats,
    frame_stats_float,
    sample_pixels,
    sample_region,
    whiten_times,
)
from calm_rt.extract.motion import MotionConfig, MotionCorrector, MotionEstimate
from calm_rt.extract.rois import Footprints, as_footprints

__all__ = ["FrameFlags", "RoiExtractor"]

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
# The extractor


class RoiExtractor:
    """Extract ``[R]`` ROI and neuropil fluorescence from ``[H, W]`` frames.

    Args:
        footprints: ``[R, H, W]`` non-negative weights (boolean masks work),
            or a :class:`~calm_rt.extract.rois.Footprints` (sparse, from any ROI
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
        fp = as_footprints(footprints)
        weights, shape, given_reference = fp.weights, fp.shape, fp.reference
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
        self._stats = frame_stats_float if self.dtype.kind == "f" else frame_stats
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
        sample_pixels(tiny.astype(np.float32), idx, idx, idx, 0.0, 0.0, np.empty(1, np.float32))
        sample_region(tiny, 0, 0, 0.0, 0.0, np.empty((1, 1), np.float32))
        sample_region(tiny.astype(np.float32), 0, 0, 0.0, 0.0, np.empty((1, 1), np.float32))
        whiten_times(np.ones((1, 1), np.complex64), np.ones((1, 1), np.complex64), np.float32(1))

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
            sample_pixels(frame32, self._flat_idx, self._ys, self._xs, est.dy, est.dx, self._values)
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
