"""Lossless recording of a live session to HDF5, appended frame by frame.

The file is written in HDF5's single-writer/multiple-reader (SWMR) mode and
flushed after every chunk of frames, so a reader can follow it live and a
crash (even SIGKILL) loses at most the frames since the last flush. It reads
back as a session with :func:`read_recording` (also through
:func:`calm_rt.data.load_session`).

Layout (T grows; N neurons, H horizon, B behaviour variables)::

    /traces [T, N] float32       raw fluorescence as extracted (or received)
    /neuropil [T, N] float32     when extracted from frames
    /seq [T] int64, /t_acq [T], /t_arrival [T], /t_publish [T] float64
    /forecast [T, N, H] float32, /forecast_std [T, N, H] float32
    /behavior_pred [T, B] float32 (when the model decodes behaviour)
    attrs: format="calm-rt-recording", version=1, fps, kind, neurons, horizon
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from calm_rt.data import Session, validate_session
from calm_rt.errors import DataError

__all__ = ["Recorder", "read_recording"]

FORMAT = "calm-rt-recording"


class Recorder:
    """Append per-frame inputs and outputs to an HDF5 file (SWMR, chunked)."""

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
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.chunk = int(chunk_frames)
        self.file = h5py.File(self.path, "w", libver="latest")
        f = self.file
        f.attrs.update(
            format=FORMAT, version=1, fps=float(fps), kind=kind, neurons=n_neurons, horizon=horizon
        )
        n, h = n_neurons, horizon

        def make(name: str, shape: tuple[int, ...], dtype: str) -> None:
            f.create_dataset(
                name,
                shape=(0, *shape),
                maxshape=(None, *shape),
                chunks=(self.chunk, *shape),
                dtype=dtype,
            )

        make("traces", (n,), "f4")
        if with_neuropil:
            make("neuropil", (n,), "f4")
        for name in ("t_acq", "t_arrival", "t_publish"):
            make(name, (), "f8")
        make("seq", (), "i8")
        make("forecast", (n, h), "f4")
        make("forecast_std", (n, h), "f4")
        if n_behavior:
            make("behavior_pred", (n_behavior,), "f4")
        f.swmr_mode = True  # from here on readers may follow and a crash keeps flushed data
        self._rows: dict[str, list[np.ndarray]] = {k: [] for k in f.keys()}
        self.frames = 0

    @property
    def fields(self) -> frozenset[str]:
        """The datasets every row must fill (``neuropil`` and ``behavior_pred`` when recorded)."""
        return frozenset(self._rows)

    def append(self, **row: np.ndarray | float | int) -> None:
        """Add one frame; ``row`` has a value for every dataset of the file."""
        missing = [name for name in self._rows if name not in row]
        if missing:  # checked before anything is appended: a row is all or nothing
            raise DataError(f"recording row lacks {missing}", path=str(self.path))
        for name, buf in self._rows.items():
            buf.append(np.asarray(row[name]))
        self.frames += 1
        if len(self._rows["seq"]) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        """Write buffered frames and flush them to disk."""
        pending = len(self._rows["seq"])
        if not pending or self.file.id is None or not self.file.id.valid:
            return
        for name, buf in self._rows.items():
            ds = self.file[name]
            start = ds.shape[0]
            ds.resize(start + pending, axis=0)
            ds[start:] = np.stack(buf)
            buf.clear()
        self.file.flush()

    def close(self) -> None:
        if self.file.id.valid:
            self.flush()
            self.file.close()


def read_recording(path: str | os.PathLike[str]) -> Session:
    """A recording as a :class:`Session` (traces ``[N, T]``, its fps and kind)."""
    path = str(path)
    try:
        f = h5py.File(path, "r", libver="latest", swmr=True)
    except OSError as exc:
        raise DataError(f"cannot open as HDF5 ({exc})", path=path) from exc
    with f:
        if f.attrs.get("format") != FORMAT:
            raise DataError(
                f"is not a calm-rt recording (format attribute {f.attrs.get('format')!r})",
                path=path,
            )
        traces = np.asarray(f["traces"]).T
        neuropil = np.asarray(f["neuropil"]).T if "neuropil" in f else None
        session = Session(
            traces=traces,
            fps=float(f.attrs["fps"]),
            kind=str(f.attrs["kind"]),  # type: ignore[arg-type]
            neuropil=neuropil,
            session_id=Path(path).stem,
            source=path,
        )
    return validate_session(session)
