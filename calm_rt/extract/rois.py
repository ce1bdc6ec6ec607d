"""ROIs: sparse footprints, every ROI file format calm-rt reads, and label images.

:func:`load_rois` reads every ROI format calm-rt accepts into one sparse
:class:`Footprints`:

* a suite2p plane folder or its ``stat.npy`` (pixels ``ypix``/``xpix``
  weighted by ``lam``; ``iscell.npy`` beside it picks the cells; ``ops.npy``
  gives the frame size and ``meanImg``, the image the ROIs live in);
* an ``.npz`` with a label image ``labels`` ``[H, W]`` (0 = background,
  k > 0 = ROI k), dense weights ``footprints`` ``[R, H, W]``, or sparse
  weights as :func:`save_rois` writes them (``weights_data``,
  ``weights_indices``, ``weights_indptr``, ``shape``), optionally a
  ``reference`` ``[H, W]`` image;
* ImageJ ``.roi``/``.zip`` files (:func:`calm_rt.data.read_imagej_rois`),
  given the frame size.

:meth:`Footprints.labels` is the one place footprints become a label image
(the napari view, the simulator's ground truth and the demo all use it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from calm_rt.data import labels_from_weights
from calm_rt.errors import DataError

__all__ = [
    "Footprints",
    "VolumeRois",
    "as_footprints",
    "footprints_from_array",
    "load_rois",
    "load_volume_rois",
    "save_rois",
    "save_volume_rois",
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

    def labels(self) -> np.ndarray:
        """``[H, W]`` int32 label image: ROI k is label k + 1 where it is the strongest, 0 elsewhere."""
        return labels_from_weights(self.weights, self.shape)


@dataclass(frozen=True, eq=False)
class VolumeRois:
    """ROIs of a multi-plane (volumetric) stream: one :class:`Footprints` per plane.

    The neurons of all planes are one population: plane 0's ROIs first, then
    plane 1's, and so on (``offsets[k]`` is plane k's first neuron index).
    """

    planes: tuple[Footprints, ...]

    def __post_init__(self) -> None:
        if len(self.planes) < 1:
            raise DataError("a volume needs ROIs for at least one plane", field="planes")

    @property
    def n_planes(self) -> int:
        return len(self.planes)

    @property
    def n_rois(self) -> int:
        return sum(fp.n_rois for fp in self.planes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """First neuron index of each plane, and the total at the end (``K + 1`` numbers)."""
        return tuple(int(x) for x in np.cumsum([0] + [fp.n_rois for fp in self.planes]))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"plane{k}/{name}" for k, fp in enumerate(self.planes) for name in fp.names)


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


def as_footprints(footprints: Footprints | np.ndarray) -> Footprints:
    """:class:`Footprints` as they are, or from dense weights ``[R, H, W]`` / labels ``[H, W]``."""
    if isinstance(footprints, Footprints):
        return footprints
    return footprints_from_array(np.asarray(footprints))


def save_rois(path: PathLike, footprints: Footprints) -> Path:
    """Write ``footprints`` as a sparse ``.npz`` that :func:`load_rois` reads (kilobytes, not R frames)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = footprints.weights
    arrays: dict[str, Any] = dict(
        weights_data=w.data, weights_indices=w.indices, weights_indptr=w.indptr,
        shape=np.array(footprints.shape, np.int64), names=np.array(footprints.names, np.str_),
    )  # fmt: skip
    if footprints.reference is not None:
        arrays["reference"] = footprints.reference
    np.savez(path, **arrays)
    return path


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
    if p.is_dir() and len(_plane_paths(p)) > 1:
        raise DataError(
            f"holds {len(_plane_paths(p))} imaging planes; read them with load_volume_rois "
            "(calm-rt serve --rois takes the folder as a multi-plane stream)",
            path=str(p),
        )
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
                "convert once to an npz: save_rois('rois.npz', load_rois(path, shape))",
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


def _plane_paths(folder: Path) -> list[Path]:
    """``plane0``, ``plane1``, ... in ``folder`` (or its ``suite2p/``): folders or ``.npz`` files.

    suite2p writes a multi-plane run as ``suite2p/plane0 .. planeK-1``;
    :func:`save_volume_rois` writes ``plane0.npz ..``. Numbering must start
    at 0 and have no hole (a missing plane would shift every later neuron).
    """
    for root in (folder, folder / "suite2p"):
        found: dict[int, Path] = {}
        for child in root.glob("plane*") if root.is_dir() else ():
            stem = child.name.removesuffix(".npz") if child.is_file() else child.name
            if stem[5:].isdigit() and (child.is_dir() or child.suffix == ".npz"):
                found[int(stem[5:])] = child
        if found:
            if sorted(found) != list(range(len(found))):
                raise DataError(
                    f"plane folders/files are numbered {sorted(found)}; they must run 0..K-1",
                    path=str(root),
                )
            return [found[k] for k in range(len(found))]
    return []


def load_volume_rois(
    path: PathLike, shape: tuple[int, int] | None = None
) -> Footprints | VolumeRois:
    """ROIs of a stream: :class:`VolumeRois` for a multi-plane folder, else :func:`load_rois`.

    A multi-plane folder holds ``plane0``, ``plane1``, ... (suite2p plane
    folders, or ``.npz`` files as :func:`save_volume_rois` writes them),
    directly or under ``suite2p/``; a folder of one plane is a single plane.
    ``shape`` is every plane's frame size, as for :func:`load_rois`.
    """
    p = Path(path)
    planes = _plane_paths(p) if p.is_dir() else []
    if len(planes) < 2:
        return load_rois(planes[0] if planes else p, shape)
    return VolumeRois(tuple(load_rois(plane, shape) for plane in planes))


def save_volume_rois(folder: PathLike, rois: VolumeRois) -> Path:
    """Write a volume's ROIs as ``folder/plane{k}.npz`` (what :func:`load_volume_rois` reads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k, fp in enumerate(rois.planes):
        save_rois(folder / f"plane{k}.npz", fp)
    return folder


def _read_npz_rois(p: Path) -> Footprints:
    try:
        with np.load(p, allow_pickle=False) as z:
            reference = None
            for key in ("reference", "mean_image", "meanImg"):
                if key in z:
                    reference = np.asarray(z[key], np.float32)
                    break
            names = tuple(str(n) for n in z["names"]) if "names" in z else None
            if "weights_indptr" in z:  # sparse, as save_rois writes it
                shape = tuple(int(v) for v in z["shape"])
                indptr = np.asarray(z["weights_indptr"])
                weights = sparse.csr_matrix(
                    (z["weights_data"], z["weights_indices"], indptr),
                    shape=(indptr.size - 1, shape[0] * shape[1]),
                )
                return _validated(weights, shape, names, reference, str(p))  # type: ignore[arg-type]
            if "footprints" in z:
                arr = np.asarray(z["footprints"])
            elif "labels" in z:
                arr = np.asarray(z["labels"])
            else:
                raise DataError(
                    "needs 'footprints' [R, H, W], 'labels' [H, W] or sparse weights (save_rois); "
                    f"it holds {sorted(z.files)}",
                    path=str(p),
                )
    except (OSError, ValueError, EOFError, KeyError) as exc:
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
