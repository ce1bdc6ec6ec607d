"""The streaming engine: exact per-frame incremental CalM inference.

One call of :meth:`StreamingEngine.step` per imaging frame, constant work and
constant memory per frame, and the same outputs as
:meth:`calm_rt.model.CalM.run_offline` over the whole recording:

    traces [N] --CausalPreprocessor--> z [N] --ring of the last P frames-->
    windows [N, P] --tokenizer (float64, exact)--> tokens [N]
    chain phi = t mod P advances one position: for each layer, the new key
    and value go into that chain's ring KV cache (C slots); the query attends
    over the cache (temporal), then across all N neurons (neural), then MLP
    --> hidden [N, W] --> heads --> forecast [N, H] +- s.d., behaviour [B]

All incremental state lives in buffers allocated by ``__init__``. The P
chains' caches hold the last C tokens each, so memory is flat over hours.

Real-world policies (see docs/engine.md):

* **Dropped frames.** A gap in sequence numbers of up to ``max_fill_frames``
  is filled with missing (NaN) frames, so the time grid, the chain phases and
  the caches stay exactly those of the offline model fed NaN for the lost
  frames. A longer gap, up to ``max_gap_seconds``, is skipped without
  computing the lost frames (cheap, so an overloaded server can catch up):
  the caches keep their tokens, which the model attends to only while they
  are inside the window, at their true distance in time. A gap longer still
  resets the model (the preprocessing keeps its baseline). The prediction
  reports ``filled`` and ``skipped`` frames and ``reset``.
* **Missing values.** A NaN for a neuron is masked: the preprocessing state
  ignores it, the model sees 0 (the running mean), and the prediction's
  ``missing`` mask says which neurons were missing.
* **Shape.** The neuron count is fixed at construction; any other frame
  shape is rejected with :class:`~calm_rt.errors.DataError`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from calm_rt.data import CausalPreprocessor, PreprocessConfig
from calm_rt.errors import ConfigError, DataError
from calm_rt.live.readout import RidgeReadout
from calm_rt.model import CalM, KVCache

__all__ = ["Calibration", "EngineConfig", "Prediction", "StreamingEngine"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Runtime knobs (model shape comes from the checkpoint)."""

    n_neurons: int
    fps: float
    kind: str = "F"
    horizon: int | None = None  # frames to forecast (<= the model's; default all)
    max_fill_frames: int = 8  # gaps up to this are filled exactly with missing frames
    max_gap_seconds: float = 2.0  # longer gaps are skipped up to this; beyond, the model resets
    device: str = "cpu"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        if self.n_neurons < 1:
            raise ConfigError(f"n_neurons must be >= 1, got {self.n_neurons}")
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise ConfigError(f"fps must be a positive frame rate, got {self.fps}")
        if self.kind not in ("F", "dff"):
            raise ConfigError(f"kind must be 'F' or 'dff', got {self.kind!r}")
        if self.max_gap_seconds < 0 or self.max_fill_frames < 0:
            raise ConfigError("max_gap_seconds and max_fill_frames must be >= 0")

    @property
    def max_gap_frames(self) -> int:
        return int(round(self.max_gap_seconds * self.fps))


@dataclass
class Prediction:
    """What the engine answers for one frame.

    ``forecast[i, h]`` is neuron i's normalised activity predicted for frame
    ``frame + 1 + h``; ``forecast_std`` its predictive s.d. (from the token
    distribution). ``behavior`` is in the behaviour's own units.
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


@dataclass
class Calibration:
    """Progress of the online ridge readout calibration."""

    target_frames: int
    names: tuple[str, ...]
    projection_frames: int
    frames: int = 0
    r2: list[float | None] | None = None  # None per variable that never varied
    active: bool = False


class StreamingEngine:
    """Per-frame incremental CalM inference with preallocated state.

    Args:
        model: a CalM model (its weights are used as they are; put it in
            eval mode).
        config: neurons, frame rate, trace kind, horizon, gap policy, device.
    """

    def __init__(self, model: CalM, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.model = model.to(self.device).eval()
        mc = model.config
        self.patch = mc.patch
        self.context = mc.dat.context_tokens
        self.horizon = config.horizon or mc.horizon_frames
        if not 1 <= self.horizon <= mc.horizon_frames:
            raise ConfigError(
                f"horizon must be in [1, {mc.horizon_frames}] frames, got {config.horizon}"
            )
        n, dat = config.n_neurons, mc.dat
        self.n = n
        self.heads, self.head_dim = dat.heads, dat.width // dat.heads
        self.preprocessor = CausalPreprocessor(n, config.fps, config.kind, config.preprocess)
        # One ring of C keys/values per layer and chain: [layers, P, N, heads, C, d].
        self.cache = KVCache(
            dat.layers, self.patch, n, dat.heads, self.context, self.head_dim, self.device
        )
        self.window = torch.zeros(n, self.patch, device=self.device, dtype=torch.float32)
        self.table = model.tokenizer.decode_table().detach()  # [K, P]
        self.readout: RidgeReadout | None = None
        self.calibration: Calibration | None = None
        self._cal_hidden: list[Tensor] = []
        self._cal_y: list[np.ndarray] = []
        self.frame = 0
        self.expected_seq: int | None = None

    # -- lifecycle ------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything about the current session (same neurons)."""
        self.preprocessor.reset()
        self._reset_model()
        self.expected_seq = None

    def _reset_model(self) -> None:
        self.cache.reset()
        self.window.zero_()
        self.frame = 0

    @property
    def state_nbytes(self) -> int:
        """Bytes of incremental state; constant over the session."""
        window = self.window.numel() * self.window.element_size()
        return self.preprocessor.state_nbytes + self.cache.nbytes + window

    # -- the step ---------------------------------------------------------------

    def step(
        self,
        traces: np.ndarray,
        seq: int | None = None,
        neuropil: np.ndarray | None = None,
        behavior: np.ndarray | None = None,
        fill: bool = True,
    ) -> Prediction:
        """Process one frame ``traces [N]`` (raw F or dF/F as configured).

        ``seq`` is the frame's sequence number from the scope (consecutive
        when nothing was lost); ``behavior [B]``, when given during a
        calibration, is used to fit the ridge readout. ``fill=False`` skips
        a short gap instead of filling it (filling costs one model step per
        lost frame): for a caller that dropped frames because it was behind.
        """
        traces = np.asarray(traces)
        if traces.shape != (self.n,):
            raise DataError(
                f"frame has shape {traces.shape}, but this session has {self.n} neurons; "
                "the neuron count is fixed when the engine is configured (reset with a new config to change it)",
                field="traces",
            )
        if traces.dtype.kind not in "fiu":
            raise DataError(
                f"frame values must be numeric, got dtype {traces.dtype}", field="traces"
            )
        # Every input is checked before any state moves (gap filling advances the caches).
        if neuropil is not None and np.shape(neuropil) != (self.n,):
            raise DataError(
                f"neuropil has shape {np.shape(neuropil)}, expected ({self.n},)", field="neuropil"
            )
        cal = self.calibration
        if behavior is not None and cal is not None and not cal.active:
            if np.shape(behavior) != (len(cal.names),):
                raise DataError(
                    f"behaviour sample has shape {np.shape(behavior)}, expected ({len(cal.names)},)"
                )
        filled, skipped, reset = 0, 0, self.frame == 0
        if seq is not None and self.expected_seq is not None:
            if seq < self.expected_seq:
                raise DataError(
                    f"frame {seq} arrived after frame {self.expected_seq - 1}: out of order or repeated; dropped",
                    field="seq",
                )
            gap = seq - self.expected_seq
            if gap > self.config.max_gap_frames:
                self._reset_model()  # too long to bridge: the model starts over
                reset, skipped = True, gap
            elif gap > self.config.max_fill_frames or (gap and not fill):
                self._skip(gap)
                skipped = gap
            elif gap:
                missing = np.full(self.n, np.nan, np.float32)
                for _ in range(gap):  # keep the time grid: lost frames become missing samples
                    self._advance(missing, None, None)
                filled = gap
        pred = self._advance(traces, neuropil, behavior)
        pred.seq = seq if seq is not None else pred.frame
        pred.filled, pred.skipped, pred.reset = filled, skipped, reset
        self.expected_seq = pred.seq + 1
        return pred

    @torch.no_grad()
    def _advance(
        self, traces: np.ndarray, neuropil: np.ndarray | None, behavior: np.ndarray | None
    ) -> Prediction:
        t0 = time.perf_counter()
        z = self.preprocessor.step(traces, neuropil)  # [N] float32, NaN where missing
        missing = ~np.isfinite(z)
        z_model = np.where(missing, 0.0, z)
        t1 = time.perf_counter()

        # Tokenizer: the window of the last P frames ending now.
        self.window = torch.roll(self.window, -1, dims=1)
        self.window[:, -1] = torch.from_numpy(z_model).to(self.device)
        tokens = self.model.tokenizer.tokenize_windows(self.window)  # [N]
        t2 = time.perf_counter()

        hidden = self._dat_step(tokens)
        t3 = time.perf_counter()
        logits = self.model.dat.logits(hidden)  # [N, k, K]
        mean, std = self.model.forecast_from_logits(logits, self.table)
        behavior_pred = self._behavior(hidden, behavior)
        forecast = mean[:, : self.horizon].cpu().numpy()  # the one host sync: outputs are read
        spread = std[:, : self.horizon].cpu().numpy()
        t4 = time.perf_counter()
        pred = Prediction(
            seq=self.frame,
            frame=self.frame,
            forecast=forecast,
            forecast_std=spread,
            activity=z,
            tokens=tokens.cpu().numpy(),
            behavior=behavior_pred,
            missing=missing,
            filled=0,
            skipped=0,
            reset=False,
            timings_ms={
                "preprocess": (t1 - t0) * 1e3,
                "tokenize": (t2 - t1) * 1e3,
                "dat": (t3 - t2) * 1e3,
                "heads": (t4 - t3) * 1e3,
                "total": (t4 - t0) * 1e3,
            },
        )
        self.frame += 1
        return pred

    def _skip(self, frames: int) -> None:
        """Let ``frames`` frames pass uncomputed (their samples count as missing)."""
        shift = min(frames, self.patch)
        self.window = torch.roll(self.window, -shift, dims=1)
        self.window[:, -shift:] = 0.0
        self.frame += frames

    def _dat_step(self, tokens: Tensor) -> Tensor:
        """Advance chain ``frame mod P`` by one token; returns hidden ``[N, W]``."""
        phase, position = self.frame % self.patch, self.frame // self.patch
        return self.model.dat.step(tokens, position, self.cache, phase)

    # -- behaviour ------------------------------------------------------------------

    def start_calibration(self, seconds: float, names: tuple[str, ...]) -> Calibration:
        """Collect ``seconds`` of frames with measured behaviour, then fit the ridge readout.

        Frames must then be stepped with ``behavior=[B]``. When enough have
        arrived the readout is fitted (penalty chosen on the last 20% of the
        calibration, whose R2 is reported) and replaces the head's output.
        """
        frames = int(round(seconds * self.config.fps))
        if frames < 20:
            raise ConfigError(f"calibrate for at least 20 frames, got {frames} ({seconds} s)")
        if seconds < 30:
            log.warning(
                "calibrating the behaviour readout on %.0f s: under 30 s it rarely sees "
                "behaviour's whole range and extrapolates badly (docs/engine.md)",
                seconds,
            )
        self.calibration = Calibration(
            target_frames=frames, names=tuple(names), projection_frames=min(150, frames // 4)
        )
        self._cal_hidden, self._cal_y = [], []
        self.readout = None
        return self.calibration

    def _collect(self, cal: Calibration, hidden: Tensor, y: np.ndarray) -> None:
        """Keep full hidden states only until the projection is fitted, then r features per neuron."""
        self._cal_y.append(y)
        cal.frames += 1
        if cal.frames <= cal.projection_frames:
            self._cal_hidden.append(hidden)
            if cal.frames == cal.projection_frames:
                self._pending = RidgeReadout()
                self._pending.fit_projection(torch.stack(self._cal_hidden))
                self._cal_hidden = [self._pending.features(h).float() for h in self._cal_hidden]
        else:
            self._cal_hidden.append(self._pending.features(hidden).float())
        if cal.frames >= cal.target_frames:
            report = self._pending.fit(torch.stack(self._cal_hidden), np.stack(self._cal_y))
            self.readout, cal.r2, cal.active = self._pending, report["r2"], True  # type: ignore[assignment]
            self._cal_hidden, self._cal_y = [], []

    def _behavior(self, hidden: Tensor, behavior: np.ndarray | None) -> np.ndarray | None:
        cal = self.calibration
        if cal is not None and not cal.active and behavior is not None:
            y = np.asarray(behavior, np.float32)
            if y.shape != (len(cal.names),):
                raise DataError(
                    f"behaviour sample has shape {y.shape}, expected ({len(cal.names)},)"
                )
            self._collect(cal, hidden.detach().cpu(), y)
        if self.readout is not None:
            return self.readout.predict(hidden.cpu()).numpy()
        head = self.model.behavior_head
        if head is not None:
            out = head(hidden[None])[0] * self.model.behavior_std + self.model.behavior_mean
            return out.cpu().numpy()
        return None
