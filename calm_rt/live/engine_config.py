"""The streaming engine's knobs and what it answers: :class:`EngineConfig`, :class:`Prediction`.

Kept apart from :mod:`calm_rt.live.engine` (the step itself) so that the
service can read and validate a configuration without the engine's code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from calm_rt.data import PreprocessConfig
from calm_rt.errors import ConfigError

__all__ = ["DTYPES", "HISTORY", "Calibration", "EngineConfig", "Prediction"]

# What the transformer may run in (EngineConfig.dtype); the tokenizer and the heads' mixture
# stay float32 (tokens must equal the offline model's: near-ties are resolved in float64).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Frames of normalised activity kept: the continuous head's context and the forecast
# calibration's (a model may read fewer).
HISTORY = 48


@dataclass(frozen=True)
class EngineConfig:
    """Runtime knobs (model shape comes from the checkpoint)."""

    n_neurons: int
    fps: float
    kind: str = "F"
    horizon: int | None = None  # frames to forecast (<= the model's; default all)
    max_fill_frames: int = 8  # gaps up to this are filled exactly with missing frames
    max_gap_seconds: float = 2.0  # longer gaps are skipped up to this; beyond, the model resets
    device: str = "cpu"  # cpu, cuda or cuda:N (auto: cuda when available)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    # Fit a live forecast calibration in a background thread (seconds at hundreds of neurons)
    # so frames keep being answered; False fits it within the frame that completes it.
    background_calibration: bool = True
    # Training steps of the calibration's continuous head (0: the closed-form ridge alone).
    calibration_head_steps: int = 2000
    # torch.compile (inductor, the machine's C++ compiler) the DAT step's layers, compiled
    # while the engine is built (seconds, once per model); CPU only (docs/engine.md).
    compile: bool = False
    # The transformer's precision: float32 (exact against the offline model), or bfloat16 /
    # float16 for a GPU's tensor cores (weights, KV cache and activations; forecasts differ
    # from float32 by a bounded amount, tests/test_engine.py). On the CPU half precision is
    # slower than float32: it is there for tests, and the service refuses it.
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.compile and self.dtype != "float32":
            raise ConfigError("compile runs the float32 step (the CPU's); drop compile or dtype")
        if self.n_neurons < 1:
            raise ConfigError(f"n_neurons must be >= 1, got {self.n_neurons}")
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise ConfigError(f"fps must be a positive frame rate, got {self.fps}")
        if self.kind not in ("F", "dff"):
            raise ConfigError(f"kind must be 'F' or 'dff', got {self.kind!r}")
        if self.max_gap_seconds < 0 or self.max_fill_frames < 0:
            raise ConfigError("max_gap_seconds and max_fill_frames must be >= 0")
        if self.calibration_head_steps < 0:
            raise ConfigError(
                f"calibration_head_steps must be >= 0 (0: no head), got {self.calibration_head_steps}"
            )
        device = str(self.device).lower()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
            raise ConfigError(f"device must be auto, cpu or cuda (cuda:N), got {self.device!r}")
        object.__setattr__(self, "device", device)
        if self.compile and device != "cpu":
            raise ConfigError(
                "compile is for the CPU (measured there); on a GPU the Triton kernels run the "
                "step: drop compile, or use device cpu"
            )

    @property
    def max_gap_frames(self) -> int:
        return int(round(self.max_gap_seconds * self.fps))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class Prediction:
    """What the engine answers for one frame.

    ``forecast[i, h]`` is neuron i's normalised activity predicted for frame
    ``frame + 1 + h``; ``forecast_std`` its predictive s.d. (the model's
    own, or the forecast calibration's when ``calibrated``).
    ``behavior`` is in the behaviour's own units.
    """

    seq: int
    frame: int
    forecast: np.ndarray  # [N, H] float32
    forecast_std: np.ndarray  # [N, H] float32
    activity: np.ndarray  # [N] float32 normalised activity of this frame (NaN if missing)
    tokens: np.ndarray  # [N] int64
    behavior: np.ndarray | None  # [B] float32
    missing: np.ndarray  # [N] bool
    filled: int  # lost frames just before this one, filled in as missing samples
    skipped: int  # lost frames just before this one, skipped (too many to fill)
    reset: bool  # the model restarted (first frame, or a gap too long to bridge)
    timings_ms: dict[str, float]
    calibrated: bool = False  # forecast from the session's forecast calibration


@dataclass
class Calibration:
    """Progress of a live calibration: the forecasts always, the behaviour readout when named."""

    target_frames: int
    names: tuple[str, ...]
    frames: int = 0
    r2: list[float | None] | None = None  # None per variable that never varied
    active: bool = False
    forecast_gain: float | None = None  # cross-validated 1 - MSE/MSE(copy last), once fitted
    forecast_error: str | None = None  # why the forecasts could not be calibrated
