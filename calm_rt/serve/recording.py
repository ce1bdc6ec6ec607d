"""Lossless recording of a live session to HDF5, appended frame by frame.

The file is written in HDF5's single-writer/multiple-reader (SWMR) mode and
flushed after every chunk of frames, so a reader can follow it live and a
crash (even SIGKILL) loses at most the frames since the last flush. It reads
back as a session with :func:`read_recording` (also through
:func:`calm_rt.data.load_session`), and whole, with everything the server
answered, with :func:`load_recording` (what ``calm-rt export --nwb`` reads).

Layout (T grows; N neurons, H horizon, B decoded and M measured behaviour
variables, E trigger events)::

    /traces [T, N] float32       raw fluorescence as extracted (or received)
    /neuropil [T, N] float32     when extracted from frames (or received)
    /activity [T, N] float32     the engine's normalised input (the forecasts' units)
    /seq [T] int64, /t_acq [T], /t_arrival [T], /t_publish [T] float64 (Unix s)
    /forecast [T, N, H] float32, /forecast_std [T, N, H] float32
    /behavior_pred [T, B] float32 (when the model decodes behaviour)
    /behavior [T, M] float32     behaviour the scope sent beside the frames (NaN rows: none sent)
    /shift [T, 2] float32        motion shift (y, x) applied to raw frames, pixels
    /trigger_events [E] (seq, t_publish, rule, value, threshold, lead_frames)
    /rois/{data,indices,indptr,names[,reference]}  the footprints (CSR), raw frames only
    /committed [1] int64         frames written whole (set after every chunk's datasets)
    /closed [1] uint8            1 once the recording was closed cleanly
    attrs: format="calm-rt-recording", version=2, fps, kind, neurons, horizon,
           behavior_names, behavior_pred_names, roi_shape (raw frames)

Version 1 files (no activity, behaviour, shift, events, ROIs or markers)
still read. The datasets that need the first frame to know their width
(measured behaviour) are made at the first frame, when SWMR starts; a crash
before the first frame leaves an empty file.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from scipy import sparse

from calm_rt.data import Session, validate_session
from calm_rt.errors import DataError
from calm_rt.extract import Footprints

__all__ = ["EVENT_DTYPE", "Recorder", "Recording", "load_recording", "read_recording"]

FORMAT = "calm-rt-recording"
VERSION = 2
EVENT_DTYPE = np.dtype(
    [("seq", "i8"), ("t_publish", "f8"), ("rule", "S64"), ("value", "f4"),
     ("threshold", "f4"), ("lead_frames", "i4")]
)  # fmt: skip
# Per-frame datasets, in the order a chunk is written (``committed`` after all of them).
_PER_FRAME = (
    "traces", "neuropil", "activity", "seq", "t_acq", "t_arrival", "t_publish", "forecast",
    "forecast_std", "behavior_pred", "behavior", "shift",
)  # fmt: skip


class Recorder:
    """Append per-frame inputs and outputs to an HDF5 file (SWMR, chunked).

    Args:
        path: the new ``.h5`` file.
        n_neurons, fps, horizon, kind: the session's shape and units.
        n_behavior: decoded behaviour variables (0: none recorded).
        with_neuropil: whether rows carry neuropil.
        chunk_frames: frames per flush (a crash loses at most this many).
        footprints: the ROIs of a raw-frame session (stored, with the motion shift per frame).
        behavior_pred_names: names of the decoded variables.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        n_neurons: int,
        fps: float,
        horizon: int,
        kind: str = "F",
        n_behavior: int = 0,
        with_neuropil: bool = False,
        chunk_frames: int = 30,
        *,
        footprints: Footprints | None = None,
        behavior_pred_names: tuple[str, ...] = (),
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.chunk = int(chunk_frames)
        self.file = h5py.File(self.path, "w", libver="latest")
        f = self.file
        f.attrs.update(
            format=FORMAT, version=VERSION, fps=float(fps), kind=kind, neurons=n_neurons,
            horizon=horizon, behavior_pred_names=list(behavior_pred_names)[:n_behavior] or [""],
        )  # fmt: skip
        n, h = n_neurons, horizon
        self._shapes: dict[str, tuple[tuple[int, ...], str]] = {
            "traces": ((n,), "f4"), "activity": ((n,), "f4"), "seq": ((), "i8"),
            "t_acq": ((), "f8"), "t_arrival": ((), "f8"), "t_publish": ((), "f8"),
            "forecast": ((n, h), "f4"), "forecast_std": ((n, h), "f4"),
        }  # fmt: skip
        if with_neuropil:
            self._shapes["neuropil"] = ((n,), "f4")
        if n_behavior:
            self._shapes["behavior_pred"] = ((n_behavior,), "f4")
        if footprints is not None:
            self._shapes["shift"] = ((2,), "f4")
            g = f.create_group("rois")
            w = sparse.csr_matrix(footprints.weights, dtype=np.float32)
            g.create_dataset("data", data=w.data)
            g.create_dataset("indices", data=w.indices.astype(np.int64))
            g.create_dataset("indptr", data=w.indptr.astype(np.int64))
            g.create_dataset("names", data=np.array([s.encode() for s in footprints.names]))
            if footprints.reference is not None:
                g.create_dataset("reference", data=np.asarray(footprints.reference, np.float32))
            f.attrs["roi_shape"] = list(footprints.shape)
        self._rows: dict[str, list[np.ndarray]] = {k: [] for k in self._shapes}
        self._behavior: list[np.ndarray | None] = []
        self._events: list[tuple] = []
        self._started = False
        self.frames = 0
        f.flush()

    @property
    def fields(self) -> frozenset[str]:
        """The datasets every row must fill (``neuropil``, ``behavior_pred``, ``shift`` when recorded)."""
        return frozenset(self._rows)

    def _start(self, behavior: np.ndarray | None) -> None:
        """Make the per-frame datasets (measured behaviour's width is known now), then SWMR."""
        f = self.file
        shapes = dict(self._shapes)
        if behavior is not None and np.asarray(behavior).ndim == 1:
            shapes["behavior"] = ((int(np.asarray(behavior).shape[0]),), "f4")
        for name, (shape, dtype) in shapes.items():
            f.create_dataset(
                name, shape=(0, *shape), maxshape=(None, *shape), chunks=(self.chunk, *shape),
                dtype=dtype,
            )  # fmt: skip
        f.create_dataset(
            "trigger_events", shape=(0,), maxshape=(None,), chunks=(64,), dtype=EVENT_DTYPE
        )
        f.create_dataset("committed", data=np.zeros(1, np.int64))
        f.create_dataset("closed", data=np.zeros(1, np.uint8))
        self._behavior_width = shapes["behavior"][0][0] if "behavior" in shapes else 0
        f.swmr_mode = True  # from here on readers may follow and a crash keeps flushed data
        self._started = True

    def append(self, behavior: np.ndarray | None = None, **row: np.ndarray | float | int) -> None:
        """Add one frame; ``row`` has a value for every dataset of :attr:`fields`.

        ``behavior [M]``: what the scope sent beside the frame (optional; the
        width is fixed by the first frame that has it; rows without it are NaN).
        """
        if "activity" not in row:  # optional for writers that run no engine
            row["activity"] = np.full(self._shapes["activity"][0], np.nan, np.float32)
        missing = [name for name in self._rows if name not in row]
        if missing:  # checked before anything is appended: a row is all or nothing
            raise DataError(f"recording row lacks {missing}", path=str(self.path))
        if not self._started:
            self._start(behavior)
        for name, buf in self._rows.items():
            buf.append(np.asarray(row[name]))
        self._behavior.append(None if behavior is None else np.asarray(behavior, np.float32))
        self.frames += 1
        if len(self._rows["seq"]) >= self.chunk:
            self.flush()

    def add_trigger(
        self, seq: int, t_publish: float, rule: str, value: float, threshold: float,
        lead_frames: int,
    ) -> None:  # fmt: skip
        """Record one trigger event (written with the next chunk)."""
        self._events.append((seq, t_publish, rule.encode()[:64], value, threshold, lead_frames))

    def flush(self) -> None:
        """Write buffered frames and events, then mark them whole, and flush to disk."""
        pending = len(self._rows["seq"])
        if not self._started or self.file.id is None or not self.file.id.valid:
            return
        if pending:
            columns = {name: np.stack(buf) for name, buf in self._rows.items()}
            if self._behavior_width:
                nan = np.full(self._behavior_width, np.nan, np.float32)
                columns["behavior"] = np.stack(
                    [b if b is not None and b.shape == nan.shape else nan for b in self._behavior]
                )
            for name, values in columns.items():
                ds = self.file[name]
                start = ds.shape[0]
                ds.resize(start + pending, axis=0)
                ds[start:] = values
            for buf in self._rows.values():
                buf.clear()
            self._behavior.clear()
            self.file["committed"][0] = self.file["seq"].shape[0]
        if self._events:
            ds = self.file["trigger_events"]
            start = ds.shape[0]
            ds.resize(start + len(self._events), axis=0)
            ds[start:] = np.array(self._events, dtype=EVENT_DTYPE)
            self._events.clear()
        self.file.flush()

    def close(self) -> None:
        if self.file.id.valid:
            self.flush()
            if self._started:
                self.file["closed"][0] = 1
            self.file.close()


@dataclass
class Recording:
    """Everything one recording holds, arrays ``[T, ...]`` in frame order (see the module doc).

    ``truncated`` says why frames may be missing at the end (a crash), else None.
    """

    path: Path
    fps: float
    kind: str
    horizon: int
    arrays: dict[str, np.ndarray]
    behavior_names: tuple[str, ...] = ()
    behavior_pred_names: tuple[str, ...] = ()
    footprints: Footprints | None = None
    events: np.ndarray = field(default_factory=lambda: np.zeros(0, EVENT_DTYPE))
    truncated: str | None = None

    @property
    def n_frames(self) -> int:
        return int(self.arrays["seq"].shape[0])

    @property
    def n_neurons(self) -> int:
        return int(self.arrays["traces"].shape[1])


def _open(path: str) -> h5py.File:
    try:
        f = h5py.File(path, "r", libver="latest", swmr=True)
    except OSError as exc:
        raise DataError(
            f"cannot open as HDF5 ({exc}); a recording whose server died before its first "
            "frame holds nothing",
            path=path,
        ) from exc
    try:
        fmt = f.attrs.get("format")
    except (KeyError, OSError):  # an HDF5 file not written for SWMR reads broken this way
        f.close()
        with h5py.File(path, "r") as plain:
            fmt = plain.attrs.get("format")
    if fmt != FORMAT:
        f.close()
        raise DataError(f"is not a calm-rt recording (format attribute {fmt!r})", path=path)
    return f


def load_recording(path: str | os.PathLike[str]) -> Recording:
    """A whole recording, up to its last whole chunk.

    A recording that was not closed (the server crashed or was killed) keeps
    the frames up to its last flushed chunk; frames after it are gone, and a
    warning says so (:attr:`Recording.truncated` too).
    """
    p = str(path)
    with _open(p) as f:
        names = [n for n in _PER_FRAME if n in f]
        if "seq" not in f:
            raise DataError("holds no frames (the server stopped before the first one)", path=p)
        lengths = {n: f[n].shape[0] for n in names}
        whole = int(f["committed"][0]) if "committed" in f else min(lengths.values())
        whole = min(whole, *lengths.values())
        closed = bool(f["closed"][0]) if "closed" in f else None
        truncated = None
        if closed is False or max(lengths.values()) > whole:
            truncated = (
                f"{p}: the recording was not closed (the server crashed or was killed): "
                f"exporting its {whole} frames up to the last whole chunk; frames after that "
                "were lost"
            )
            warnings.warn(truncated, RuntimeWarning, stacklevel=2)
        arrays = {n: np.asarray(f[n][:whole]) for n in names}
        events = np.asarray(f["trigger_events"][:]) if "trigger_events" in f else None
        if events is None or events.dtype.names is None:
            events = np.zeros(0, EVENT_DTYPE)
        if whole:  # events of frames lost with the last partial chunk are lost too
            events = events[events["seq"] <= arrays["seq"][-1]]
        footprints = None
        if "rois" in f:
            g = f["rois"]
            shape = tuple(int(x) for x in f.attrs["roi_shape"])
            n_rois = g["indptr"].shape[0] - 1
            weights = sparse.csr_matrix(
                (g["data"][:], g["indices"][:], g["indptr"][:]),
                shape=(n_rois, shape[0] * shape[1]),
            )
            footprints = Footprints(
                weights,
                shape,
                tuple(s.decode() for s in g["names"][:]),  # type: ignore[arg-type]
                np.asarray(g["reference"]) if "reference" in g else None,
            )
        b_names = tuple(str(s) for s in f.attrs.get("behavior_pred_names", ()) if str(s))
        return Recording(
            path=Path(p), fps=float(f.attrs["fps"]), kind=str(f.attrs["kind"]),
            horizon=int(f.attrs["horizon"]), arrays=arrays, behavior_pred_names=b_names,
            footprints=footprints, events=events, truncated=truncated,
        )  # fmt: skip


def read_recording(path: str | os.PathLike[str]) -> Session:
    """A recording as a :class:`Session` (traces ``[N, T]``, its fps and kind)."""
    path = str(path)
    with _open(path) as f:
        if "traces" not in f:
            raise DataError("holds no frames (the server stopped before the first one)", path=path)
        n = f["traces"].shape[0]
        if "committed" in f:
            n = min(n, int(f["committed"][0]))
        traces = np.asarray(f["traces"][:n]).T
        neuropil = np.asarray(f["neuropil"][:n]).T if "neuropil" in f else None
        session = Session(
            traces=traces,
            fps=float(f.attrs["fps"]),
            kind=str(f.attrs["kind"]),  # type: ignore[arg-type]
            neuropil=neuropil,
            session_id=Path(path).stem,
            source=path,
        )
    return validate_session(session)
