"""Pixels to traces, the first stage of a frame's way: motion, ROIs, traces, segmentation.

    frame [H, W] --MotionCorrector (phase correlation)--> shift (dy, dx)
                 --RoiExtractor (sparse bilinear sampling)--> F [R], Fneu [R], FrameFlags

:mod:`.rois` reads every ROI format into sparse :class:`Footprints`;
:mod:`.segment` finds ROIs in the first seconds of a stream when none are
given. The neuropil coefficient, baseline and dF/F come later, in the
engine's :class:`calm_rt.data.CausalPreprocessor`.
"""

from calm_rt.extract.motion import MotionConfig, MotionCorrector, MotionEstimate
from calm_rt.extract.rois import (
    Footprints,
    VolumeRois,
    as_footprints,
    footprints_from_array,
    load_rois,
    load_volume_rois,
    save_rois,
    save_volume_rois,
)
from calm_rt.extract.segment import (
    AutoSegmenter,
    Segmentation,
    SegmentConfig,
    detect_cells,
    segment_movie,
)
from calm_rt.extract.traces import FrameFlags, RoiExtractor

__all__ = [
    "AutoSegmenter",
    "Footprints",
    "FrameFlags",
    "MotionConfig",
    "MotionCorrector",
    "MotionEstimate",
    "RoiExtractor",
    "SegmentConfig",
    "Segmentation",
    "VolumeRois",
    "as_footprints",
    "detect_cells",
    "footprints_from_array",
    "load_rois",
    "load_volume_rois",
    "save_rois",
    "save_volume_rois",
    "segment_movie",
]
