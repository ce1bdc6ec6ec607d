"""The streaming engine: exact per-frame incremental CalM inference.

One call of :meth:`StreamingEngine.step` per imaging frame, constant work and
constant memory per frame, and the same outputs as
:meth:`calm_rt.model.CalM.run_offline` over the whole recording:

    traces [N] --CausalPreprocessor--> z [N] --ring of the last P frames-->
    windows [N, P] --tokenizer (float64, exact)--> tokens [N]
    chain phi = t mod P advances one position: for each layer, the new key
    and value go into that chain's ring KV cache (C slots); the query attends
    over the cache (temporal), then across all N neurons (neural), then MLP
    --> hidden [N, W] --> continuous head (the last 48 z, FiLM by hidden) and
    token heads --> forecast [N, H] +- s.d., behaviour [B]
    with a forecast calibration installed (offline-fitted, or fitted live by
    ``start_calibration``): forecast, s.d. = ForecastCalibration(history of
    the last 48 z, CalM's forecasts, hidden) -- the same object ``eval`` scores

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

import copy
import logging
import threading
import time
import weakref
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.fx.experimental import _config as fx_config

from calm_rt.data import CausalPreprocessor
from calm_rt.errors import ConfigError, DataError
from calm_rt.live.engine_config import (
    DTYPES,
    HISTORY,
    Calibration,
    EngineConfig,
    Prediction,
)
from calm_rt.live.forecast_calibration import (
    CalibrationRecorder,
    ForecastCalibration,
    calm_forecast_features,
)
from calm_rt.live.readout import DECODE_LAGS, RidgeReadout
from calm_rt.model import CalM, KVCache

__all__ = ["DTYPES", "HISTORY", "Calibration", "EngineConfig", "Prediction", "StreamingEngine"]

log = logging.getLogger(__name__)

_COMPILED: weakref.WeakKeyDictionary[nn.Module, Callable[..., Tensor]] = weakref.WeakKeyDictionary()


def _compiled_step_layers(dat: nn.Module) -> Callable[..., Tensor]:
    """One compiled ``step_layers`` per model: torch.compile's graphs hang off its wrapper."""
    if dat not in _COMPILED:
        # dynamic=True: symbolic in the neuron count, so one compile serves every session
        # (graphs static in it were a few % faster but recompiled for each session size).
        _COMPILED[dat] = torch.compile(dat.step_layers, dynamic=True, fullgraph=True)
    return _COMPILED[dat]


def _on_device(model: CalM, device: torch.device) -> CalM:
    """``model`` with its weights on ``device``: moved in place, unless they already are there."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(
        t.device.type == device.type and device.index in (None, t.device.index) for t in tensors
    ):
        return model
    return model.to(device)


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
        self.model = _on_device(model, self.device).eval()
        # The transformer that steps: the model's own in float32; in half precision a
        # converted copy, so the offline model (and any other engine) keeps float32.
        self.dtype = config.torch_dtype
        self.dat = self.model.dat
        if self.dtype != torch.float32:
            self.dat = copy.deepcopy(self.model.dat).to(self.dtype)
        mc = model.config
        self.patch = mc.patch
        self.context = mc.dat.context_tokens
        self.horizon = config.horizon or mc.horizon_frames
        if not 1 <= self.horizon <= mc.horizon_frames:
            raise ConfigError(
                f"horizon must be in [1, {mc.horizon_frames}] frames, got {config.horizon}"
            )
        n, dat = config.n_neurons, mc.dat
        if model.forecast_head is not None and mc.forecast_context > HISTORY:
            raise ConfigError(
                f"the model's continuous head reads {mc.forecast_context} frames; the engine keeps "
                f"{HISTORY}"
            )
        self.n = n
        self.heads, self.head_dim = dat.heads, dat.width // dat.heads
        self.preprocessor = CausalPreprocessor(n, config.fps, config.kind, config.preprocess)
        # One ring of C keys/values per layer and chain: [layers, P, N, heads, C, d].
        self.cache = KVCache(
            dat.layers, self.patch, n, dat.heads, self.context, self.head_dim, self.device,
            self.dtype,
        )  # fmt: skip
        self.window = torch.zeros(n, self.patch, device=self.device, dtype=torch.float32)
        # The last HISTORY normalised frames (0 where missing), on the host for the forecast
        # calibration and on the device for the continuous head (the same tensor on a CPU).
        self.history = torch.zeros(n, HISTORY, dtype=torch.float32)
        self.recent = self.history
        if self.device.type != "cpu":
            self.recent = torch.zeros(n, HISTORY, device=self.device, dtype=torch.float32)
        self._head_context = mc.forecast_context
        self.forecast_calibration: ForecastCalibration | None = None
        self._forecast_recorder: CalibrationRecorder | None = None
        self._fit_thread: threading.Thread | None = None
        self._fit_result: ForecastCalibration | DataError | None = None
        self._decode_lags = torch.tensor([HISTORY - 1 - lag for lag in DECODE_LAGS])
        # Each frame's input reaches a GPU through one pinned host buffer (an
        # asynchronous copy, no pageable bounce); on CPU there is nothing to move.
        self._pinned: Tensor | None = None
        self.table = model.tokenizer.decode_table().detach()  # [K, P]
        self.readout: RidgeReadout | None = None
        self.calibration: Calibration | None = None
        self._cal_x: list[Tensor] = []  # readout features of labelled calibration frames
        self._cal_y: list[np.ndarray] = []
        self.frame = 0
        self.expected_seq: int | None = None
        self._step_layers: Callable[..., Tensor] | None = None  # None: the eager layers
        self.compile_seconds = 0.0  # how long compiling took (0 without compile)
        if config.compile:
            self._step_layers = self._compile_step_layers()

    # -- lifecycle ------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything about the current session (same neurons)."""
        self.preprocessor.reset()
        self._reset_model()
        self.expected_seq = None

    def _reset_model(self) -> None:
        self.cache.reset()
        self.window.zero_()
        self.history.zero_()
        self.recent.zero_()
        self.frame = 0

    @property
    def state_nbytes(self) -> int:
        """Bytes of incremental state; constant over the session."""
        window = self.window.numel() * self.window.element_size()
        history = self.history.numel() * self.history.element_size()
        return self.preprocessor.state_nbytes + self.cache.nbytes + window + history

    def set_forecast_calibration(self, calibration: ForecastCalibration | None) -> None:
        """Install a forecast calibration (e.g. fitted offline on this session), or remove it."""
        if calibration is not None:
            if calibration.n_neurons != self.n:
                raise ConfigError(
                    f"the forecast calibration was fitted on {calibration.n_neurons} neurons, "
                    f"this session has {self.n}; calibrate again"
                )
            if calibration.horizon < self.horizon or calibration.context > HISTORY:
                raise ConfigError(
                    f"the forecast calibration covers {calibration.horizon} frames ahead from "
                    f"{calibration.context} frames of context; this engine needs >= {self.horizon} "
                    f"ahead and <= {HISTORY} of context"
                )
        self.forecast_calibration = calibration

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
        if self._fit_result is not None:
            self._install_fitted()
        z = self.preprocessor.step(traces, neuropil)  # [N] float32, NaN where missing
        missing = ~np.isfinite(z)
        z_model = np.where(missing, 0.0, z)
        t1 = time.perf_counter()

        # Tokenizer: the window of the last P frames ending now.
        z_now = torch.from_numpy(z_model)
        z_device = self._to_device(z_model)
        self.window = torch.roll(self.window, -1, dims=1)
        self.window[:, -1] = z_device
        self.history = torch.roll(self.history, -1, dims=1)
        self.history[:, -1] = z_now
        if self.device.type == "cpu":
            self.recent = self.history
        else:
            self.recent = torch.roll(self.recent, -1, dims=1)
            self.recent[:, -1] = z_device
        tokens = self.model.tokenizer.tokenize_windows(self.window)  # [N]
        t2 = time.perf_counter()

        hidden = self._dat_step(tokens)  # [N, W] in the engine's dtype
        t3 = time.perf_counter()
        logits = self.dat.logits(hidden).float()  # [N, k, K]
        hidden = hidden.float()  # a no-op in float32
        mean, std, token_mean, _ = self.model.forecast(
            self.recent[:, -self._head_context :], hidden, logits, self.table
        )
        head = self._head_behavior(hidden) if self.readout is None else None
        calibrating = self.forecast_calibration is not None or self._forecast_recorder is not None
        with_tokens = calibrating and self.model.forecast_head is not None
        reading = self._reading_behavior(behavior)
        outputs = [
            mean,
            std,
            tokens,
            *([hidden] if calibrating else []),
            *([token_mean] if with_tokens else []),
            *([hidden.mean(0, keepdim=True)] if reading and not calibrating else []),
            *([head] if head is not None else []),
        ]
        # The one host sync of a frame: every output comes back in one copy.
        mean_host, std_host, tokens_host, *rest = self._to_host(outputs)  # [N, H_model] each
        hidden_host = torch.from_numpy(rest.pop(0)) if calibrating else None
        token_host = torch.from_numpy(rest.pop(0)) if with_tokens else None
        pooled = None  # [1, W] or [N, W]: the readout takes the hidden states' mean over neurons
        if reading:
            pooled = hidden_host if calibrating else torch.from_numpy(rest.pop(0))
        behavior_pred = self._readout_behavior(mean_host, pooled, behavior)
        if behavior_pred is None and head is not None:
            behavior_pred = rest[0]
        if self._forecast_recorder is not None:
            self._forecast_recorder.add(
                self.history[:, -1],
                calm_forecast_features(torch.from_numpy(mean_host), token_host, self.horizon),
                torch.from_numpy(std_host[:, : self.horizon]),
                hidden_host,
            )
            if self.calibration is not None and not self.calibration.names:
                self.calibration.frames = self._forecast_recorder.frames
            self._finish_forecast_calibration()
        cal = self.forecast_calibration
        calibrated = cal is not None and self.frame >= cal.context - 1
        if calibrated:
            mean, std = cal.predict(
                self.history[:, -cal.context :],
                calm_forecast_features(torch.from_numpy(mean_host), token_host, cal.horizon),
                torch.from_numpy(std_host), hidden_host,
            )  # fmt: skip
            mean_host, std_host = mean.numpy(), std.numpy()
        forecast = mean_host[:, : self.horizon]
        spread = std_host[:, : self.horizon]
        t4 = time.perf_counter()
        pred = Prediction(
            seq=self.frame,
            frame=self.frame,
            forecast=forecast,
            forecast_std=spread,
            activity=z,
            tokens=tokens_host,
            behavior=behavior_pred,
            missing=missing,
            filled=0,
            skipped=0,
            reset=False,
            calibrated=calibrated,
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

    def _to_device(self, host: np.ndarray) -> Tensor:
        """A frame's host input ``[N]`` on the engine's device (float32).

        The engine's only host-to-device copy; tests on a fake CUDA device
        replace this method (a real host tensor cannot reach a fake device).
        """
        src = torch.from_numpy(np.ascontiguousarray(host, dtype=np.float32))
        if self.device.type == "cpu":
            return src
        if self._pinned is None or self._pinned.shape != src.shape:
            self._pinned = torch.empty(src.shape, dtype=torch.float32, pin_memory=True)
        # Safe to reuse: the previous frame's copy finished at its _to_host sync.
        self._pinned.copy_(src)
        return self._pinned.to(self.device, non_blocking=True)

    def _to_host(self, tensors: list[Tensor]) -> list[np.ndarray]:
        """Device outputs to host arrays, in one device-to-host copy (the frame's one sync).

        Integer tensors (token ids, far below 2**24) travel as float32 and
        come back as int64. Tests on a fake CUDA device replace this method.
        """
        if self.device.type == "cpu":
            return [t.numpy() for t in tensors]
        flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors]).cpu().numpy()
        out, start = [], 0
        for t in tensors:
            part = flat[start : start + t.numel()].reshape(t.shape)
            out.append(part if t.is_floating_point() else part.astype(np.int64))
            start += t.numel()
        return out

    def _skip(self, frames: int) -> None:
        """Let ``frames`` frames pass uncomputed (their samples count as missing)."""
        shift = min(frames, self.patch)
        self.window = torch.roll(self.window, -shift, dims=1)
        self.window[:, -shift:] = 0.0
        lost = min(frames, HISTORY)
        self.history = torch.roll(self.history, -lost, dims=1)
        self.history[:, -lost:] = 0.0
        if self.device.type == "cpu":
            self.recent = self.history
        else:
            self.recent = torch.roll(self.recent, -lost, dims=1)
            self.recent[:, -lost:] = 0.0
        self.frame += frames

    @property
    def compiled(self) -> bool:
        """Whether the DAT step runs compiled (``EngineConfig.compile``)."""
        return self._step_layers is not None

    def _dat_step(self, tokens: Tensor) -> Tensor:
        """Advance chain ``frame mod P`` by one token; returns hidden ``[N, W]``."""
        phase, position = self.frame % self.patch, self.frame // self.patch
        return self.dat.step(
            tokens, position, self.cache, phase, self._step_layers, values=self._values()
        )

    def _values(self) -> Tensor | None:
        """The raw window beside the tokens (models with ``value_input``), in the step's dtype."""
        return self.window.to(self.dtype) if self.dat.value_in is not None else None

    def _compile_step_layers(self) -> Callable[..., Tensor]:
        """``DAT.step_layers`` compiled, and every variant a session meets compiled now.

        A session meets two, a window still filling (a mask) and a full
        window (none); the slot is symbolic. Both are compiled here, on a
        scratch cache of this session's shape, so no frame waits for the
        compiler. The graphs are shared by
        every engine of the model and symbolic in the neuron count, so once
        one engine has compiled (the server's warm-up, before any frame), a
        session of any size (but 1) compiles nothing.
        """
        dat, cfg = self.dat, self.model.config.dat
        compiled = _compiled_step_layers(dat)
        # The cache's own layout (all P chains): the graphs are guarded on the views' base.
        scratch = KVCache(
            cfg.layers, self.patch, self.n, cfg.heads, self.context, self.head_dim, self.device
        )
        tokens = torch.zeros(self.n, dtype=torch.int64, device=self.device)
        values = self._values()
        t0 = time.perf_counter()
        try:
            # No duck sizing: a neuron count that happens to equal a model dimension
            # must not become a guard (every other count would then recompile).
            with torch.no_grad(), fx_config.patch(use_duck_shape=False):
                for position in range(self.context + 1):  # the window fills, then is full
                    dat.step(tokens, position, scratch, 0, compiled, values=values)
        except Exception as exc:  # inductor's errors have no common base class
            raise ConfigError(
                f"compiling the engine step failed ({type(exc).__name__}: {exc}); inductor on "
                "the CPU needs a C++ compiler (gcc or clang on PATH); or run without compile"
            ) from exc
        self.compile_seconds = time.perf_counter() - t0
        log.info("engine step compiled in %.1f s (%d neurons)", self.compile_seconds, self.n)
        return compiled

    # -- behaviour ------------------------------------------------------------------

    def start_calibration(self, seconds: float, names: tuple[str, ...] = ()) -> Calibration:
        """Calibrate the forecasts, and the behaviour readout if ``names`` are given.

        Forecasts: the next ``seconds`` of frames are collected and a
        :class:`~calm_rt.live.forecast_calibration.ForecastCalibration` is
        fitted in closed form (penalty and s.d. from blocked cross-validation
        in time; ``forecast_gain`` reports its held-out gain over copy-last)
        and installed. Behaviour: frames must then be stepped with
        ``behavior=[B]``; when ``seconds`` of them have arrived the ridge
        readout is fitted (blocked CV, R2 reported) and replaces the head.
        """
        frames = int(round(seconds * self.config.fps))
        if frames < 20:
            raise ConfigError(f"calibrate for at least 20 frames, got {frames} ({seconds} s)")
        if names and seconds < 30:
            log.warning(
                "calibrating the behaviour readout on %.0f s: under 30 s it rarely sees "
                "behaviour's whole range and extrapolates badly (docs/engine.md)",
                seconds,
            )
        self.calibration = Calibration(target_frames=frames, names=tuple(names))
        self._cal_x, self._cal_y = [], []
        if names:
            self.readout = None
        need = CalibrationRecorder.min_frames(HISTORY, self.horizon)
        if frames < need:
            self.calibration.forecast_error = (
                f"forecasts need at least {need} frames ({need / self.config.fps:.1f} s) "
                "to calibrate; calibrate for longer"
            )
            self._forecast_recorder = None
        else:
            self._forecast_recorder = CalibrationRecorder(
                frames, projection_frames=min(150, frames // 4)
            )
        return self.calibration

    def _finish_forecast_calibration(self) -> None:
        """Once its frames are in, fit the forecast calibration (in the background by default)."""
        rec = self._forecast_recorder
        if rec is None or not rec.full:
            return
        self._forecast_recorder = None
        if self.config.background_calibration:
            self._fit_thread = threading.Thread(
                target=self._fit, args=(rec,), name="calm-rt-forecast-calibration", daemon=True
            )
            self._fit_thread.start()
        else:
            self._fit(rec)
            self._install_fitted()

    def _fit(self, rec: CalibrationRecorder) -> None:
        try:
            self._fit_result = rec.fit(
                context=HISTORY, horizon=self.horizon, head_steps=self.config.calibration_head_steps
            )
        except DataError as err:  # e.g. a calibration that was all missing: keep the token forecast
            self._fit_result = err

    def _install_fitted(self) -> None:
        """Install a finished fit (called on the stepping thread, between frames)."""
        if self._fit_thread is not None:
            if self._fit_thread.is_alive():
                return
            self._fit_thread = None
        result, self._fit_result, cal = self._fit_result, None, self.calibration
        if result is None or cal is None:
            return
        if isinstance(result, DataError):
            cal.forecast_error = str(result)
            log.warning("forecast calibration failed: %s", result)
            return
        self.set_forecast_calibration(result)
        cal.forecast_gain = result.cv_gain
        if not cal.names:
            cal.active = True

    def _collect(self, cal: Calibration, features: Tensor, y: np.ndarray) -> None:
        """Keep the readout's features ``[N * F]`` of each labelled frame until the fit."""
        self._cal_y.append(y)
        self._cal_x.append(features.float())
        cal.frames += 1
        if cal.frames >= cal.target_frames:
            readout = RidgeReadout()
            report = readout.fit(torch.stack(self._cal_x), np.stack(self._cal_y))
            self.readout, cal.r2, cal.active = readout, report["r2"], True  # type: ignore[assignment]
            self._cal_x, self._cal_y = [], []

    def _reading_behavior(self, behavior: np.ndarray | None) -> bool:
        """Whether this frame feeds the ridge readout: calibrating it, or decoding with it."""
        cal = self.calibration
        collecting = cal is not None and cal.names and not cal.active and behavior is not None
        return bool(collecting) or self.readout is not None

    def _readout_behavior(
        self, forecast: np.ndarray, hidden: Tensor | None, behavior: np.ndarray | None
    ) -> np.ndarray | None:
        """Collect calibration frames; the calibrated ridge readout's behaviour ``[B]`` (host).

        ``hidden``: the frame's hidden states ``[N, W]`` or their mean over
        neurons ``[1, W]`` (the same to the readout), given when the frame
        feeds the readout (:meth:`_reading_behavior`).
        """
        cal = self.calibration
        collecting = cal is not None and cal.names and not cal.active and behavior is not None
        features = None
        if hidden is not None:
            lagged = self.history[:, self._decode_lags]  # [N, L] activity now and at the lags
            features = RidgeReadout().features(torch.from_numpy(forecast), lagged, hidden)
        if collecting:
            y = np.asarray(behavior, np.float32)
            if y.shape != (len(cal.names),):
                raise DataError(
                    f"behaviour sample has shape {y.shape}, expected ({len(cal.names)},)"
                )
            self._collect(cal, features, y)  # type: ignore[arg-type]
        if self.readout is not None and features is not None:
            return self.readout.model.predict(features[None]).float()[0].numpy()
        return None

    def _head_behavior(self, hidden: Tensor) -> Tensor | None:
        """The checkpoint's behaviour head on ``hidden [N, W]``, left on the device (``[B]``)."""
        head = self.model.behavior_head
        if head is None:
            return None
        return head(hidden[None])[0] * self.model.behavior_std + self.model.behavior_mean
