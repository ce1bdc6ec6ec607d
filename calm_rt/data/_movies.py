"""Imaging movies and ImageJ ROIs: the raw side of a recording.

:func:`open_movie` gives lazy frame access to a TIFF, HDF5 or ``.npy`` movie
``[T, H, W]`` without loading it whole; :func:`read_imagej_rois` turns ImageJ
ROIs into boolean masks; :func:`traces_from_masks` is the simple offline
reference for ROI traces (mean over each ROI's pixels per frame), and
:func:`session_from_movie` ties the three into a `Session`;
:func:`labels_from_weights` turns sparse ROI weights into a label image.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from calm_rt.data._session import Session, validate_session
from calm_rt.errors import DataError

__all__ = [
    "Movie",
    "RoiSet",
    "labels_from_weights",
    "open_movie",
    "read_imagej_rois",
    "session_from_movie",
    "traces_from_masks",
]

PathLike = str | os.PathLike[str]

_TIFF_SUFFIXES = (".tif", ".tiff")
_HDF5_SUFFIXES = (".h5", ".hdf5")

# Frames per chunk in traces_from_masks are chosen so one chunk holds about
# this many bytes: large enough for fast numpy, small enough for any laptop.
_CHUNK_BYTES = 64 * 2**20


class Movie:
    """Lazy, read-only access to a movie ``[T, H, W]``.

    Made by :func:`open_movie`. Indexing with an int gives one frame
    ``[H, W]``; with a slice, frames ``[t, H, W]``; both in the file's dtype.
    Only the frames asked for are read. Close it (or use ``with``) to release
    the file.

    Attributes:
        shape: ``(T, H, W)``.
        dtype: pixel dtype (integer or float).
        fps: frame rate in Hz from the file's metadata, or None if it has none.
        path: the file.
    """

    def __init__(
        self,
        *,
        path: Path,
        shape: tuple[int, int, int],
        dtype: np.dtype[Any],
        fps: float | None,
        array: Any = None,
        pages: Any = None,
        channel_axis: int | None = None,
        handle: Any = None,
    ) -> None:
        # Exactly one of `array` (anything sliceable along T: np.memmap,
        # h5py.Dataset) or `pages` (tifffile pages, one 2D frame each).
        self.path = path
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.fps = fps
        self._array = array
        self._pages = pages
        self._channel_axis = channel_axis
        self._handle = handle
        self._closed = False

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        fps = "unknown" if self.fps is None else f"{self.fps:g} Hz"
        return f"Movie({str(self.path)!r}, shape={self.shape}, dtype={self.dtype}, fps={fps})"

    @property
    def closed(self) -> bool:
        return self._closed

    def __getitem__(self, index: int | slice) -> np.ndarray:
        if self._closed:
            raise ValueError(f"{self.path}: movie is closed")
        n = self.shape[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                return self._read(start, max(start, stop))
            frames = [self._read(i, i + 1)[0] for i in range(start, stop, step)]
            if not frames:
                return np.empty((0, *self.shape[1:]), dtype=self.dtype)
            return np.stack(frames)
        if isinstance(index, (int, np.integer)):
            i = int(index)
            if i < 0:
                i += n
            if not 0 <= i < n:
                raise IndexError(f"frame {index} out of range for a movie of {n} frames")
            return self._read(i, i + 1)[0]
        raise TypeError(f"index a Movie with an int or a slice, not {type(index).__name__}")

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``[start, stop)`` as ``[t, H, W]``, ``0 <= start <= stop <= T``."""
        if self._pages is not None:
            if stop <= start:
                return np.empty((0, *self.shape[1:]), dtype=self.dtype)
            out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
            for k, i in enumerate(range(start, stop)):
                out[k] = self._pages[i].asarray()
            return out
        block = np.asarray(self._array[start:stop])
        if not block.flags.owndata:
            # A view into a read-only memmap: copy, so every backend hands out
            # writable frames that outlive close().
            block = block.copy()
        if self._channel_axis is not None:
            block = np.take(block, 0, axis=self._channel_axis)
        return block

    def close(self) -> None:
        """Release the file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._array = None
        self._pages = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> Movie:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _movie_geometry(
    shape: tuple[int, ...], *, path: str, field: str | None
) -> tuple[tuple[int, int, int], int | None]:
    """Validate a movie's raw shape; return ``(T, H, W)`` and the axis to drop."""
    if len(shape) == 2:
        raise DataError(
            f"is a single image of shape {shape}; a movie is [frames, height, width]",
            path=path,
            field=field,
        )
    if len(shape) == 4:
        # A singleton channel axis, [T, 1, H, W] or [T, H, W, 1], is common in
        # files written by acquisition software; it carries nothing, so drop it.
        if shape[1] == 1:
            return (shape[0], shape[2], shape[3]), 1
        if shape[3] == 1:
            return (shape[0], shape[1], shape[2]), 3
        raise DataError(
            f"has shape {shape}: several channels or planes; save one channel as "
            "[frames, height, width]",
            path=path,
            field=field,
        )
    if len(shape) != 3:
        raise DataError(
            f"has shape {shape}; a movie is [frames, height, width]", path=path, field=field
        )
    t, h, w = (int(x) for x in shape)
    if t < 1 or h < 1 or w < 1:
        raise DataError(f"is empty (shape {shape})", path=path, field=field)
    return (t, h, w), None


def _check_dtype(dtype: np.dtype[Any], *, path: str, field: str | None) -> None:
    if dtype.kind not in "iuf":
        raise DataError(
            f"has pixel dtype {dtype}; a movie needs integer or float pixels",
            path=path,
            field=field,
        )


def open_movie(path: PathLike, *, dataset: str | None = None) -> Movie:
    """Open a movie for lazy frame access.

    Args:
        path: ``.tif``/``.tiff`` (memory-mapped when the file allows it, else
            read page by page), ``.h5``/``.hdf5`` (a dataset read lazily), or
            ``.npy`` (memory-mapped).
        dataset: HDF5 only: the dataset's path in the file. Default: the only
            3D dataset in the file.

    Returns:
        A :class:`Movie` ``[T, H, W]``. A 4D movie with a singleton channel
        axis is squeezed to 3D.

    Raises:
        DataError: missing file, unsupported format, not a 3D integer or float
            movie, or an ambiguous or missing HDF5 dataset.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError("does not exist or is not a file", path=str(p))
    suffix = p.suffix.lower()
    if suffix in _TIFF_SUFFIXES:
        return _open_tiff(p)
    if suffix in _HDF5_SUFFIXES:
        return _open_hdf5(p, dataset)
    if suffix == ".npy":
        return _open_npy(p)
    raise DataError(
        "unsupported movie format; use .tif/.tiff, .h5/.hdf5 or .npy [frames, height, width]",
        path=str(p),
    )


def _open_npy(p: Path) -> Movie:
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"is not a readable .npy file ({exc})", path=str(p)) from exc
    _check_dtype(arr.dtype, path=str(p), field=None)
    shape, axis = _movie_geometry(arr.shape, path=str(p), field=None)
    return Movie(path=p, shape=shape, dtype=arr.dtype, fps=None, array=arr, channel_axis=axis)


def _open_tiff(p: Path) -> Movie:
    import tifffile

    try:
        tif = tifffile.TiffFile(p)
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise DataError(f"is not a readable TIFF file ({exc})", path=str(p)) from exc
    try:
        series = tif.series[0]
        dtype = np.dtype(series.dtype)
        _check_dtype(dtype, path=str(p), field=None)
        raw_shape = tuple(int(x) for x in series.shape)
        # A single-page TIFF is one image, even if tifffile reports 2D.
        shape, axis = _movie_geometry(raw_shape, path=str(p), field=None)
        fps = _tiff_fps(tif)
        if series.dataoffset is not None:
            # Uncompressed and contiguous: the OS pages frames in on demand.
            arr = tifffile.memmap(p, mode="r")
            if tuple(arr.shape) != raw_shape:
                arr = arr.reshape(raw_shape)
            tif.close()
            return Movie(path=p, shape=shape, dtype=dtype, fps=fps, array=arr, channel_axis=axis)
        pages = series.pages
        if axis is not None or len(pages) != shape[0] or tuple(pages[0].shape) != shape[1:]:
            # Pages do not map one-to-one onto frames (samples per pixel,
            # interleaved channels): there is no lazy frame reader to offer.
            raise DataError(
                f"stores {len(pages)} pages of shape {tuple(pages[0].shape)} for a movie of "
                f"shape {raw_shape}; save it as one 2D page per frame (e.g. with "
                "tifffile.imwrite) to read it lazily",
                path=str(p),
            )
        return Movie(path=p, shape=shape, dtype=dtype, fps=fps, pages=pages, handle=tif)
    except BaseException:
        tif.close()
        raise


def _tiff_fps(tif: Any) -> float | None:
    """Frame rate from ImageJ metadata (``finterval`` in s, or ``fps``), if any."""
    meta = tif.imagej_metadata or {}
    interval = _positive_float(meta.get("finterval"))
    if interval is not None:
        return 1.0 / interval
    return _positive_float(meta.get("fps"))


def _positive_float(value: Any) -> float | None:
    """``value`` as a finite positive float, or None: metadata is often junk."""
    try:
        out = float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def _open_hdf5(p: Path, dataset: str | None) -> Movie:
    import h5py

    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise DataError(f"is not a readable HDF5 file ({exc})", path=str(p)) from exc
    try:
        datasets: dict[str, Any] = {}
        f.visititems(
            lambda name, obj: (
                datasets.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None
            )
        )
        listing = ", ".join(f"{k} {v.shape}" for k, v in sorted(datasets.items())) or "none"
        if dataset is None:
            three_d = sorted(k for k, v in datasets.items() if v.ndim == 3)
            if len(three_d) != 1:
                raise DataError(
                    f"holds {len(three_d)} 3D datasets; pass dataset= with the movie's "
                    f"path (datasets: {listing})",
                    path=str(p),
                    field="dataset",
                )
            dataset = three_d[0]
        name = dataset.strip("/")
        if name not in datasets:
            raise DataError(
                f"has no dataset {dataset!r} (datasets: {listing})", path=str(p), field=dataset
            )
        dset = datasets[name]
        _check_dtype(dset.dtype, path=str(p), field=name)
        shape, axis = _movie_geometry(tuple(dset.shape), path=str(p), field=name)
        # No standard says where a rate lives in HDF5; these are the common spots.
        rates = (
            _positive_float(attrs[key])
            for attrs in (dset.attrs, f.attrs)
            for key in ("fps", "frame_rate")
            if key in attrs
        )
        fps = next((r for r in rates if r is not None), None)
        return Movie(
            path=p, shape=shape, dtype=dset.dtype, fps=fps, array=dset, channel_axis=axis, handle=f
        )
    except BaseException:
        f.close()
        raise


# ----------------------------------------------------------------------------
# ImageJ ROIs and label images


def labels_from_weights(weights: Any, shape: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` int32 label image from sparse ROI weights ``[R, H*W]`` (scipy CSR).

    ROI k is label k + 1 on the pixels where its weight is the largest
    (ties to the lower index), 0 where no ROI has weight. Works row by row on
    the sparse matrix: a dense ``[R, H, W]`` stack is 256 MB at 256 ROIs of
    512x512.
    """
    h, w = shape
    labels = np.zeros(h * w, np.int32)
    best = np.zeros(h * w, np.float32)
    indptr, indices, data = weights.indptr, weights.indices, weights.data
    for k in range(indptr.size - 1):
        pix, wts = indices[indptr[k] : indptr[k + 1]], data[indptr[k] : indptr[k + 1]]
        win = wts > best[pix]
        labels[pix[win]], best[pix[win]] = k + 1, wts[win]
    return labels.reshape(h, w)


@dataclass(frozen=True, eq=False)
class RoiSet:
    """ROIs as masks.

    Attributes:
        masks: ``[R, H, W]`` bool, True inside ROI r.
        names: R names, in the file's order.
    """

    masks: np.ndarray
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)


def _polygon_mask(paths: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres lie inside a polygon set (even-odd rule).

    Args:
        paths: closed or open vertex lists ``[V, 2]`` in ImageJ (x, y) pixel
            coordinates, where pixel (col i, row j) spans ``[i, i+1) x [j, j+1)``
            and so has its centre at ``(i + 0.5, j + 0.5)``. Several paths
            combine by even-odd, so a path inside another is a hole.
        shape: ``(H, W)`` of the image.

    Returns:
        ``[H, W]`` bool mask.
    """
    h, w = shape
    mask = np.zeros((h, w), dtype=bool)
    verts = [np.asarray(v, dtype=np.float64).reshape(-1, 2) for v in paths]
    verts = [v for v in verts if v.shape[0] >= 3]
    if not verts:
        return mask
    allv = np.concatenate(verts)
    # Test only the pixels of the bounding box, clipped to the image.
    x0 = max(math.floor(allv[:, 0].min()), 0)
    x1 = min(math.ceil(allv[:, 0].max()), w)
    y0 = max(math.floor(allv[:, 1].min()), 0)
    y1 = min(math.ceil(allv[:, 1].max()), h)
    if x1 <= x0 or y1 <= y0:
        return mask
    px = np.arange(x0, x1, dtype=np.float64) + 0.5  # [C]
    py = np.arange(y0, y1, dtype=np.float64) + 0.5  # [Rows]
    inside = np.zeros((py.size, px.size), dtype=bool)
    for v in verts:
        xa, ya = v[:, 0], v[:, 1]
        xb, yb = np.roll(xa, -1), np.roll(ya, -1)  # edge a -> b, closing the path
        # Ray casting towards +x: each edge straddling the row's centre line
        # that crosses it right of the pixel centre flips the pixel's parity.
        # One loop step per edge, vectorised over every pixel of the box.
        for k in range(v.shape[0]):
            straddles = (ya[k] <= py) != (yb[k] <= py)  # [Rows]
            if not straddles.any():
                continue
            rows = np.flatnonzero(straddles)
            t = (py[rows] - ya[k]) / (yb[k] - ya[k])  # ya != yb where it straddles
            x_cross = xa[k] + t * (xb[k] - xa[k])  # [r]
            inside[rows] ^= px[None, :] < x_cross[:, None]
    mask[y0:y1, x0:x1] = inside
    return mask


def read_imagej_rois(path: PathLike, shape: tuple[int, int]) -> RoiSet:
    """Read ImageJ ROIs (``.roi`` or a ``.zip`` of them) as masks.

    Polygon, freehand, traced, rectangle, oval and composite ROIs are
    rasterised by pixel centre: a pixel belongs to the ROI when its centre
    lies inside the outline (ImageJ's own rule for polygon masks). Rounded
    rectangle corners are ignored. Parts outside the image are clipped.

    Args:
        path: ``.roi`` or ``.zip`` file written by ImageJ/Fiji (or roifile).
        shape: ``(H, W)`` of the movie the ROIs were drawn on, in pixels.

    Returns:
        :class:`RoiSet` with ``masks`` ``[R, H, W]`` bool and R names.

    Raises:
        DataError: unreadable file, no ROIs, a line or point ROI, or a ROI
            with no pixel inside the image.
    """
    import roifile

    p = Path(path)
    if not p.is_file():
        raise DataError("does not exist or is not a file", path=str(p))
    if len(shape) != 2 or any(int(s) < 1 for s in shape):
        raise DataError(f"must be (height, width) in pixels, got {shape}", field="shape")
    h, w = int(shape[0]), int(shape[1])
    try:
        rois = roifile.roiread(p)
    except Exception as exc:
        # roifile raises ValueError, struct.error, zipfile errors...: to the
        # user they all mean "not an ImageJ ROI file".
        raise DataError(f"is not a readable ImageJ ROI file ({exc})", path=str(p)) from exc
    if not isinstance(rois, list):
        rois = [rois]
    if not rois:
        raise DataError("holds no ROIs", path=str(p))
    area_types = {
        roifile.ROI_TYPE.POLYGON,
        roifile.ROI_TYPE.FREEHAND,
        roifile.ROI_TYPE.TRACED,
        roifile.ROI_TYPE.RECT,
        roifile.ROI_TYPE.OVAL,
    }
    masks = np.zeros((len(rois), h, w), dtype=bool)
    names = []
    for i, roi in enumerate(rois):
        name = roi.name or f"roi_{i}"
        names.append(name)
        composite = roi.multi_coordinates is not None
        if roi.roitype not in area_types and not composite:
            raise DataError(
                f"ROI {name!r} is a {roifile.ROI_TYPE(roi.roitype).name.lower()} ROI; "
                "only area ROIs (polygon, freehand, rectangle, oval) can be neuron masks",
                path=str(p),
                field=name,
            )
        coords = roi.coordinates(multi=True)
        masks[i] = _polygon_mask(list(coords), (h, w))
        if not masks[i].any():
            raise DataError(
                f"ROI {name!r} covers no pixel centre of the {h}x{w} image; is it drawn "
                "on a different image, or too thin?",
                path=str(p),
                field=name,
            )
    return RoiSet(masks=masks, names=tuple(names))


# ----------------------------------------------------------------------------
# traces


def traces_from_masks(
    movie_or_array: Movie | np.ndarray,
    masks: np.ndarray | RoiSet,
    *,
    chunk_frames: int | None = None,
) -> np.ndarray:
    """Mean fluorescence inside each ROI, frame by frame.

    The plain offline reference (no neuropil, no motion correction); reads
    the movie in chunks of frames so memory stays bounded.

    Args:
        movie_or_array: a :class:`Movie` or an array ``[T, H, W]``.
        masks: bool ``[R, H, W]`` (or a :class:`RoiSet`); ROIs may overlap.
        chunk_frames: frames read at a time; default keeps a chunk near 64 MB.

    Returns:
        ``[R, T]`` float32, in the movie's pixel units.
    """
    if isinstance(masks, RoiSet):
        masks = masks.masks
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or masks.dtype != np.bool_:
        raise DataError(
            f"must be bool [ROIs, height, width], got {masks.dtype} {masks.shape}",
            field="masks",
        )
    movie = movie_or_array
    if not isinstance(movie, Movie):
        movie = np.asarray(movie)
        if movie.ndim != 3:
            raise DataError(
                f"must be a movie [frames, height, width], got shape {movie.shape}",
                field="movie",
            )
    t, h, w = (int(x) for x in movie.shape)
    if masks.shape[1:] != (h, w):
        raise DataError(
            f"have frame shape {masks.shape[1:]} but the movie's frames are {(h, w)}",
            field="masks",
        )
    counts = masks.reshape(masks.shape[0], -1).sum(axis=1)
    if (counts == 0).any():
        raise DataError(f"ROIs {np.flatnonzero(counts == 0).tolist()} are empty", field="masks")
    # All ROIs' pixels as one flat index list: one gather and one
    # np.add.reduceat per chunk serve every ROI, overlapping or not.
    flat = [np.flatnonzero(m) for m in masks.reshape(masks.shape[0], -1)]
    idx = np.concatenate(flat)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if chunk_frames is None:
        chunk_frames = max(1, _CHUNK_BYTES // max(1, h * w * 8))
    out = np.empty((masks.shape[0], t), dtype=np.float32)
    for t0 in range(0, t, chunk_frames):
        t1 = min(t, t0 + chunk_frames)
        block = np.asarray(movie[t0:t1]).reshape(t1 - t0, h * w)
        # float64 sums: exact for any integer movie, so the mean is too.
        sums = np.add.reduceat(block[:, idx].astype(np.float64), starts, axis=1)  # [t, R]
        out[:, t0:t1] = (sums / counts).T
    return out


def session_from_movie(
    path: PathLike,
    rois_path: PathLike,
    fps: float | None = None,
    *,
    dataset: str | None = None,
) -> Session:
    """Raw-fluorescence session from a movie and ImageJ ROIs.

    Args:
        path: the movie (anything :func:`open_movie` reads).
        rois_path: ImageJ ``.roi``/``.zip`` drawn on that movie.
        fps: frame rate in Hz; default: the movie's metadata (error if none).
        dataset: HDF5 dataset name, as in :func:`open_movie`.

    Returns:
        ``kind="F"`` session, ``traces`` ``[R, T]`` float32 (mean pixel value
        per ROI), ``neuron_ids`` the ROI names.
    """
    p = Path(path)
    with open_movie(p, dataset=dataset) as movie:
        if fps is None:
            fps = movie.fps
        if fps is None:
            raise DataError("stores no frame rate; pass fps= (Hz)", path=str(p), field="fps")
        rois = read_imagej_rois(rois_path, movie.shape[1:])
        traces = traces_from_masks(movie, rois)
    session = Session(
        traces=traces,
        fps=fps,
        kind="F",
        session_id=p.stem,
        neuron_ids=rois.names,
        source=str(p),
    )
    return validate_session(session)
