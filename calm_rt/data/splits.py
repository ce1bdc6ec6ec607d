"""The evaluation protocol's data preparation, shared by training and evaluation.

POCO's protocol (arXiv 2506.14957), the default so numbers are comparable
with published peers: each session is cut in time into blocks of 1000 frames
assigned train, train, train, val, test in turn; each neuron's dF/F is
z-scored with the statistics of its training blocks only; test windows of 48
context + 16 target frames start every 16 frames inside test blocks. Training
code only ever sees frames labelled train, so nothing leaks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from calm_rt.data._preprocess import PreprocessConfig, preprocess_traces
from calm_rt.data._session import Session
from calm_rt.errors import ConfigError, DataError

__all__ = ["TEST", "TRAIN", "VAL", "PreparedSession", "Protocol", "prepare_session"]

TRAIN, VAL, TEST = 0, 1, 2
_LABELS = {"T": TRAIN, "V": VAL, "E": TEST}


@dataclass(frozen=True)
class Protocol:
    """Context and horizon in frames, and how sessions are split in time."""

    context: int = 48
    horizon: int = 16
    block_frames: int = 1000
    pattern: str = "TTTVE"  # T train, V validation, E test (evaluation)
    stride: int = 16

    def __post_init__(self) -> None:
        if self.context < 1 or self.horizon < 1 or self.stride < 1:
            raise ConfigError("context, horizon and stride must be >= 1")
        if self.block_frames < self.context + self.horizon:
            raise ConfigError(
                f"block_frames ({self.block_frames}) must hold one window of "
                f"context + horizon = {self.context + self.horizon} frames"
            )
        if not self.pattern or set(self.pattern) - set(_LABELS):
            raise ConfigError(f"pattern must be made of T, V and E, got {self.pattern!r}")

    def labels(self, n_frames: int) -> np.ndarray:
        """``[T]`` split label of every frame (TRAIN, VAL or TEST)."""
        block = np.arange(n_frames) // self.block_frames
        codes = np.array([_LABELS[c] for c in self.pattern])
        return codes[block % len(codes)]

    def window_starts(self, labels: np.ndarray, split: int) -> np.ndarray:
        """Starts of windows (context + horizon) lying wholly inside blocks of ``split``."""
        span = self.context + self.horizon
        starts = []
        n = labels.shape[0]
        for b0 in range(0, n, self.block_frames):
            if labels[b0] != split:
                continue
            b1 = min(b0 + self.block_frames, n)
            starts.extend(range(b0, b1 - span + 1, self.stride))
        return np.asarray(starts, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class PreparedSession:
    """A session ready for models: z-scored activity, split labels, behaviour."""

    session: Session
    z: np.ndarray  # [N, T] float32, NaN where the recording had no sample
    labels: np.ndarray  # [T] TRAIN / VAL / TEST
    behavior: np.ndarray | None  # [T, B] float32

    @property
    def n_neurons(self) -> int:
        return self.z.shape[0]


def prepare_session(session: Session, protocol: Protocol | None = None) -> PreparedSession:
    """dF/F (causal baseline, for raw F) then z-score with training-block statistics."""
    protocol = protocol or Protocol()
    labels = protocol.labels(session.n_frames)
    if not (labels == TRAIN).any():
        raise DataError(
            f"has {session.n_frames} frames, fewer than one training block of "
            f"{protocol.block_frames}; use a smaller --block-frames",
            path=session.source,
        )
    dff = preprocess_traces(
        session.traces,
        session.fps,
        session.kind,
        session.neuropil,
        PreprocessConfig(normalize=False),
    )
    train = dff[:, labels == TRAIN]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows give NaN stats
        mean = np.nanmean(train, axis=1, keepdims=True)
        std = np.nanstd(train, axis=1, keepdims=True)
    std = np.where(np.isfinite(std) & (std > 1e-8), std, 1.0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    z = ((dff - mean) / std).astype(np.float32)
    return PreparedSession(session=session, z=z, labels=labels, behavior=session.behavior)
