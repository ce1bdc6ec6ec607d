"""The `Session` type and the `.npz` session file format of DESIGN.md.

A session is one recording: ``traces`` float32 ``[N, T]`` (N neurons, T
frames) at ``fps`` frames per second, optionally with behaviour ``[T, B]``,
neuropil ``[N, T]`` and identifiers. Every reader in calm-rt produces one and
runs it through :func:`validate_session`, so the rest of the code can rely on
the shapes and dtypes below.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from calm_rt.errors import DataError

__all__ = [
    "CalmDataWarning",
    "Session",
    "TraceKind",
    "drop_unusable_neurons",
    "read_npz",
    "validate_session",
    "write_npz",
]

TraceKind = Literal["F", "dff"]
_KINDS = ("F", "dff")


class CalmDataWarning(UserWarning):
    """Data was usable only after a documented change (e.g. dropped neurons)."""


@dataclass(frozen=True, eq=False)
class Session:
    """One recording of N neurons over T frames.

    Attributes:
        traces: ``[N, T]`` float32. Raw fluorescence when ``kind == "F"``,
            dF/F when ``kind == "dff"``. NaN marks a missing sample.
        fps: frame rate in Hz (> 0).
        behavior: ``[T, B]`` float32 behaviour aligned to the frames, or None.
        behavior_names: B names, one per behaviour column.
        kind: ``"F"`` or ``"dff"``.
        neuropil: ``[N, T]`` float32 neuropil fluorescence (for ``kind="F"``),
            or None.
        animal_id, session_id: identifiers; sessions of one animal share
            ``animal_id``. Used for held-out-animal splits.
        neuron_ids: N labels (ROI names, brain regions, simulator ids) or None.
        source: where the session was read from ("" if built in memory).
    """

    traces: np.ndarray
    fps: float
    behavior: np.ndarray | None = None
    behavior_names: tuple[str, ...] = ()
    kind: TraceKind = "F"
    neuropil: np.ndarray | None = None
    animal_id: str = ""
    session_id: str = ""
    neuron_ids: tuple[str, ...] | None = None
    source: str = field(default="", compare=False)

    @property
    def n_neurons(self) -> int:
        return int(self.traces.shape[0])

    @property
    def n_frames(self) -> int:
        return int(self.traces.shape[1])

    @property
    def duration_s(self) -> float:
        return self.n_frames / self.fps

    def summary(self) -> str:
        """One human-readable paragraph: sizes, rate, behaviour, ids."""
        beh = (
            f"behaviour {list(self.behavior_names)}"
            if self.behavior is not None
            else "no behaviour"
        )
        finite = np.isfinite(self.traces)
        return (
            f"session {self.session_id or '?'} (animal {self.animal_id or '?'}): "
            f"{self.n_neurons} neurons x {self.n_frames} frames at {self.fps:g} Hz "
            f"({self.duration_s:.1f} s), kind {self.kind}, {beh}, "
            f"neuropil {'yes' if self.neuropil is not None else 'no'}, "
            f"{(~finite).sum()} missing samples"
        )

    def select_neurons(self, keep: np.ndarray) -> Session:
        """A copy with only the neurons where ``keep`` (bool ``[N]`` or indices)."""
        keep = np.asarray(keep)
        ids = None
        if self.neuron_ids is not None:
            ids = tuple(str(x) for x in np.asarray(self.neuron_ids)[keep])
        return replace(
            self,
            traces=self.traces[keep],
            neuropil=None if self.neuropil is None else self.neuropil[keep],
            neuron_ids=ids,
        )

    def slice_frames(self, start: int, stop: int) -> Session:
        """A copy holding frames ``[start, stop)``."""
        return replace(
            self,
            traces=self.traces[:, start:stop],
            neuropil=None if self.neuropil is None else self.neuropil[:, start:stop],
            behavior=None if self.behavior is None else self.behavior[start:stop],
        )


def _as_float32(value: object, *, path: str, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise DataError(
            f"expected a numeric array, got dtype {arr.dtype}; store it as float32",
            path=path,
            field=name,
        )
    if arr.dtype.kind in "iu":
        raise DataError(
            f"expected floating point values, got integer dtype {arr.dtype}; "
            "convert to float32 before saving (integer traces usually mean raw "
            "pixel sums - divide by the ROI size first)",
            path=path,
            field=name,
        )
    if arr.ndim != ndim:
        raise DataError(f"expected {ndim} dimensions, got shape {arr.shape}", path=path, field=name)
    if np.isinf(arr).any():
        raise DataError(
            f"contains {int(np.isinf(arr).sum())} infinite values; use NaN for missing samples",
            path=path,
            field=name,
        )
    return np.ascontiguousarray(arr, dtype=np.float32)


def validate_session(session: Session) -> Session:
    """Check a session against the documented format; return it normalised.

    Arrays are converted to contiguous float32 (the only change made, and a
    lossless one for float32 input). Anything else that is wrong raises
    :class:`DataError` naming the file and the field.
    """
    path = session.source
    traces = _as_float32(session.traces, path=path, name="traces", ndim=2)
    n, t = traces.shape
    if n < 1 or t < 2:
        raise DataError(
            f"need at least 1 neuron and 2 frames, got shape {traces.shape} "
            "(traces are [neurons, frames])",
            path=path,
            field="traces",
        )
    try:
        fps = float(session.fps)
    except (TypeError, ValueError) as exc:
        raise DataError(f"must be a number, got {session.fps!r}", path=path, field="fps") from exc
    if not np.isfinite(fps) or fps <= 0:
        raise DataError(f"must be a positive frame rate in Hz, got {fps}", path=path, field="fps")
    if session.kind not in _KINDS:
        raise DataError(
            f"must be one of {_KINDS} (raw fluorescence or dF/F), got {session.kind!r}",
            path=path,
            field="kind",
        )
    behavior = None
    names: tuple[str, ...] = tuple(str(x) for x in session.behavior_names)
    if session.behavior is not None:
        behavior = _as_float32(session.behavior, path=path, name="behavior", ndim=2)
        if behavior.shape[0] != t:
            hint = (
                " (is it transposed? behaviour is [frames, variables])"
                if behavior.shape[1] == t
                else ""
            )
            raise DataError(
                f"has {behavior.shape[0]} rows but traces have {t} frames{hint}",
                path=path,
                field="behavior",
            )
        if not names:
            names = tuple(f"behavior_{i}" for i in range(behavior.shape[1]))
        if len(names) != behavior.shape[1]:
            raise DataError(
                f"has {len(names)} names for {behavior.shape[1]} behaviour columns",
                path=path,
                field="behavior_names",
            )
    elif names:
        raise DataError("names given but no behaviour array", path=path, field="behavior_names")
    neuropil = None
    if session.neuropil is not None:
        neuropil = _as_float32(session.neuropil, path=path, name="neuropil", ndim=2)
        if neuropil.shape != traces.shape:
            raise DataError(
                f"shape {neuropil.shape} differs from traces {traces.shape}",
                path=path,
                field="neuropil",
            )
    ids = None
    if session.neuron_ids is not None:
        ids = tuple(str(x) for x in session.neuron_ids)
        if len(ids) != n:
            raise DataError(f"has {len(ids)} labels for {n} neurons", path=path, field="neuron_ids")
    return replace(
        session,
        traces=traces,
        fps=fps,
        behavior=behavior,
        behavior_names=names,
        neuropil=neuropil,
        neuron_ids=ids,
        animal_id=str(session.animal_id),
        session_id=str(session.session_id),
    )


def drop_unusable_neurons(session: Session) -> Session:
    """Drop neurons that carry no signal, warning with their indices.

    A neuron is unusable when it has no finite sample, or its finite samples
    are all equal (a dead or empty ROI). Neurons with only some NaN samples are
    kept: the causal preprocessing masks missing samples.
    """
    traces = session.traces
    finite = np.isfinite(traces)
    any_finite = finite.any(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        spread = np.nanmax(np.where(finite, traces, np.nan), axis=1) - np.nanmin(
            np.where(finite, traces, np.nan), axis=1
        )
    constant = any_finite & ~(spread > 0)
    bad = ~any_finite | constant
    if not bad.any():
        return session
    if bad.all():
        raise DataError(
            "every neuron is all-NaN or constant; there is no signal to model",
            path=session.source,
            field="traces",
        )
    # Name neurons by their ids when they have them (suite2p ROI numbers,
    # region acronyms), else by their index in the session as read.
    labels = (
        list(session.neuron_ids)
        if session.neuron_ids is not None
        else list(range(session.n_neurons))
    )
    parts = []
    if (~any_finite).any():
        parts.append(f"all-NaN neurons {[labels[i] for i in np.flatnonzero(~any_finite)]}")
    if constant.any():
        parts.append(f"constant neurons {[labels[i] for i in np.flatnonzero(constant)]}")
    named_by = "neuron ids" if session.neuron_ids is not None else "indices in the file's order"
    warnings.warn(
        f"{session.source or 'session'}: dropped {int(bad.sum())} of {session.n_neurons} "
        f"neurons ({'; '.join(parts)}; named by {named_by})",
        CalmDataWarning,
        stacklevel=2,
    )
    return session.select_neurons(~bad)


def _scalar_str(value: np.ndarray, *, path: str, name: str) -> str:
    if value.dtype.kind not in "US" or value.size != 1:
        raise DataError(
            f"expected a single string, got {value.dtype} {value.shape}", path=path, field=name
        )
    return str(value.reshape(()).item())


def read_npz(path: str | os.PathLike[str]) -> Session:
    """Read a session ``.npz`` (DESIGN.md format). Never unpickles."""
    path = str(path)
    data: dict[str, np.ndarray] | None = None
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded as z:
                data = {k: z[k] for k in z.files}
    except ValueError as exc:
        # np.load falls back to unpickling any file that is neither a zip nor
        # .npy, so a "pickle" error on a non-zip file means a corrupt or
        # foreign file, not a pickled array.
        if "pickle" in str(exc).lower() and zipfile.is_zipfile(path):
            raise DataError(
                "holds pickled objects; session files must hold plain arrays "
                "(store strings as numpy unicode arrays)",
                path=path,
            ) from exc
        raise DataError(
            f"is not a readable .npz file ({exc}); is it truncated or of another format?",
            path=path,
        ) from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"is not a readable .npz file ({exc}); is it truncated or of another format?",
            path=path,
        ) from exc
    if data is None:
        raise DataError(
            "holds a single .npy array, not an .npz archive of named arrays; "
            "write sessions with np.savez or calm_rt.data.write_npz",
            path=path,
        )
    for required in ("traces", "fps"):
        if required not in data:
            raise DataError(
                f"missing; a session file needs 'traces' [N, T] and 'fps' (has {sorted(data)})",
                path=path,
                field=required,
            )
    fps_arr = data["fps"]
    if fps_arr.size != 1 or fps_arr.dtype.kind not in "fiu":
        raise DataError(
            f"must be one number, got {fps_arr.dtype} {fps_arr.shape}", path=path, field="fps"
        )
    names: tuple[str, ...] = ()
    if "behavior_names" in data:
        bn = data["behavior_names"]
        if bn.dtype.kind not in "US":
            raise DataError(f"must be strings, got {bn.dtype}", path=path, field="behavior_names")
        names = tuple(str(x) for x in bn.reshape(-1))
    ids = None
    if "neuron_ids" in data:
        ids = tuple(str(x) for x in data["neuron_ids"].reshape(-1))
    session = Session(
        traces=data["traces"],
        fps=float(fps_arr.reshape(())),
        behavior=data.get("behavior"),
        behavior_names=names,
        kind=_scalar_str(data["kind"], path=path, name="kind") if "kind" in data else "F",  # type: ignore[arg-type]
        neuropil=data.get("neuropil"),
        animal_id=_scalar_str(data["animal_id"], path=path, name="animal_id")
        if "animal_id" in data
        else "",
        session_id=_scalar_str(data["session_id"], path=path, name="session_id")
        if "session_id" in data
        else Path(path).stem,
        neuron_ids=ids,
        source=path,
    )
    return validate_session(session)


def write_npz(path: str | os.PathLike[str], session: Session) -> Path:
    """Write a session as ``.npz`` (uncompressed, no pickles); returns the path."""
    session = validate_session(session)
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "traces": session.traces,
        "fps": np.float64(session.fps),
        "kind": np.str_(session.kind),
        "animal_id": np.str_(session.animal_id),
        "session_id": np.str_(session.session_id),
    }
    if session.behavior is not None:
        arrays["behavior"] = session.behavior
        arrays["behavior_names"] = np.array(session.behavior_names, dtype=np.str_)
    if session.neuropil is not None:
        arrays["neuropil"] = session.neuropil
    if session.neuron_ids is not None:
        arrays["neuron_ids"] = np.array(session.neuron_ids, dtype=np.str_)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written session
    return path
