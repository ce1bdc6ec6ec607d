"""Where ROIs come from: ROI files, or an automatic segmentation of the first seconds.

:func:`load_rois` reads every ROI format calm-rt accepts into one sparse
:class:`Footprints`:

* a suite2p plane folder or its ``stat.npy`` (pixels ``ypix``/``xpix``
  weighted by ``lam``; ``iscell.npy`` beside it picks the cells; ``ops.npy``
  gives the frame size and ``meanImg``, the image the ROIs live in);
* an ``.npz`` with a label image ``labels`` ``[H, W]`` (0 = background,
  k > 0 = ROI k) or weights ``footprints`` ``[R, H, W]``, optionally a
  ``reference`` ``[H, W]`` image;
* ImageJ ``.roi``/``.zip`` files (:func:`calm_rt.data.read_imagej_rois`),
  given the frame size.

With no ROIs at all, :class:`AutoSegmenter` learns them from the stream: it
motion-corrects the first ``frames`` frames, accumulates the mean image and
the local-correlation image (each pixel's mean correlation over time with its
eight neighbours, Smith & Häusser 2010), then finds cells as peaks of the
smoothed correlation image grown into regions (see :class:`SegmentConfig`).
docs/extraction.md has the details and the measured recall.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
from scipy import ndimage, sparse

from calm_rt.errors import ConfigError, DataError
from calm_rt.extract import MotionConfig, MotionCorrector, _sample_region

__all__ = [
    "AutoSegmenter",
    "Footprints",
    "SegmentConfig",
    "Segmentation",
    "detect_cells",
    "footprints_from_array",
    "load_rois",
    "segment_movie",
]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True, eq=False)
class Footprints:
    """ROI weights for one field of view, sparse.

    Attributes:
        weights: ``[R, H*W]`` CSR float32, non-negative, every row non-empty
            (flat pixel index ``y * W + x``).
        shape: ``(H, W)`` of the frames.
        names: R names.
        reference: ``[H, W]`` float32 image in the ROIs' coordinates (what
            they were drawn on), when the source has one; motion correction
            registers to it from the first frame.
    """

    weights: sparse.csr_matrix
    shape: tuple[int, int]
    names: tuple[str, ...]
    reference: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.weights.shape[0])

    @property
    def n_rois(self) -> int:
        return int(self.weights.shape[0])

    def dense(self) -> np.ndarray:
        """``[R, H, W]`` float32 (large: R frames' worth of memory)."""
        return self.weights.toarray().reshape(-1, *self.shape).astype(np.float32)

    def centers(self) -> np.ndarray:
        """``[R, 2]`` weighted centroids ``(y, x)`` in pixels."""
        w = self.weights
        idx = np.arange(self.shape[0] * self.shape[1])
        total = np.asarray(w.sum(axis=1)).ravel()
        y = np.asarray(w @ (idx // self.shape[1]).astype(np.float64)).ravel() / total
        x = np.asarray(w @ (idx % self.shape[1]).astype(np.float64)).ravel() / total
        return np.stack([y, x], axis=1)


def _validated(
    weights: sparse.spmatrix,
    shape: tuple[int, int],
    names: tuple[str, ...] | None,
    reference: np.ndarray | None,
    path: str | None,
) -> Footprints:
    w = sparse.csr_matrix(weights, dtype=np.float32)
    w.eliminate_zeros()
    r = w.shape[0]
    if r < 1:
        raise DataError("holds no ROIs", path=path, field="footprints")
    if w.shape[1] != shape[0] * shape[1]:
        raise DataError(f"weights do not match the frame shape {shape}", path=path)
    if w.nnz and (not np.isfinite(w.data).all() or (w.data < 0).any()):
        raise DataError(
            "ROI weights must be finite and non-negative", path=path, field="footprints"
        )
    empty = np.flatnonzero(np.diff(w.indptr) == 0)
    if empty.size:
        raise DataError(f"ROIs {empty.tolist()} have no pixels", path=path, field="footprints")
    if reference is not None:
        reference = np.asarray(reference, np.float32)
        if reference.shape != tuple(shape) or not np.isfinite(reference).all():
            reference = None  # an unusable reference is not worth failing over: build one live
    names = names if names is not None else tuple(f"roi_{i}" for i in range(r))
    return Footprints(w, (int(shape[0]), int(shape[1])), tuple(names), reference)


def footprints_from_array(
    array: np.ndarray, names: tuple[str, ...] | None = None, reference: np.ndarray | None = None
) -> Footprints:
    """:class:`Footprints` from weights ``[R, H, W]`` (bool masks work) or labels ``[H, W]`` (int)."""
    a = np.asarray(array)
    if a.ndim == 2:
        if a.dtype.kind not in "iu":
            raise DataError(f"a label image must be integers, got {a.dtype}", field="labels")
        flat = a.reshape(-1)
        pix = np.flatnonzero(flat > 0)
        ids, rows = np.unique(flat[pix], return_inverse=True)
        w = sparse.csr_matrix(
            (np.ones(pix.size, np.float32), (rows, pix)), shape=(ids.size, flat.size)
        )
        names = names or tuple(f"label_{i}" for i in ids)
        return _validated(w, a.shape, names, reference, None)
    if a.ndim != 3:
        raise DataError(
            f"footprints must be [R, H, W] weights or an [H, W] label image, got {a.shape}",
            field="footprints",
        )
    w = sparse.csr_matrix(a.reshape(a.shape[0], -1).astype(np.float32))
    return _validated(w, (a.shape[1], a.shape[2]), names, reference, None)


# ---------------------------------------------------------------------------
# ROI files


def load_rois(path: PathLike, shape: tuple[int, int] | None = None) -> Footprints:
    """Read ROIs from a suite2p folder or ``stat.npy``, an ``.npz``, or ImageJ ``.roi``/``.zip``.

    Args:
        path: see the module docstring for the formats.
        shape: ``(H, W)`` of the frames; needed for ImageJ ROIs (they do not
            store it) and for suite2p output without ``ops.npy``; checked
            against the file's own size otherwise.

    Raises:
        DataError: unreadable or unknown file, no ROIs, ROIs outside the frame.
    """
    p = Path(path)
    if p.is_dir():
        for rel in (".", "plane0", "suite2p/plane0"):
            if (p / rel / "stat.npy").is_file():
                return _read_suite2p_rois(p / rel / "stat.npy", shape)
        raise DataError(
            "holds no suite2p stat.npy (looked in ., plane0, suite2p/plane0)", path=str(p)
        )
    if not p.is_file():
        raise DataError("does not exist or is not a file", path=str(p))
    suffix = p.suffix.lower()
    if suffix == ".npy":
        return _read_suite2p_rois(p, shape)
    if suffix == ".npz":
        fp = _read_npz_rois(p)
    elif suffix in (".zip", ".roi"):
        if shape is None:
            raise DataError(
                "ImageJ ROIs do not store the image size; pass shape=(height, width), or "
                "convert once to an npz: np.savez('rois.npz', footprints=load_rois(path, "
                "shape).dense())",
                path=str(p),
            )
        from calm_rt.data import read_imagej_rois

        rois = read_imagej_rois(p, shape)
        return footprints_from_array(rois.masks, names=rois.names)
    else:
        raise DataError(
            "unknown ROI format; use a suite2p folder or stat.npy, an .npz with 'labels' or "
            "'footprints', or ImageJ .roi/.zip",
            path=str(p),
        )
    if shape is not None and tuple(shape) != fp.shape:
        raise DataError(f"ROIs are for {fp.shape} frames, not {tuple(shape)}", path=str(p))
    return fp


def _read_npz_rois(p: Path) -> Footprints:
    try:
        with np.load(p, allow_pickle=False) as z:
            reference = None
            for key in ("reference", "mean_image", "meanImg"):
                if key in z:
                    reference = np.asarray(z[key], np.float32)
                    break
            names = tuple(str(n) for n in z["names"]) if "names" in z else None
            if "footprints" in z:
                arr = np.asarray(z["footprints"])
            elif "labels" in z:
                arr = np.asarray(z["labels"])
            else:
                raise DataError(
                    f"needs 'footprints' [R, H, W] or 'labels' [H, W]; it holds {sorted(z.files)}",
                    path=str(p),
                )
    except (OSError, ValueError, EOFError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot read ROIs ({exc})", path=str(p)) from exc
    try:
        return footprints_from_array(arr, names, reference)
    except DataError as exc:
        raise DataError(str(exc), path=str(p)) from exc


def _load_suite2p_pickle(path: Path, what: str) -> Any:
    # suite2p saves stat.npy and ops.npy as pickled object arrays, so they can
    # only be read with allow_pickle=True, which runs code stored in the file.
    # That is acceptable only because this is the user's own local suite2p
    # output (a path given to the CLI or the authenticated control socket),
    # never data received over the network; the wire protocol stays pickle-free.
    try:
        obj = np.load(path, allow_pickle=True)
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"is not a readable .npy file ({exc})", path=str(path)) from exc
    if what == "ops":
        if obj.dtype != object or obj.shape != () or not isinstance(obj.item(), dict):
            raise DataError("expected suite2p's ops dict", path=str(path))
        return obj.item()
    if obj.dtype != object or obj.ndim != 1:
        raise DataError(
            f"expected suite2p's array of ROI dicts, got {obj.dtype} {obj.shape}", path=str(path)
        )
    return obj


def _read_suite2p_rois(stat_path: Path, shape: tuple[int, int] | None) -> Footprints:
    stat = _load_suite2p_pickle(stat_path, "stat")
    plane = stat_path.parent
    reference = None
    if (plane / "ops.npy").is_file():
        ops = _load_suite2p_pickle(plane / "ops.npy", "ops")
        if "Ly" in ops and "Lx" in ops:
            ops_shape = (int(ops["Ly"]), int(ops["Lx"]))
            if shape is not None and tuple(shape) != ops_shape:
                raise DataError(
                    f"ops.npy says frames are {ops_shape}, not {tuple(shape)}", path=str(plane)
                )
            shape = ops_shape
        for key in ("meanImg", "refImg"):  # both are in the registered (ROI) coordinates
            if key in ops:
                reference = np.asarray(ops[key], np.float32)
                break
    if shape is None:
        raise DataError(
            "the frame size is unknown: no ops.npy with Ly/Lx beside stat.npy; pass "
            "shape=(height, width)",
            path=str(stat_path),
        )
    keep = np.arange(len(stat))
    iscell_path = plane / "iscell.npy"
    if iscell_path.is_file():
        try:
            iscell = np.load(iscell_path, allow_pickle=False)
        except (OSError, EOFError, ValueError) as exc:
            raise DataError(f"is not a readable .npy file ({exc})", path=str(iscell_path)) from exc
        label = iscell[:, 0] if iscell.ndim == 2 else iscell
        if label.shape[0] != len(stat):
            raise DataError(
                f"labels {label.shape[0]} ROIs but stat.npy holds {len(stat)}",
                path=str(iscell_path),
            )
        keep = np.flatnonzero(label > 0.5)
    h, w = shape
    rows, cols, vals = [], [], []
    for k, i in enumerate(keep):
        roi = stat[i]
        try:
            y = np.asarray(roi["ypix"], np.int64).ravel()
            x = np.asarray(roi["xpix"], np.int64).ravel()
            lam = np.asarray(roi.get("lam", np.ones(y.size)), np.float32).ravel()
        except (KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"ROI {i} lacks ypix/xpix ({exc})", path=str(stat_path)) from exc
        if not (y.size == x.size == lam.size) or y.size == 0:
            raise DataError(f"ROI {i} has mismatched or empty ypix/xpix/lam", path=str(stat_path))
        if y.min() < 0 or x.min() < 0 or y.max() >= h or x.max() >= w:
            raise DataError(f"ROI {i} lies outside the {h}x{w} frame", path=str(stat_path))
        rows.append(np.full(y.size, k))
        cols.append(y * w + x)
        vals.append(np.clip(lam, 0, None))
    if not rows:
        raise DataError("no ROI is labelled a cell in iscell.npy", path=str(stat_path))
    weights = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(rows), h * w),
    )
    names = tuple(f"suite2p_{i}" for i in keep)
    return _validated(weights, (h, w), names, reference, str(stat_path))


# ---------------------------------------------------------------------------
# Automatic segmentation


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
            _sample_region(frame, 0, 0, float(iy), float(ix), self._img)
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
