"""The evaluation protocol's data preparation, shared by training and evaluation.

POCO's protocol (arXiv 2506.14957), the default so numbers are comparable
with published peers: each session is cut in time into blocks of 1000 frames
assigned train, train, train, val, test in turn; activity is normalised by
the streaming engine's own causal preprocessing (running statistics, no
look-ahead, the same numbers a rig receives); test windows of 48
context + 16 target frames start every 16 frames inside test blocks. Training
code only ever sees frames labelled train, so nothing leaks.
"""

from __future__ import annotations

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


def prepare_session(
    session: Session, protocol: Protocol | None = None, preprocess: PreprocessConfig | None = None
) -> PreparedSession:
    """The engine's own causal preprocessing (dF/F, running z-score, clip) over the whole session.

    One normalisation for pretraining, evaluation and the live engine: ``z``
    is exactly the ``activity`` the streaming engine computes frame by frame
    from the same traces (``preprocess`` must be the engine's configuration),
    so an offline score is the score of what a rig receives.
    """
    protocol = protocol or Protocol()
    labels = protocol.labels(session.n_frames)
    if not (labels == TRAIN).any():
        raise DataError(
            f"has {session.n_frames} frames, fewer than one training block of "
            f"{protocol.block_frames}; use a smaller --block-frames",
            path=session.source,
        )
    z = preprocess_traces(
        session.traces,
        session.fps,
        session.kind,
        session.neuropil,
        preprocess or PreprocessConfig(),
    ).astype(np.float32)
    return PreparedSession(session=session, z=z, labels=labels, behavior=session.behavior)
