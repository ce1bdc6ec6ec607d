"""Recordings in and out: the `Session` type, file readers, movies and ROI masks,
the causal preprocessing shared by training and the live engine, the
evaluation protocol's splits (:mod:`calm_rt.data.splits`), and the simulator."""

from calm_rt.data._corpus import simulate_corpus
from calm_rt.data._movies import (
    Movie,
    RoiSet,
    labels_from_weights,
    open_movie,
    read_imagej_rois,
    session_from_movie,
    traces_from_masks,
)
from calm_rt.data._preprocess import CausalPreprocessor, PreprocessConfig, preprocess_traces
from calm_rt.data._readers import (
    SUPPORTED_FORMATS,
    find_session_files,
    load_corpus,
    load_session,
    read_npy_traces,
    read_nwb,
    read_region_traces,
    read_suite2p,
)
from calm_rt.data._render import MovieTruth, render_movie
from calm_rt.data._session import (
    CalmDataWarning,
    Session,
    TraceKind,
    drop_unusable_neurons,
    read_npz,
    validate_session,
    write_npz,
)
from calm_rt.data._simulate import (
    BEHAVIOR_NAMES,
    INDICATORS,
    NEURON_TYPES,
    AnimalModel,
    Indicator,
    SessionTruth,
    SimConfig,
    make_animal,
    simulate_session,
)
from calm_rt.data.splits import TEST, TRAIN, VAL, PreparedSession, Protocol, prepare_session

__all__ = [
    "BEHAVIOR_NAMES",
    "INDICATORS",
    "NEURON_TYPES",
    "SUPPORTED_FORMATS",
    "TEST",
    "TRAIN",
    "VAL",
    "AnimalModel",
    "CalmDataWarning",
    "CausalPreprocessor",
    "Indicator",
    "Movie",
    "MovieTruth",
    "PreparedSession",
    "PreprocessConfig",
    "Protocol",
    "RoiSet",
    "Session",
    "SessionTruth",
    "SimConfig",
    "TraceKind",
    "drop_unusable_neurons",
    "find_session_files",
    "labels_from_weights",
    "load_corpus",
    "load_session",
    "make_animal",
    "open_movie",
    "prepare_session",
    "preprocess_traces",
    "read_imagej_rois",
    "read_npy_traces",
    "read_npz",
    "read_nwb",
    "read_region_traces",
    "read_suite2p",
    "render_movie",
    "session_from_movie",
    "simulate_corpus",
    "simulate_session",
    "traces_from_masks",
    "validate_session",
    "write_npz",
]
