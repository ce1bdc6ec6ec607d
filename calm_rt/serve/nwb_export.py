"""A live recording (:mod:`calm_rt.serve.recording`) written as NWB with pynwb.

``calm-rt export --nwb REC.h5 OUT.nwb`` calls :func:`export_nwb`. What goes
where (N neurons, T frames, H horizon)::

    general: Device "Microscope", ImagingPlane "ImagingPlane" (OpticalChannel), Subject
    processing/ophys
        ImageSegmentation/PlaneSegmentation   one row per neuron; pixel_mask from the
                                              recording's ROIs, else a 1x1 zero image_mask
        Fluorescence/RoiResponseSeries [T, N] raw fluorescence (kind "F"; DfOverF for "dff")
        Fluorescence/Neuropil [T, N]          when recorded
        DfOverF/NormalizedDfOverF [T, N]      the engine's causal dF/F, z-scored (forecast units)
        MotionShift [T, 2]                    (y, x) px, raw-frame sessions
        SummaryImages/reference               the image the ROIs were drawn on
    processing/behavior/BehavioralTimeSeries/measured_behavior [T, M]
    processing/calm_rt
        forecast, forecast_std [T, N, H]      and decoded_behavior [T, B]
        server_times [T, 2]                   arrival and publish time of each frame, s
        trigger_events (DynamicTable)         one row per trigger event

Every series shares the frames' timestamps: the scope's acquisition times
(``t_acq``), relative to the session start. Frames the server dropped were
never recorded, so they stay gaps in the timestamps; nothing is interpolated.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from calm_rt import __version__
from calm_rt.data import NWB_EXPORT_MODULE, NWB_EXPORT_NEUROPIL, NWB_EXPORT_SERIES
from calm_rt.errors import ConfigError, DataError
from calm_rt.serve.recording import Recording, load_recording

__all__ = ["METADATA_KEYS", "export_nwb", "read_metadata"]

# Metadata a user may give (``--metadata FILE`` or flags), with what each means.
METADATA_KEYS: dict[str, str] = {
    "session_description": "what the session was (free text)",
    "session_start_time": "ISO 8601 date-time with time zone (default: the first frame's time)",
    "session_id": "the session's id (default: the recording's file name)",
    "experimenter": "a name 'Last, First' or a list of them",
    "institution": "institution",
    "lab": "lab",
    "experiment_description": "the experiment (free text)",
    "keywords": "a list of words",
    "subject_id": "the animal's id",
    "species": "Latin binomial, e.g. 'Mus musculus'",
    "sex": "M, F, O or U (default U once any subject field is given)",
    "age": "ISO 8601 duration, e.g. 'P90D'",
    "indicator": "calcium indicator, e.g. 'GCaMP6s'",
    "location": "imaging location (for mice an Allen CCF term, e.g. 'VISp')",
    "excitation_lambda": "excitation wavelength in nm",
    "emission_lambda": "emission wavelength in nm",
    "device": "the microscope (free text)",
}
_SUBJECT = ("subject_id", "species", "sex", "age")
_UNITS = "a.u."


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Metadata from a JSON or TOML file (by its suffix); unknown keys are refused."""
    p = Path(path)
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the metadata file ({exc})") from exc
    try:
        meta = tomllib.loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
    except ValueError as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        kind = "TOML" if p.suffix.lower() == ".toml" else "JSON"
        raise ConfigError(f"{p}: not valid {kind} ({exc})") from exc
    if not isinstance(meta, dict):
        raise ConfigError(
            f"{p}: metadata must be a table of key = value, got {type(meta).__name__}"
        )
    _check_keys(meta, where=str(p))
    return meta


def _check_keys(meta: dict[str, Any], where: str) -> None:
    unknown = sorted(set(meta) - set(METADATA_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown metadata key {unknown[0]!r}"
            + (f" (and {unknown[1:]})" if unknown[1:] else "")
            + f"; known keys: {', '.join(METADATA_KEYS)}"
        )
    for key, value in meta.items():
        if key in ("experimenter", "keywords"):
            ok = isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            )
            want = "a string or a list of strings"
        elif key in ("excitation_lambda", "emission_lambda"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            want = "a wavelength in nm (a positive number)"
        elif key == "session_start_time":
            ok, want = isinstance(value, (str, datetime)), "an ISO 8601 date-time"
        else:
            ok = isinstance(value, str) or (key in ("subject_id", "session_id")
                                            and isinstance(value, int))  # fmt: skip
            want = "a string"
        if not ok:
            raise ConfigError(f"{where}: metadata {key!r} must be {want}, got {value!r}")
    if "sex" in meta and meta["sex"] not in ("M", "F", "O", "U"):
        raise ConfigError(f"{where}: metadata 'sex' must be M, F, O or U, got {meta['sex']!r}")
    if "age" in meta and not re.fullmatch(
        r"P(?=\d|T\d)[\dYMWD.]*(T[\dHMS.]+)?(/\S*)?", meta["age"]
    ):
        raise ConfigError(
            f"{where}: metadata 'age' {meta['age']!r} is not an ISO 8601 duration (e.g. P90D)"
        )
    for key in ("subject_id", "session_id"):
        if "/" in str(meta.get(key, "")):
            raise ConfigError(f"{where}: metadata {key!r} must not hold '/', got {meta[key]!r}")


def _start_time(value: Any) -> datetime:
    if isinstance(value, datetime):  # TOML has native date-times
        t = value
    else:
        try:
            t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError as exc:
            raise ConfigError(
                f"session_start_time {value!r} is not ISO 8601 (e.g. 2026-03-01T14:05:00+01:00)"
            ) from exc
    if t.tzinfo is None:
        raise ConfigError(
            f"session_start_time {value!r} has no time zone; add one (e.g. +00:00 or Z)"
        )
    return t


def _frame_times(rec: Recording) -> tuple[np.ndarray, str]:
    """Each frame's wall-clock time (Unix s) and which clock gave it."""
    t_acq = rec.arrays["t_acq"].astype(np.float64)
    if np.isfinite(t_acq).all():
        return t_acq, "the scope's acquisition times (t_acq)"
    return rec.arrays["t_arrival"].astype(np.float64), (
        "the server's arrival times (the scope sent no acquisition time for "
        f"{int((~np.isfinite(t_acq)).sum())} of the frames)"
    )


def export_nwb(
    recording: str | os.PathLike[str],
    out: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> tuple[Path, list[str]]:
    """Write the recording as an NWB file.

    Args:
        recording: the ``.h5`` a server recorded (a crashed one exports up to
            its last whole chunk, with a :class:`RuntimeWarning`).
        out: the ``.nwb`` to write (written beside, then moved into place).
        metadata: keys of :data:`METADATA_KEYS`.
        overwrite: replace an existing ``out``.

    Returns:
        The path written and notes for the user (defaults taken, what an NWB
        archive will still ask for).
    """
    with warnings.catch_warnings():
        # hdmf warns while the ROI table region is built before its table joins the file.
        warnings.filterwarnings("ignore", message=".*does not share an ancestor.*")
        return _export(recording, out, metadata, overwrite)


def _export(
    recording: str | os.PathLike[str],
    out: str | os.PathLike[str],
    metadata: dict[str, Any] | None,
    overwrite: bool,
) -> tuple[Path, list[str]]:
    from hdmf.backends.hdf5 import H5DataIO
    from hdmf.common import DynamicTable, VectorData
    from pynwb import NWBHDF5IO, NWBFile, TimeSeries
    from pynwb.base import Images
    from pynwb.behavior import BehavioralTimeSeries
    from pynwb.file import Subject
    from pynwb.image import GrayscaleImage
    from pynwb.ophys import (
        DfOverF,
        Fluorescence,
        ImageSegmentation,
        OpticalChannel,
        PlaneSegmentation,
        RoiResponseSeries,
    )

    meta = dict(metadata or {})
    _check_keys(meta, where="metadata")
    src, dst = Path(recording), Path(out)
    if not src.is_file():
        raise DataError("does not exist (expected a calm-rt recording, .h5)", path=str(src))
    if dst.exists() and not overwrite:
        raise DataError("exists already; pass --overwrite to replace it", path=str(dst))
    rec = load_recording(src)  # warns when the recording was not closed
    if rec.n_frames == 0:
        raise DataError("holds no whole frame to export (it crashed before its first flush)",
                        path=str(src))  # fmt: skip
    notes: list[str] = []
    times, clock = _frame_times(rec)
    wall_clock = times[0] > 1e9  # after 2001: Unix seconds, not a scope's own counter
    if "session_start_time" in meta:
        start = _start_time(meta["session_start_time"])
        if wall_clock and start.timestamp() > times[0] + 1e-3:
            raise ConfigError(
                f"session_start_time {start.isoformat()} is after the first frame "
                f"({datetime.fromtimestamp(times[0], timezone.utc).isoformat()}); "
                "give a start at or before it, or leave it out to use the first frame's time"
            )
        rel = times - start.timestamp() if wall_clock else times - times[0]
    elif wall_clock:
        start = datetime.fromtimestamp(times[0], timezone.utc)
        rel = times - times[0]
        notes.append(f"session_start_time: the first frame's time, {start.isoformat()}")
    else:
        start = datetime.fromtimestamp(src.stat().st_mtime, timezone.utc)
        rel = times - times[0]
        notes.append(
            "session_start_time: the recording stores no wall-clock time, so this is the "
            f"file's modification time {start.isoformat()} (about the recording's end)"
        )

    subject = None
    if any(k in meta for k in _SUBJECT):
        subject = Subject(
            subject_id=None if meta.get("subject_id") is None else str(meta["subject_id"]),
            species=meta.get("species"),
            sex=str(meta.get("sex", "U")),
            age=meta.get("age"),
            description="the animal imaged in this live session",
        )
    missing = [k for k in ("subject_id", "species", "age") if k not in meta]
    if missing:
        notes.append(f"missing for an NWB archive (nwbinspector flags it): {', '.join(missing)}")
    experimenter = meta.get("experimenter")
    if isinstance(experimenter, str):
        experimenter = [experimenter]
    keywords = meta.get("keywords")
    if isinstance(keywords, str):
        keywords = [keywords]
    default_desc = f"calm-rt live session recorded to {src.name}, {rec.n_neurons} neurons"
    nwb = NWBFile(
        session_description=str(meta.get("session_description", default_desc)),
        identifier=str(uuid.uuid4()),
        session_start_time=start,
        session_id=str(meta.get("session_id", src.stem)),
        experimenter=experimenter,
        institution=meta.get("institution"),
        lab=meta.get("lab"),
        experiment_description=meta.get("experiment_description"),
        keywords=keywords,
        subject=subject,
        source_script=f"calm-rt {__version__} export --nwb {src.name}",
        source_script_file_name="calm_rt/serve/nwb_export.py",
    )

    a = rec.arrays
    seq = a["seq"].astype(np.int64)
    gaps = int((np.diff(seq) - 1).clip(0).sum())
    step = np.diff(rel)
    regular = gaps == 0 and rec.n_frames > 2 and len(np.unique(np.round(step, 9))) == 1
    time_note = (
        f"Times are {clock}, s from the session start; {gaps} frame(s) the server dropped "
        "are gaps in them (never interpolated)."
    )
    fps = float(rec.fps)

    def big(x: np.ndarray) -> H5DataIO:
        return H5DataIO(np.ascontiguousarray(x), compression="gzip", compression_opts=4)

    first: list[TimeSeries] = []

    def when() -> dict[str, Any]:
        if first:
            return {"timestamps": first[0]}  # one stored copy, linked by the others
        if regular:
            return {"starting_time": float(rel[0]), "rate": 1.0 / float(step[0])}
        return {"timestamps": rel}

    def timed(series: TimeSeries) -> TimeSeries:
        if not first and not regular:
            first.append(series)
        return series

    device = nwb.create_device(
        name="Microscope", description=str(meta.get("device", "two-photon microscope"))
    )
    channel = OpticalChannel(
        name="OpticalChannel", description="the channel the traces were extracted from",
        emission_lambda=float(meta.get("emission_lambda", np.nan)),
    )  # fmt: skip
    plane = nwb.create_imaging_plane(
        name="ImagingPlane", optical_channel=channel, device=device,
        description="the imaged plane of the live session", imaging_rate=fps,
        excitation_lambda=float(meta.get("excitation_lambda", np.nan)),
        indicator=str(meta.get("indicator", "unknown")),
        location=str(meta.get("location", "unknown")),
    )  # fmt: skip

    ophys = nwb.create_processing_module("ophys", "calcium imaging traces as calm-rt saw them")
    fp = rec.footprints
    names = list(fp.names) if fp is not None else [f"neuron_{i}" for i in range(rec.n_neurons)]
    if fp is not None and len(fp) == rec.n_neurons:
        ps = PlaneSegmentation(
            name="PlaneSegmentation", imaging_plane=plane,
            description="the ROIs the server extracted traces with (weights as recorded)",
        )  # fmt: skip
        w = fp.weights.tocsr()
        width = fp.shape[1]
        for i in range(len(fp)):
            lo, hi = w.indptr[i], w.indptr[i + 1]
            pix = w.indices[lo:hi]
            ps.add_roi(pixel_mask=[(int(p % width), int(p // width), float(v))
                                   for p, v in zip(pix, w.data[lo:hi])])  # fmt: skip
        ps.add_column("roi_name", "ROI names as the server knew them", data=names)
        if fp.reference is not None:
            ophys.add(Images(
                name="SummaryImages", description="the image the ROIs were drawn on",
                images=[GrayscaleImage(name="reference", data=np.asarray(fp.reference),
                                       description="reference frame the ROIs are in")],
            ))  # fmt: skip
    else:
        ps = PlaneSegmentation(
            name="PlaneSegmentation", imaging_plane=plane,
            description=(
                "one row per neuron; the recording holds no ROI masks (the scope sent traces, "
                "not frames), so image_mask is a 1x1 zero placeholder, not a footprint"
            ),
            id=list(range(rec.n_neurons)),
            columns=[VectorData(name="image_mask", description="no mask recorded (1x1 zero)",
                                data=np.zeros((rec.n_neurons, 1, 1), np.float32)),
                     VectorData(name="roi_name", description="neuron names", data=names)],
        )  # fmt: skip
    segmentation = ImageSegmentation(name="ImageSegmentation")
    segmentation.add_plane_segmentation(ps)
    ophys.add(segmentation)
    rois = ps.create_roi_table_region(region=list(range(rec.n_neurons)), description="every neuron")

    main = timed(RoiResponseSeries(
        name=NWB_EXPORT_SERIES[0].rsplit("/", 1)[-1], data=big(a["traces"]), rois=rois,
        unit=_UNITS, **when(),
        description=f"{'dF/F' if rec.kind == 'dff' else 'raw fluorescence'} per neuron as the "
        f"server extracted or received it. {time_note}",
    ))  # fmt: skip
    fluor = Fluorescence(name="Fluorescence")
    dff = DfOverF(name="DfOverF")
    (dff if rec.kind == "dff" else fluor).add_roi_response_series(main)
    if "neuropil" in a:
        fluor.add_roi_response_series(RoiResponseSeries(
            name=NWB_EXPORT_NEUROPIL.rsplit("/", 1)[-1], data=big(a["neuropil"]), rois=rois,
            unit=_UNITS, description="neuropil fluorescence around each ROI", **when(),
        ))  # fmt: skip
    if np.isfinite(a["activity"]).any():
        dff.add_roi_response_series(RoiResponseSeries(
            name="NormalizedDfOverF", data=big(a["activity"]), rois=rois, unit="s.d.",
            description="the live engine's causal dF/F, z-scored with its running per-neuron "
            "statistics: the model's input and the forecasts' units", **when(),
        ))  # fmt: skip
    for container in (fluor, dff):
        if container.roi_response_series:
            ophys.add(container)
    if "shift" in a:
        ophys.add(TimeSeries(
            name="MotionShift", data=a["shift"], unit="pixels",
            description="rigid motion shift (y, x) applied to each raw frame", **when(),
        ))  # fmt: skip

    if "behavior" in a and np.isfinite(a["behavior"]).any():
        beh = nwb.create_processing_module("behavior", "behaviour the scope sent beside the frames")
        cols = rec.behavior_names or tuple(f"behavior_{i}" for i in range(a["behavior"].shape[1]))
        beh.add(BehavioralTimeSeries(name="BehavioralTimeSeries", time_series=TimeSeries(
            name="measured_behavior", data=a["behavior"], unit=_UNITS, **when(),
            description=f"columns {list(cols)}, in the units the scope sent; NaN rows: none sent",
        )))  # fmt: skip

    h = rec.horizon
    calm = nwb.create_processing_module(
        NWB_EXPORT_MODULE, f"what the calm-rt server answered for each frame (horizon {h} frames)"
    )
    server0 = times[0] - rel[0] if wall_clock else a["t_arrival"][0] - rel[0]
    std_meaning = "predictive s.d. of forecast (same units and indices)"
    calm.add(TimeSeries(
        name="forecast", data=big(a["forecast"]), unit="s.d.", **when(),
        description=f"forecast[t, i, h]: neuron i's normalised activity (ophys/DfOverF/"
        f"NormalizedDfOverF units) predicted at frame t for h + 1 frames later, h = 0..{h - 1} "
        f"at {fps:g} Hz; its s.d. is forecast_std",
        comments=json.dumps({"horizon_frames": h, "fps": fps}),
    ))  # fmt: skip
    calm.add(TimeSeries(
        name="forecast_std", data=big(a["forecast_std"]), unit="s.d.", **when(),
        description=std_meaning, comments=json.dumps({"horizon_frames": h, "fps": fps}),
    ))  # fmt: skip
    if "behavior_pred" in a:
        bnames = rec.behavior_pred_names or tuple(
            f"behavior_{i}" for i in range(a["behavior_pred"].shape[1])
        )
        calm.add(TimeSeries(
            name="decoded_behavior", data=a["behavior_pred"], unit=_UNITS, **when(),
            description=f"behaviour decoded from the model, columns {list(bnames)}, in the "
            "behaviour's own units",
        ))  # fmt: skip
    calm.add(TimeSeries(
        name="server_times", data=np.stack([a["t_arrival"], a["t_publish"]], 1) - server0,
        unit="seconds", **when(),
        description="per frame: when the server received it and when it published the "
        "answer, s from the session start (server clock)",
    ))  # fmt: skip
    ev = rec.events
    if len(ev):
        at = {int(s): i for i, s in enumerate(seq)}
        frame_time = np.array([rel[at[int(s)]] if int(s) in at else np.nan for s in ev["seq"]])
        columns = [
            VectorData(name=col, description=desc, data=data)
            for col, desc, data in (
                ("seq", "frame sequence number whose forecast fired", ev["seq"].astype(np.int64)),
                ("frame_time", "that frame's time, s from the session start", frame_time),
                ("publish_time", "when the event was published, s from the session start",
                 ev["t_publish"] - server0),
                ("rule", "the trigger rule", [r.decode() for r in ev["rule"]]),
                ("value", "the forecast value that crossed the threshold", ev["value"]),
                ("threshold", "the rule's threshold", ev["threshold"]),
                ("lead_frames", "frames ahead the crossing is forecast", ev["lead_frames"]),
            )
        ]  # fmt: skip
        table = DynamicTable(
            name="trigger_events", columns=columns, id=list(range(len(ev))),
            description="trigger events the server published: a rule's forecast crossed its "
            "threshold",
        )  # fmt: skip
        calm.add(table)

    tmp = dst.with_name(dst.stem + ".partial.nwb")
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        with NWBHDF5IO(str(tmp), "w") as io:
            io.write(nwb)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    if rec.truncated:
        notes.append(f"truncated: {rec.truncated}")
    return dst, notes
