"""One recording session at the rig, and how it is set up.

A frame's way through a session is one straight line (:meth:`LiveSession.process`)::

    message --traces (extract when it is a raw frame)--> engine step
            --> triggers --> output messages (forecast, behavior, trigger)
                        `--> recording (beside, when recording)

Everything a session needs is built once, before its first frame is
answered, by :class:`SessionSetup`: from ROIs given up front (at start), from
the first ``traces`` message (the neuron count), or by segmenting the first
seconds of raw frames when no ROIs were given.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from calm_rt.errors import ConfigError, DataError, ProtocolError
from calm_rt.extract import (
    AutoSegmenter,
    Footprints,
    RoiExtractor,
    SegmentConfig,
    VolumeRois,
    load_volume_rois,
)
from calm_rt.live import EngineConfig, Prediction, StreamingEngine, TriggerSet
from calm_rt.model import CalM
from calm_rt.serve.config import ServiceConfig
from calm_rt.serve.recording import Recorder
from calm_rt.serve.volumes import CompletedVolume, VolumeAssembler, plane_of
from calm_rt.wire import Message, encode

__all__ = ["Answer", "LiveSession", "SessionSetup"]

log = logging.getLogger("calm_rt.serve")


@dataclass
class Answer:
    """What one frame produced: the encoded messages to publish and what to count."""

    messages: list[list[Any]] = field(default_factory=list)  # multipart messages, in order
    answered: int = 1  # frames (volumes) answered: 0 for a plane that completed no volume
    lost: int = 0  # frames the scope's sequence numbers say never arrived
    triggers: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage (serve.stages)
    record: Callable[[], None] | None = None  # the recording's append, run after publishing


class LiveSession:
    """The extractor (raw frames), the engine, the triggers and the recorder of one session.

    Args:
        model: the CalM model the engine runs.
        config: the service's configuration (frame rate, kind, horizon).
        n_neurons: neurons of the session (ROIs, or values per ``traces`` message).
        extractor: for raw frames (a :class:`VolumeAssembler` for a multi-plane
            stream); None when the scope sends traces.
        triggers: the server's rules, validated here against ``n_neurons``.
        rois_source: where the ROIs came from (for status).
        with_neuropil: whether neuropil traces arrive (recorded when they do).
        footprints: the ROIs of a raw-frame session (stored in recordings of
            one plane).
    """

    def __init__(
        self,
        model: CalM,
        config: ServiceConfig,
        n_neurons: int,
        extractor: RoiExtractor | VolumeAssembler | None,
        triggers: TriggerSet,
        rois_source: str | None,
        with_neuropil: bool,
        footprints: Footprints | VolumeRois | None = None,
    ) -> None:
        self.model = model
        self.footprints = footprints
        self.config = config
        self.extractor = extractor
        self.rois_source = rois_source
        self.with_neuropil = with_neuropil
        self.engine = StreamingEngine(
            model,
            EngineConfig(
                n_neurons=n_neurons,
                fps=config.fps,
                kind=config.kind,
                horizon=config.horizon,
                device=config.device,
                compile=config.compile,
                dtype=config.dtype,
            ),
        )
        triggers.bind(n_neurons)  # rules given before the session now meet its neurons
        self.triggers = triggers
        self.recorder: Recorder | None = None
        self._last_plane_seq: int | None = None  # multi-plane: the scope's last frame number
        self._planes_dropped = 0  # multi-plane: planes the server dropped since the last volume

    @property
    def n_neurons(self) -> int:
        return self.engine.n

    def warm_up(self) -> None:
        """Touch every per-frame code path before the first real frame (then forget it)."""
        rng = np.random.default_rng(0)
        n = self.n_neurons
        for t in range(2 * self.model.config.context_frames):
            traces = (100 + rng.random(n)).astype(np.float32)
            self.engine.step(traces, seq=t, neuropil=0.5 * traces if self.with_neuropil else None)
        self.engine.reset()
        if isinstance(self.extractor, VolumeAssembler):
            self.extractor.warm_up()
        elif self.extractor is not None:
            self.extractor.extract(np.zeros(self.extractor.shape, self.extractor.dtype))

    # -- recording --------------------------------------------------------------

    def start_recording(self, path: Path) -> None:
        if self.recorder is not None:
            raise ConfigError(f"already recording to {self.recorder.path}; stop_recording first")
        self.recorder = Recorder(
            path, self.n_neurons, self.config.fps, self.engine.horizon, self.config.kind,
            len(self.model.config.behavior_names), self.with_neuropil,
            # A multi-plane recording keeps traces and forecasts, not the planes' ROIs.
            footprints=self.footprints if isinstance(self.extractor, RoiExtractor) else None,
            behavior_pred_names=self.behavior_names,
        )  # fmt: skip

    def stop_recording(self) -> Path | None:
        """Close the recording (flushing every frame); returns its path."""
        if self.recorder is None:
            return None
        path = self.recorder.path
        self.recorder.close()
        self.recorder = None
        return path

    def close(self) -> None:
        self.stop_recording()

    # -- a frame's way ----------------------------------------------------------

    def process(self, msg: Message, dropped_before: int = 0) -> Answer:
        """Answer one frame; ``dropped_before``: older frames the server dropped unanswered."""
        if isinstance(self.extractor, VolumeAssembler):
            return self._process_plane(msg, dropped_before)
        t0 = time.perf_counter()
        traces, neuropil, flags, shift = self._traces(msg)
        t1 = time.perf_counter()
        expected = self.engine.expected_seq
        # Frames we dropped for being behind are skipped, not filled: filling costs a
        # model step each, and would keep an overloaded server behind for good.
        answer = self._step(
            msg.seq, msg.header, traces, neuropil, msg.arrays.get("behavior"), flags, shift,
            fill=dropped_before == 0, dropped_before=dropped_before,
        )  # fmt: skip
        # The scope's own gaps: the model's gap less our drops (none before a first frame).
        answer.lost = max(0, answer.lost - dropped_before) if expected is not None else 0
        answer.timings_ms = {"extract": (t1 - t0) * 1e3, **answer.timings_ms}
        return answer

    def _process_plane(self, msg: Message, dropped_before: int) -> Answer:
        """One plane of a multi-plane stream: extracted now, answered with its volume."""
        assert isinstance(self.extractor, VolumeAssembler)
        t0 = time.perf_counter()
        volumes = self.extractor.add(msg)  # raises, changing nothing, on a bad plane
        answer = Answer(answered=0, timings_ms={"extract": (time.perf_counter() - t0) * 1e3})
        # Lost = gaps in the scope's frame numbers (planes), less what we dropped ourselves.
        if self._last_plane_seq is not None:
            answer.lost = max(0, msg.seq - self._last_plane_seq - 1 - dropped_before)
        self._last_plane_seq = max(msg.seq, self._last_plane_seq or 0)
        self._planes_dropped += dropped_before
        for vol in volumes:
            part = self._step_volume(vol)
            answer.answered += 1
            answer.messages += part.messages
            answer.triggers += part.triggers
            answer.timings_ms.update(part.timings_ms)
            answer.record = _chain(answer.record, part.record)
        return answer

    def _step_volume(self, vol: CompletedVolume) -> Answer:
        assert isinstance(self.extractor, VolumeAssembler) and vol.last is not None
        flags: dict[str, Any] = {
            "volume": vol.volume,
            "planes": self.extractor.n_planes,
            "planes_missing": list(vol.missing_planes),
            "shifts": vol.shifts,
        }
        if vol.frame_flags:
            flags["frame_flags"] = {str(k): v for k, v in vol.frame_flags.items()}
        dropped, self._planes_dropped = self._planes_dropped, 0
        # The header's ``skipped`` counts volumes (the model's gap); our drops were planes.
        answer = self._step(
            vol.volume, vol.last.header, vol.traces, vol.neuropil, vol.behavior, flags, None,
            fill=dropped == 0, dropped_before=0,
        )  # fmt: skip
        answer.lost = 0  # counted per plane in _process_plane
        return answer

    def _step(
        self,
        seq: int,
        header: dict[str, Any],
        traces: np.ndarray,
        neuropil: np.ndarray | None,
        behavior: np.ndarray | None,
        flags: dict[str, Any],
        shift: tuple[float, float] | None,
        fill: bool,
        dropped_before: int,
    ) -> Answer:
        """One engine step and its messages (``answer.lost``: the model's whole gap, frames).

        ``fill``: fill a gap of lost frames exactly (else skip it cheaply);
        ``dropped_before``: frames the server itself dropped, for the header.
        """
        pred = self.engine.step(traces, seq=seq, neuropil=neuropil, behavior=behavior, fill=fill)
        t2 = time.perf_counter()
        answer = Answer(lost=pred.filled + pred.skipped)
        head = self._header(seq, header, pred, flags, dropped_before)
        answer.messages.append(
            encode("forecast", head, {"forecast": pred.forecast, "forecast_std": pred.forecast_std,
                                      "activity": pred.activity})
        )  # fmt: skip
        if pred.behavior is not None:
            names = list(self.behavior_names)
            answer.messages.append(
                encode("behavior", {**head, "names": names}, {"behavior": pred.behavior})
            )
        for event in self.triggers.evaluate(pred.forecast, self.config.fps, seq, time.time()):
            answer.triggers += 1
            if self.recorder is not None:
                self.recorder.add_trigger(
                    event.seq, time.time(), event.rule, event.value, event.threshold,
                    event.lead_frames,
                )  # fmt: skip
            answer.messages.append(
                encode("trigger", {**head, "rule": event.rule, "value": event.value,
                                   "threshold": event.threshold, "lead_frames": event.lead_frames})
            )  # fmt: skip
        if self.recorder is not None:
            answer.record = partial(
                self._record, seq, header, behavior, traces, neuropil, pred, shift
            )
        engine_ms = {k: v for k, v in pred.timings_ms.items() if k != "total"}
        # The engine's stages are this frame's step (steps that filled a gap come before it).
        answer.timings_ms = {**engine_ms, "encode": (time.perf_counter() - t2) * 1e3}
        return answer

    @property
    def behavior_names(self) -> tuple[str, ...]:
        """Names of the decoded variables: the calibrated readout's, else the head's."""
        if self.engine.readout is not None and self.engine.calibration is not None:
            return self.engine.calibration.names
        return tuple(self.model.config.behavior_names)

    def _traces(
        self, msg: Message
    ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any], tuple[float, float]]:
        """The frame's ``[N]`` traces and neuropil (extracted from pixels for a raw frame).

        Also the header flags of a raw frame, and the motion shift ``(y, x)``
        in pixels applied to it (0 for traces).
        """
        if msg.topic == "frame":
            image = msg.arrays.get("image")
            if image is None:
                raise ProtocolError(
                    "a 'frame' message carries its pixels in a buffer named 'image'"
                )
            if self.extractor is None:
                raise DataError("this session receives traces, not raw frames (set ROIs to switch)")
            where = plane_of(msg)
            if where is not None and where[0] != 0:
                raise DataError(
                    f"a frame of plane {where[0]}, but this session has ROIs for one plane: "
                    "for a multi-plane stream start the server with --rois a folder of "
                    "plane0, plane1, ... (docs/protocol.md, multi-plane streams)"
                )
            traces, neuropil, frame_flags = self.extractor.extract(image)
            shift = (frame_flags.shift_y, frame_flags.shift_x)
            flags: dict[str, Any] = {"frame_flags": frame_flags.__dict__} if frame_flags.any else {}
            # Where the ROIs sit on this raw frame (a live view draws them there): the
            # reference position plus the shift (docs/protocol.md).
            flags["shift"] = [round(float(shift[0]), 3), round(float(shift[1]), 3)]
            return traces, neuropil, flags, shift
        traces = msg.arrays.get("traces")
        if traces is None or traces.ndim != 1:
            raise ProtocolError("a 'traces' message carries a 1-D buffer named 'traces'")
        return traces, msg.arrays.get("neuropil"), {}, (0.0, 0.0)

    def _header(
        self,
        seq: int,
        header: dict[str, Any],
        pred: Prediction,
        flags: dict[str, Any],
        dropped_before: int,
    ) -> dict[str, Any]:
        head = {
            "seq": seq,
            "t_acq": header.get("t_acq"),
            "t_arrival": header["t_arrival"],
            "frame": pred.frame,
            "fps": self.config.fps,
            "neurons": int(pred.forecast.shape[0]),
            "horizon": int(pred.forecast.shape[1]),
            "filled": pred.filled,
            # The model's gap includes our own drops, except before the session's first
            # answer (no gap without a previous frame): those still count for the rig.
            "skipped": max(pred.skipped, dropped_before),
            "reset": pred.reset,
            "missing": int(pred.missing.sum()),
            "compute_ms": round(pred.timings_ms["total"], 3),
            **flags,
        }
        return {k: v for k, v in head.items() if v is not None}

    def _record(
        self,
        seq: int,
        header: dict[str, Any],
        behavior: np.ndarray | None,
        traces: np.ndarray,
        neuropil: np.ndarray | None,
        pred: Prediction,
        shift: tuple[float, float] | None,
    ) -> None:
        assert self.recorder is not None
        row: dict[str, Any] = dict(
            traces=np.asarray(traces, np.float32),
            activity=pred.activity,
            seq=seq,
            t_acq=float(header.get("t_acq", math.nan)),
            t_arrival=header["t_arrival"],
            t_publish=time.time(),
            forecast=pred.forecast,
            forecast_std=pred.forecast_std,
        )
        if "neuropil" in self.recorder.fields:
            row["neuropil"] = np.asarray(neuropil, np.float32)
        if "behavior_pred" in self.recorder.fields:
            row["behavior_pred"] = pred.behavior
        if "shift" in self.recorder.fields:
            row["shift"] = np.asarray(shift, np.float32)
        self.recorder.append(behavior=behavior, **row)


class SessionSetup:
    """Builds the next :class:`LiveSession`, once, before its first frame is answered.

    Args:
        model: the model sessions run.
        config: the service's configuration.
        triggers: the server's rules (bound to the session's neurons).
        rois: ROIs for raw frames (:class:`VolumeRois` for a multi-plane
            stream), or None (the first traces tell the neuron
            count; raw frames are then segmented when ``config.auto_segment``).
        rois_source: where ``rois`` came from (for status).
        record: a recording to start with the session.
    """

    def __init__(
        self,
        model: CalM,
        config: ServiceConfig,
        triggers: TriggerSet,
        rois: Footprints | VolumeRois | None,
        rois_source: str | None,
        record: Path | None = None,
    ) -> None:
        self.model, self.config, self.triggers = model, config, triggers
        self.rois, self.rois_source = rois, rois_source
        self.record = record
        self.segmenter: AutoSegmenter | None = None
        self.segmenting = 0  # frames used to find ROIs (not answered)

    @classmethod
    def from_config(cls, model: CalM, config: ServiceConfig, triggers: TriggerSet) -> SessionSetup:
        rois = load_volume_rois(config.rois) if config.rois is not None else None
        source = str(config.rois) if config.rois is not None else None
        return cls(model, config, triggers, rois, source, config.record)

    def build_now(self) -> LiveSession | None:
        """The session, when the ROIs already say what it is (built and warmed); else None."""
        if self.rois is None:
            return None
        session = self._build(self.rois.n_rois, _extractor(self.rois), True)
        session.warm_up()
        return session

    def warm_up_model(self) -> None:
        """Warm the model's per-frame path on a throwaway engine (the session is not known yet).

        With ``compile`` this is where the step compiles: its graphs serve the
        session's engine of any size, so the first frame does not wait for it.
        """
        engine = StreamingEngine(
            self.model,
            EngineConfig(
                n_neurons=8, fps=self.config.fps, kind=self.config.kind,
                device=self.config.device, compile=self.config.compile,
                dtype=self.config.dtype,
            ),
        )  # fmt: skip
        rng = np.random.default_rng(0)
        for t in range(2 * self.model.config.context_frames):
            traces = (100 + rng.random(8)).astype(np.float32)
            engine.step(traces, seq=t, neuropil=0.5 * traces)

    def feed(self, msg: Message) -> tuple[LiveSession | None, bool]:
        """Learn the session from an early message.

        Returns the session once it is known (else None), and whether ``msg``
        is still to be answered by it (not when it was a frame the
        segmentation learned from).
        """
        if msg.topic == "traces":
            traces = msg.arrays.get("traces")
            if traces is None or traces.ndim != 1 or traces.size < 1:
                raise ProtocolError("a 'traces' message carries a 1-D buffer named 'traces'")
            return self._build(traces.shape[0], None, msg.arrays.get("neuropil") is not None), True
        image = msg.arrays.get("image")
        if image is None:
            raise ProtocolError("a 'frame' message carries its pixels in a buffer named 'image'")
        if self.rois is not None:
            return self._build(self.rois.n_rois, _extractor(self.rois), True), True
        if plane_of(msg) is not None:
            raise DataError(
                "a multi-plane stream needs ROIs per plane (automatic segmentation works on "
                "one plane): start the server with --rois a folder of plane0, plane1, ..."
            )
        return self._segment(image), False

    def _segment(self, image: np.ndarray) -> LiveSession | None:
        """No ROIs given: learn them from the first frames of the stream (not answered meanwhile)."""
        if not self.config.auto_segment:
            raise DataError("raw frames need ROIs: start the server with --rois (or send 'traces')")
        if self.segmenter is None:
            if image.ndim != 2:
                raise DataError(f"a frame is an [H, W] image, got shape {image.shape}")
            self.segmenter = AutoSegmenter(
                image.shape, SegmentConfig(frames=self.config.segment_frames)
            )
            log.info("no ROIs given: segmenting the first %d frames", self.segmenter.config.frames)
        self.segmenting += 1
        if not self.segmenter.push(image):
            return None
        found = self.segmenter.result()
        self.segmenter = None
        if found.footprints is None:
            raise DataError(
                f"no cells found in the first {found.frames} frames; give ROIs with --rois"
            )
        log.info("found %d cells", found.footprints.n_rois)
        self.rois = found.footprints
        self.rois_source = f"automatic segmentation of the first {found.frames} frames"
        extractor = RoiExtractor(found.footprints, motion=found.motion or False)
        return self._build(found.footprints.n_rois, extractor, True)

    def _build(self, n: int, extractor: RoiExtractor | None, with_neuropil: bool) -> LiveSession:
        session = LiveSession(
            self.model, self.config, n, extractor, self.triggers, self.rois_source, with_neuropil,
            footprints=self.rois,
        )  # fmt: skip
        if self.config.device != "cpu":
            # On a GPU the kernels autotune for this neuron count on first use:
            # do it here, on throwaway frames, not on the first answered one.
            session.warm_up()
        if self.record is not None:
            session.start_recording(self.record)
        return session


def _extractor(rois: Footprints | VolumeRois) -> RoiExtractor | VolumeAssembler:
    """Raw frames to traces: one plane's extractor, or every plane's for a volume."""
    if isinstance(rois, VolumeRois):
        return VolumeAssembler(rois, motion=True)
    return RoiExtractor(rois, motion=True)


def _chain(
    first: Callable[[], None] | None, then: Callable[[], None] | None
) -> Callable[[], None] | None:
    """Both recording appends, in order (a plane can complete two volumes)."""
    if first is None or then is None:
        return first or then

    def both() -> None:
        first()
        then()

    return both
