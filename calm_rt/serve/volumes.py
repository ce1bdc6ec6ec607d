"""Multi-plane streams: plane frames assembled into volumes, one engine step per volume.

A scope that images K planes sends every plane as a ``frame`` message whose
header carries ``plane`` (0 .. K-1) and ``volume`` (the volume's sequence
number; docs/protocol.md). The neurons of all planes are one population
(:class:`~calm_rt.extract.VolumeRois`: plane 0's ROIs first), and the model
steps once per volume, so its frame rate is the volume rate::

    plane frame --RoiExtractor of its plane (own ROIs, own motion correction)--> its slice of [N]
    volume complete (its last plane arrived, or a later volume began) --> one engine step

A plane that never arrives is missing neurons for that volume (NaN: the
engine masks them), never a wait: a volume whose last plane is lost is
answered as soon as a plane of a later volume arrives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from calm_rt.errors import DataError, ProtocolError
from calm_rt.extract import RoiExtractor, VolumeRois
from calm_rt.wire import Message

__all__ = ["CompletedVolume", "VolumeAssembler", "plane_of"]


def plane_of(msg: Message) -> tuple[int, int] | None:
    """``(plane, volume)`` of a plane frame; None for a frame of a single-plane stream."""
    if "plane" not in msg.header:
        return None
    return int(msg.header["plane"]), int(msg.header["volume"])


@dataclass
class CompletedVolume:
    """One volume: assembled plane by plane, then handed to the engine.

    Attributes:
        volume: its sequence number (the engine's frame number).
        traces, neuropil: ``[N]`` float32 over all planes; NaN for the
            neurons of planes that did not arrive.
        shifts: per plane, the motion shift ``[dy, dx]`` applied (None for
            a missing plane).
        frame_flags: per plane that had a problem, its flags (FrameFlags).
        last: the last plane message of the volume that arrived: its
            acquisition and arrival times are the volume's.
        behavior: the last behaviour sample sent with one of its planes.
    """

    volume: int
    traces: np.ndarray
    neuropil: np.ndarray
    shifts: list[list[float] | None]
    frame_flags: dict[int, dict] = field(default_factory=dict)
    last: Message | None = None
    behavior: np.ndarray | None = None

    @property
    def missing_planes(self) -> tuple[int, ...]:
        """The planes that did not arrive."""
        return tuple(k for k, s in enumerate(self.shifts) if s is None)


class VolumeAssembler:
    """Extracts each plane as it arrives and hands out volumes as they complete.

    Args:
        rois: one :class:`~calm_rt.extract.Footprints` per plane.
        motion: motion-correct each plane (to its own reference).
    """

    def __init__(self, rois: VolumeRois, motion: bool = True) -> None:
        self.rois = rois
        self.extractors = [RoiExtractor(fp, motion=motion) for fp in rois.planes]
        self.offsets = rois.offsets
        self.n_planes = rois.n_planes
        self._open: CompletedVolume | None = None
        self._answered: int | None = None  # the last volume handed out

    def warm_up(self) -> None:
        """Touch every plane's extraction path (a blank frame changes no motion state)."""
        for ex in self.extractors:
            ex.extract(np.zeros(ex.shape, ex.dtype))

    def add(self, msg: Message) -> list[CompletedVolume]:
        """Take one plane frame; returns the volumes it completes (none, one or two).

        Raises:
            ProtocolError: a frame without plane fields, a plane out of range,
                a plane of a volume already answered (late or repeated), or one
                sent twice. The volume being assembled is left as it was.
            DataError: the image does not fit its plane's ROIs.
        """
        where = plane_of(msg)
        if where is None:
            raise ProtocolError(
                f"this session has ROIs for {self.n_planes} planes: every 'frame' needs "
                "'plane' and 'volume' header fields (docs/protocol.md)"
            )
        plane, volume = where
        if plane >= self.n_planes:
            raise ProtocolError(
                f"plane {plane} is out of range: this session has ROIs for planes "
                f"0..{self.n_planes - 1}"
            )
        if self._answered is not None and volume <= self._answered:
            raise ProtocolError(
                f"plane {plane} of volume {volume} came after volume {self._answered} was "
                "answered (late or repeated); dropped"
            )
        opened = self._open
        if opened is not None and volume == opened.volume and opened.shifts[plane] is not None:
            raise ProtocolError(f"plane {plane} of volume {volume} arrived twice; dropped")
        if opened is not None and volume < opened.volume:
            raise ProtocolError(
                f"plane {plane} of volume {volume} came after a plane of volume "
                f"{opened.volume} (out of order); dropped"
            )
        image = msg.arrays.get("image")
        if image is None:
            raise ProtocolError("a 'frame' message carries its pixels in a buffer named 'image'")
        try:  # checked and extracted before any state changes
            traces, neuropil, flags = self.extractors[plane].extract(image)
        except DataError as exc:
            raise DataError(f"plane {plane}: {exc}") from exc
        done: list[CompletedVolume] = []
        if opened is not None and volume != opened.volume:
            done.append(self._close())  # its last plane was lost: answer it now, not never
        if self._open is None:
            self._open = self._new(volume)
        vol = self._open
        lo, hi = self.offsets[plane], self.offsets[plane + 1]
        vol.traces[lo:hi], vol.neuropil[lo:hi] = traces, neuropil
        vol.shifts[plane] = [round(float(flags.shift_y), 3), round(float(flags.shift_x), 3)]
        if flags.any:
            vol.frame_flags[plane] = flags.__dict__
        vol.last = msg
        if msg.arrays.get("behavior") is not None:
            vol.behavior = msg.arrays["behavior"]
        if plane == self.n_planes - 1:
            done.append(self._close())
        return done

    def _new(self, volume: int) -> CompletedVolume:
        n = self.offsets[-1]
        return CompletedVolume(
            volume, np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32),
            [None] * self.n_planes,
        )  # fmt: skip

    def _close(self) -> CompletedVolume:
        vol = self._open
        assert vol is not None and vol.last is not None
        self._open = None
        self._answered = vol.volume
        return vol
