"""Readers that turn the recordings people actually have into `Session`s.

One entry point, :func:`load_session`, looks at what a path is and hands it to
the matching reader; :func:`load_corpus` does the same for a folder (or list)
of recordings. Supported inputs:

- ``*.npz`` session files (DESIGN.md format, :func:`read_npz`);
- ``*.nwb`` files holding an ``RoiResponseSeries`` (:func:`read_nwb`);
- suite2p output folders (:func:`read_suite2p`);
- region-trace folders of ``timeseries*.npy`` files, like the Légaré
  zebrafish data (:func:`read_region_traces`);
- a bare ``*.npy`` array of traces ``[N, T]`` (:func:`read_npy_traces`).

Every reader returns a session checked by :func:`validate_session`, so an
error always names the file and the field.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np

from calm_rt.data._session import (
    CalmDataWarning,
    Session,
    TraceKind,
    drop_unusable_neurons,
    read_npz,
    validate_session,
)
from calm_rt.errors import DataError

__all__ = [
    "SUPPORTED_FORMATS",
    "find_session_files",
    "load_corpus",
    "load_session",
    "read_npy_traces",
    "read_nwb",
    "read_region_traces",
    "read_suite2p",
]

SUPPORTED_FORMATS = (
    "a session .npz file, "
    "an .nwb file with an RoiResponseSeries, "
    "a suite2p output folder (F.npy, or suite2p/plane0/F.npy, or plane0/F.npy), "
    "a region-traces folder or file (timeseries*.npy), "
    "or a bare .npy array of traces [neurons, frames] (with fps=)"
)

_NO_RATE = "a bare .npy has no frame rate; pass fps= (frames per second, Hz)"

# Where suite2p puts a plane's outputs, relative to the folder a user names.
_SUITE2P_LAYOUTS = (".", "suite2p/plane0", "plane0")

PathLike = str | os.PathLike[str]


# ----------------------------------------------------------------------------
# dispatch


def load_session(path: PathLike, *, fps: float | None = None, drop_bad: bool = True) -> Session:
    """Read one recording, whatever its format, as a validated `Session`.

    Args:
        path: a ``.npz``, ``.nwb`` or ``.npy`` file, a suite2p output folder,
            or a region-traces folder holding exactly one ``timeseries*.npy``.
        fps: frame rate in Hz. Required for formats that store none (bare
            ``.npy``, region traces); for the others it overrides the stored
            rate, with a :class:`CalmDataWarning` when the two differ.
        drop_bad: drop all-NaN and constant neurons (with a warning that lists
            their indices), see :func:`drop_unusable_neurons`.

    Returns:
        The session: ``traces`` float32 ``[N, T]``.

    Raises:
        DataError: the path is missing, of no supported format, or its
            content breaks the session format.
    """
    p = Path(path)
    if not p.exists():
        raise DataError("does not exist", path=str(p))
    if p.is_dir():
        session = _read_folder(p, fps=fps)
    else:
        session = _read_file(p, fps=fps)
    if drop_bad:
        session = drop_unusable_neurons(session)
    return session


def _read_file(p: Path, *, fps: float | None) -> Session:
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return _override_fps(read_npz(p), fps, stored_in="the file's 'fps'")
    if suffix == ".nwb":
        return read_nwb(p, fps=fps)
    if suffix == ".npy":
        # suite2p's F.npy named directly: read its folder, or the cell labels,
        # neuropil and rate beside it would be lost.
        if p.name == "F.npy" and any((p.parent / f).is_file() for f in ("ops.npy", "iscell.npy")):
            return read_suite2p(p.parent, fps=fps)
        if _is_region_file(p):
            return read_region_traces(p, fps=fps)
        return read_npy_traces(p, fps=fps)
    raise DataError(f"unsupported format; calm-rt reads {SUPPORTED_FORMATS}", path=str(p))


def _read_folder(p: Path, *, fps: float | None) -> Session:
    plane = _suite2p_plane_dir(p)
    if plane is not None:
        return read_suite2p(plane, fps=fps)
    region_files = _region_files(p)
    if len(region_files) == 1:
        return read_region_traces(region_files[0], fps=fps)
    if len(region_files) > 1:
        names = [f.name for f in region_files]
        raise DataError(
            f"holds {len(region_files)} region-trace sessions {names}; "
            "load_session reads one, use load_corpus to read them all",
            path=str(p),
        )
    raise DataError(
        "is a folder but neither a suite2p output folder (F.npy, suite2p/plane0/F.npy "
        "or plane0/F.npy) nor a region-traces folder (timeseries*.npy); for a folder "
        f"of sessions use load_corpus. calm-rt reads {SUPPORTED_FORMATS}",
        path=str(p),
    )


def _override_fps(session: Session, fps: float | None, *, stored_in: str) -> Session:
    """Apply a user-given frame rate over the stored one, saying so if they differ."""
    if fps is None:
        return session
    if not np.isclose(float(fps), session.fps, rtol=1e-6, atol=0.0):
        warnings.warn(
            f"{session.source}: using fps={fps:g} Hz as given, not the {session.fps:g} Hz "
            f"stored in {stored_in}",
            CalmDataWarning,
            stacklevel=3,
        )
    return validate_session(replace(session, fps=fps))


# ----------------------------------------------------------------------------
# corpus


def find_session_files(folder: PathLike) -> list[Path]:
    """Every session below ``folder``, in sorted (deterministic) order.

    Looks recursively for ``*.npz``, ``*.nwb`` and ``timeseries*.npy`` files
    and suite2p plane folders (folders holding ``F.npy``). A suite2p
    ``combined`` folder is skipped: it concatenates the planes that are
    already listed, so reading it too would count every neuron twice. Files
    that :func:`write_npz` is still writing (``*.tmp.npz``) and sidecar files
    of ground truth (``*.truth.npz``, written by the simulator) are skipped.

    Returns:
        Paths: files, or suite2p plane folders.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError("is not a folder", path=str(root))
    found: set[Path] = set()
    for p in root.rglob("*"):
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            continue  # hidden folders (.git, editor caches) hold no sessions
        name = p.name
        if not p.is_file():
            continue
        if name.endswith((".tmp.npz", ".truth.npz")):
            continue
        suffix = p.suffix.lower()
        if suffix in (".npz", ".nwb") or _is_region_file(p):
            found.add(p)
        elif name == "F.npy" and p.parent.name != "combined":
            found.add(p.parent)
    return sorted(found, key=lambda q: str(q))


def load_corpus(
    path_or_paths: PathLike | Iterable[PathLike],
    *,
    fps: float | None = None,
    drop_bad: bool = True,
) -> list[Session]:
    """Read many recordings: a folder of sessions, one session, or a list.

    Args:
        path_or_paths: a folder (searched with :func:`find_session_files`), a
            single session path (anything :func:`load_session` reads), or a
            list of such paths (folders in it are expanded the same way).
        fps: as in :func:`load_session`, applied to every session.
        drop_bad: as in :func:`load_session`.

    Returns:
        Sessions in sorted path order.

    Raises:
        DataError: nothing was found, or a session is unreadable.
    """
    if isinstance(path_or_paths, (str, os.PathLike)):
        inputs = [Path(path_or_paths)]
    else:
        inputs = [Path(p) for p in path_or_paths]
    paths: list[Path] = []
    for p in inputs:
        if not p.exists():
            raise DataError("does not exist", path=str(p))
        if p.is_dir():
            # An empty result is caught below, with the list of what was looked for.
            paths.extend(find_session_files(p))
        else:
            paths.append(p)
    paths = sorted(set(paths), key=lambda q: str(q))
    if not paths:
        where = ", ".join(str(p) for p in inputs) or "(no paths given)"
        raise DataError(
            f"no sessions found in {where}; looked for *.npz, *.nwb, timeseries*.npy "
            "and suite2p folders (F.npy)"
        )
    return [load_session(p, fps=fps, drop_bad=drop_bad) for p in paths]


# ----------------------------------------------------------------------------
# bare .npy and region traces


def _load_plain_npy(path: Path, *, name: str) -> np.ndarray:
    """A ``.npy`` array, never unpickled; any failure is a DataError."""
    try:
        with open(path, "rb") as fh:
            is_npy = fh.read(6) == b"\x93NUMPY"
        if not is_npy:
            # np.load would try to unpickle it; say what it really is instead.
            raise OSError("no .npy header; is it truncated or of another format?")
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(
                "holds pickled objects; store a plain numeric or string array",
                path=str(path),
                field=name,
            ) from exc
        raise DataError(f"is not a readable .npy file ({exc})", path=str(path), field=name) from exc
    except (OSError, EOFError) as exc:
        raise DataError(f"is not a readable .npy file ({exc})", path=str(path), field=name) from exc
    return arr


def read_npy_traces(path: PathLike, fps: float | None, kind: TraceKind = "dff") -> Session:
    """Read a bare ``.npy`` array of traces ``[N, T]`` (neurons x frames).

    Args:
        path: the ``.npy`` file (plain float array, never pickled).
        fps: frame rate in Hz; required, the file stores none.
        kind: ``"dff"`` (default) or ``"F"``.
    """
    p = Path(path)
    if fps is None:
        raise DataError(_NO_RATE, path=str(p), field="fps")
    traces = _load_plain_npy(p, name="traces")
    session = Session(traces=traces, fps=fps, kind=kind, session_id=p.stem, source=str(p))
    return validate_session(session)


def _is_region_file(p: Path) -> bool:
    return p.name.startswith("timeseries") and p.suffix.lower() == ".npy"


def _region_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and _is_region_file(f))


def read_region_traces(path: PathLike, fps: float | None) -> Session:
    """Read one region-trace session (e.g. ``timeseries_regions_fish6.npy``).

    The layout is that of the Légaré et al. zebrafish data
    (``../shared/data/zebrafish_legare``): each ``timeseries*.npy`` is one
    animal's dF/F ``[regions, frames]``; ``region_acronyms.npy`` or
    ``region_names.npy`` beside it label the rows. The rate is not stored.

    Args:
        path: a ``timeseries*.npy`` file, or a folder holding exactly one.
        fps: frame rate in Hz (about 1 Hz for the Légaré data); required.

    Returns:
        A ``kind="dff"`` session; ``neuron_ids`` are the region acronyms (or
        names) when their count matches the rows; ``animal_id`` is the last
        ``_`` part of the file name (``"fish6"``).
    """
    p = Path(path)
    if p.is_dir():
        files = _region_files(p)
        if len(files) != 1:
            raise DataError(
                f"holds {len(files)} timeseries*.npy files; name one, or use load_corpus",
                path=str(p),
            )
        p = files[0]
    if fps is None:
        raise DataError(_NO_RATE, path=str(p), field="fps")
    traces = _load_plain_npy(p, name="traces")
    ids = None
    n_rows = traces.shape[0] if traces.ndim == 2 else -1
    # Acronyms first: they are short enough to read in plots and warnings.
    for label_file in ("region_acronyms.npy", "region_names.npy"):
        lp = p.parent / label_file
        if not lp.is_file():
            continue
        labels = _load_plain_npy(lp, name="labels")
        if labels.ndim == 1 and labels.shape[0] == n_rows:
            ids = tuple(str(x) for x in labels)
            break
    stem = p.stem
    animal = stem.split("_")[-1] if "_" in stem else ""
    session = Session(
        traces=traces,
        fps=fps,
        kind="dff",
        animal_id=animal,
        session_id=stem,
        neuron_ids=ids,
        source=str(p),
    )
    return validate_session(session)


# ----------------------------------------------------------------------------
# suite2p


def _suite2p_plane_dir(folder: Path) -> Path | None:
    for rel in _SUITE2P_LAYOUTS:
        plane = folder / rel
        if (plane / "F.npy").is_file():
            return plane
    return None


def read_suite2p(folder: PathLike, fps: float | None = None, only_cells: bool = True) -> Session:
    """Read a suite2p plane's output as a raw-fluorescence session.

    Args:
        folder: a folder holding ``F.npy`` (a suite2p ``planeN`` folder), or
            one holding ``suite2p/plane0/F.npy`` or ``plane0/F.npy``.
        fps: frame rate in Hz; overrides ``ops.npy['fs']`` (suite2p's default
            of 10 Hz is often left unchanged). Required when there is no
            ``ops.npy``.
        only_cells: keep only the ROIs that ``iscell.npy`` labels as cells.

    Returns:
        ``kind="F"`` session: ``traces`` from ``F.npy`` ``[N, T]``,
        ``neuropil`` from ``Fneu.npy`` when present; ``neuron_ids`` are the
        original ROI indices (rows of ``F.npy``) as strings.
    """
    root = Path(folder)
    plane = _suite2p_plane_dir(root)
    if plane is None:
        raise DataError(
            "holds no suite2p output: looked for F.npy, suite2p/plane0/F.npy and plane0/F.npy",
            path=str(root),
        )
    f_path = plane / "F.npy"
    traces = _load_plain_npy(f_path, name="F")
    if traces.ndim != 2:
        raise DataError(
            f"expected [ROIs, frames], got shape {traces.shape}", path=str(f_path), field="F"
        )
    n = traces.shape[0]
    neuropil = None
    fneu_path = plane / "Fneu.npy"
    if fneu_path.is_file():
        neuropil = _load_plain_npy(fneu_path, name="Fneu")
        if neuropil.shape != traces.shape:
            raise DataError(
                f"shape {neuropil.shape} differs from F.npy {traces.shape}; "
                "both must come from the same suite2p run",
                path=str(fneu_path),
                field="Fneu",
            )
    keep = np.arange(n)
    iscell_path = plane / "iscell.npy"
    if only_cells:
        if not iscell_path.is_file():
            raise DataError(
                "missing, so cells cannot be told from other ROIs; "
                "pass only_cells=False to use every ROI",
                path=str(iscell_path),
                field="iscell",
            )
        iscell = _load_plain_npy(iscell_path, name="iscell")
        if iscell.ndim not in (1, 2) or iscell.shape[0] != n:
            raise DataError(
                f"expected [{n}, 2] (label, probability) for the {n} ROIs of F.npy, "
                f"got shape {iscell.shape}",
                path=str(iscell_path),
                field="iscell",
            )
        label = iscell[:, 0] if iscell.ndim == 2 else iscell
        keep = np.flatnonzero(label > 0.5)
        if keep.size == 0:
            raise DataError(
                f"labels none of the {n} ROIs as a cell; curate in the suite2p GUI "
                "or pass only_cells=False",
                path=str(iscell_path),
                field="iscell",
            )
    ops_path = plane / "ops.npy"
    stored_fs = None
    if ops_path.is_file():
        stored_fs = _suite2p_fs(ops_path)
    if fps is None:
        if stored_fs is None:
            raise DataError(
                "no frame rate: ops.npy is missing or has no 'fs'; pass fps= (Hz)",
                path=str(plane),
                field="fps",
            )
        fps = stored_fs
    elif stored_fs is not None and not np.isclose(float(fps), stored_fs, rtol=1e-6, atol=0.0):
        warnings.warn(
            f"{plane}: using fps={fps:g} Hz as given, not the {stored_fs:g} Hz stored in "
            "ops.npy 'fs'",
            CalmDataWarning,
            stacklevel=2,
        )
    named = plane.resolve()  # so that "." still yields a folder name
    if named.name.startswith("plane"):
        base = named.parent.parent if named.parent.name == "suite2p" else named.parent
        session_id = f"{base.name}/{named.name}"
    else:
        session_id = named.name
    session = Session(
        traces=traces[keep],
        fps=fps,
        kind="F",
        neuropil=None if neuropil is None else neuropil[keep],
        session_id=session_id,
        neuron_ids=tuple(str(i) for i in keep),
        source=str(plane),
    )
    return validate_session(session)


def _suite2p_fs(ops_path: Path) -> float | None:
    # ops.npy is suite2p's own format: a dict saved with np.save, so it can
    # only be read with allow_pickle=True. Acceptable here because it is a
    # local file the user produced with suite2p, never network input; the
    # wire protocol and the session format stay pickle-free.
    try:
        ops = np.load(ops_path, allow_pickle=True)
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"is not a readable .npy file ({exc})", path=str(ops_path)) from exc
    if ops.dtype != object or ops.shape != ():
        raise DataError(
            f"expected suite2p's pickled dict, got {ops.dtype} {ops.shape}",
            path=str(ops_path),
        )
    ops = ops.item()
    if not isinstance(ops, dict):
        raise DataError(f"expected a dict, got {type(ops).__name__}", path=str(ops_path))
    if "fs" not in ops:
        return None
    try:
        return float(ops["fs"])
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"must be a number (Hz), got {ops['fs']!r}", path=str(ops_path), field="fs"
        ) from exc


# ----------------------------------------------------------------------------
# NWB

# What ``calm-rt export --nwb`` writes: its module, traces (F, or dF/F for "dff"), neuropil;
# a file with that module reads these by default, though it holds more series.
NWB_EXPORT_MODULE = "calm_rt"
NWB_EXPORT_SERIES = ("ophys/Fluorescence/RoiResponseSeries", "ophys/DfOverF/RoiResponseSeries")
NWB_EXPORT_NEUROPIL = "ophys/Fluorescence/Neuropil"


def read_nwb(path: PathLike, series: str | None = None, *, fps: float | None = None) -> Session:
    """Read an ``RoiResponseSeries`` from an NWB file.

    Series are looked for inside ``Fluorescence`` and ``DfOverF`` containers
    of the file's processing modules.

    Args:
        path: the ``.nwb`` file.
        series: which series, when the file holds several: its name, or its
            full ``module/container/series`` path (as listed in the error).
        fps: frame rate in Hz; overrides the stored rate (with a warning when
            they differ), required when the series has neither a rate nor
            timestamps.

    Returns:
        Session with ``traces`` ``[N, T]`` (NWB stores ``[T, N]``; a 1D series
        is one ROI), ``kind="dff"`` for a ``DfOverF`` series else ``"F"``,
        ``fps`` from the series' ``rate`` (or the median step of its
        timestamps), ``session_id`` the file's identifier, ``animal_id`` its
        subject's ``subject_id``, ``neuron_ids`` the ROI table ids.
    """
    p = Path(path)
    try:
        from pynwb import NWBHDF5IO
        from pynwb.ophys import DfOverF, Fluorescence
    except ImportError as exc:
        raise DataError(
            "needs pynwb to read NWB files: pip install pynwb (or calm-rt[nwb])", path=str(p)
        ) from exc

    try:
        io = NWBHDF5IO(str(p), mode="r")
    except Exception as exc:
        # pynwb/h5py raise many types (OSError, KeyError, ValueError...) for a
        # file that is not NWB; all mean the same thing to the user.
        raise DataError(f"is not a readable NWB file ({exc})", path=str(p)) from exc
    with io:
        try:
            nwbfile = io.read()
        except Exception as exc:
            raise DataError(f"is not a readable NWB file ({exc})", path=str(p)) from exc
        found: dict[str, tuple[object, str]] = {}
        for mod_name in sorted(nwbfile.processing):
            module = nwbfile.processing[mod_name]
            for iface_name in sorted(module.data_interfaces):
                iface = module.data_interfaces[iface_name]
                if isinstance(iface, DfOverF):
                    kind = "dff"
                elif isinstance(iface, Fluorescence):
                    kind = "F"
                else:
                    continue
                for s_name in sorted(iface.roi_response_series):
                    key = f"{mod_name}/{iface_name}/{s_name}"
                    found[key] = (iface.roi_response_series[s_name], kind)
        if not found:
            raise DataError(
                "holds no RoiResponseSeries in a Fluorescence or DfOverF container of "
                "any processing module; calm-rt needs extracted traces, not raw images",
                path=str(p),
            )
        export = NWB_EXPORT_MODULE in nwbfile.processing
        if series is None and export and len(found) > 1:
            series = next((k for k in NWB_EXPORT_SERIES if k in found), None)
        key = _pick_series(found, series, path=str(p))
        rrs, kind = found[key]
        traces, stored_fps = _series_arrays(rrs, path=str(p), key=key)
        pil = NWB_EXPORT_NEUROPIL if export and key in NWB_EXPORT_SERIES else ""
        neuropil = _series_arrays(found[pil][0], path=str(p), key=pil)[0] if pil in found else None
        if stored_fps is None and fps is None:
            raise DataError(
                "has neither a rate nor two timestamps; pass fps= (Hz)",
                path=str(p),
                field=f"{key}/rate",
            )
        ids = None
        rois = getattr(rrs, "rois", None)
        if rois is not None and rois.table is not None:
            rows = np.asarray(rois.data[:], dtype=np.int64)
            table_ids = np.asarray(rois.table.id[:])
            if rows.shape[0] == traces.shape[0]:
                ids = tuple(str(x) for x in table_ids[rows])
        subject = nwbfile.subject
        animal = "" if subject is None or subject.subject_id is None else str(subject.subject_id)
        session = Session(
            traces=traces,
            fps=stored_fps if stored_fps is not None else fps,
            kind=kind,  # type: ignore[arg-type]
            animal_id=animal,
            session_id=str(nwbfile.identifier),
            neuron_ids=ids,
            neuropil=None if neuropil is None else neuropil.astype(np.float32),
            source=str(p),
        )
    session = validate_session(session)
    if stored_fps is not None:
        session = _override_fps(session, fps, stored_in=f"{key}'s rate or timestamps")
    return session


def _pick_series(found: dict[str, tuple[object, str]], series: str | None, *, path: str) -> str:
    keys = sorted(found)
    if series is None:
        if len(keys) == 1:
            return keys[0]
        raise DataError(
            f"holds {len(keys)} RoiResponseSeries {keys}; pass series= with one of them",
            path=path,
            field="series",
        )
    if series in found:
        return series
    by_name = [k for k in keys if k.rsplit("/", 1)[-1] == series]
    if len(by_name) == 1:
        return by_name[0]
    if len(by_name) > 1:
        raise DataError(
            f"{series!r} names {len(by_name)} series {by_name}; pass the full path",
            path=path,
            field="series",
        )
    raise DataError(
        f"no RoiResponseSeries {series!r}; the file has {keys}", path=path, field="series"
    )


def _series_arrays(rrs: object, *, path: str, key: str) -> tuple[np.ndarray, float | None]:
    """Traces ``[N, T]`` and frame rate (Hz, None if unknown) of one RoiResponseSeries."""
    data = np.asarray(rrs.data[()])  # type: ignore[attr-defined]
    field = f"{key}/data"
    if data.ndim == 1:
        data = data[:, None]  # one ROI
    if data.ndim != 2:
        raise DataError(f"expected [frames, ROIs], got shape {data.shape}", path=path, field=field)
    if data.dtype.kind not in "fiu" or data.dtype == np.bool_:
        raise DataError(f"expected numbers, got dtype {data.dtype}", path=path, field=field)
    conversion = float(getattr(rrs, "conversion", 1.0) or 1.0)
    offset = float(getattr(rrs, "offset", 0.0) or 0.0)
    # NWB may store fluorescence as integers with a conversion factor to the
    # stated unit; apply it so the traces are in the file's physical units.
    if data.dtype.kind in "iu" or conversion != 1.0 or offset != 0.0:
        data = data.astype(np.float64) * conversion + offset
    rate = getattr(rrs, "rate", None)
    if rate is not None:
        fps = float(rate)
    else:
        ts = getattr(rrs, "timestamps", None)
        stamps = None if ts is None else np.asarray(ts[()], dtype=np.float64)
        if stamps is None or stamps.size < 2:
            return data.T, None
        step = float(np.median(np.diff(stamps)))
        if not step > 0:
            raise DataError(
                f"timestamps do not increase (median step {step} s)",
                path=path,
                field=f"{key}/timestamps",
            )
        fps = 1.0 / step
    return data.T, fps
