"""Replay a recorded session through the streaming engine, frame by frame.

Used by the napari reader (scrub a recording with its forecasts), by the
benchmarks, and by anyone who wants to see what the live system would have
said about an old recording. The output is a session file (it loads with
:func:`calm_rt.data.read_npz`) with the engine's per-frame outputs added.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from calm_rt.data import Session, validate_session
from calm_rt.live.engine import EngineConfig, StreamingEngine
from calm_rt.live.forecast_calibration import ForecastCalibration
from calm_rt.model import CalM

__all__ = ["replay_session"]


def replay_session(
    session: Session,
    model: CalM,
    out: str | os.PathLike[str] | None = None,
    realtime: bool = False,
    horizon: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    calibration: ForecastCalibration | None = None,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """Run ``session`` through a fresh engine; optionally write the results to ``out``.

    With ``realtime=True`` frames are paced at the session's frame rate (as a
    scope would deliver them); otherwise as fast as possible. ``device``:
    where the engine runs (``cpu``, ``cuda``, or ``auto``: a CUDA GPU when
    torch sees one); the model is moved there.

    Returns arrays: ``forecast`` / ``forecast_std`` ``[N, T, H]``, ``activity``
    ``[N, T]`` (normalised), ``tokens`` ``[N, T]``, ``step_ms`` ``[T]`` and,
    when the model decodes behaviour, ``behavior_pred`` ``[T, B]``.
    """
    session = validate_session(session)
    n, t = session.n_neurons, session.n_frames
    engine = StreamingEngine(
        model,
        EngineConfig(
            n_neurons=n, fps=session.fps, kind=session.kind, horizon=horizon, device=device
        ),
    )
    engine.set_forecast_calibration(calibration)
    h = engine.horizon
    forecast = np.empty((n, t, h), np.float32)
    spread = np.empty((n, t, h), np.float32)
    activity = np.empty((n, t), np.float32)
    tokens = np.empty((n, t), np.int16)
    step_ms = np.empty(t, np.float32)
    behavior = None
    period = 1.0 / session.fps
    start = time.perf_counter()
    for i in range(t):
        if realtime:
            delay = start + i * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        npil = None if session.neuropil is None else session.neuropil[:, i]
        pred = engine.step(session.traces[:, i], seq=i, neuropil=npil)
        forecast[:, i], spread[:, i], activity[:, i] = (
            pred.forecast,
            pred.forecast_std,
            pred.activity,
        )
        tokens[:, i] = pred.tokens
        step_ms[i] = pred.timings_ms["total"]
        if pred.behavior is not None:
            if behavior is None:
                behavior = np.full((t, pred.behavior.shape[0]), np.nan, np.float32)
            behavior[i] = pred.behavior
        if progress is not None and (i + 1) % 100 == 0:
            progress(i + 1, t)
    result = {
        "forecast": forecast,
        "forecast_std": spread,
        "activity": activity,
        "tokens": tokens,
        "step_ms": step_ms,
    }
    if behavior is not None:
        result["behavior_pred"] = behavior
    if out is not None:
        _write(Path(out), session, result, model)
    return result


def _write(path: Path, session: Session, result: dict[str, np.ndarray], model: CalM) -> None:
    arrays: dict[str, np.ndarray] = {
        "traces": session.traces,
        "fps": np.float64(session.fps),
        "kind": np.str_(session.kind),
        "animal_id": np.str_(session.animal_id),
        "session_id": np.str_(session.session_id),
        "horizon": np.int64(result["forecast"].shape[-1]),
        **result,
    }
    if session.behavior is not None:
        arrays["behavior"] = session.behavior
        arrays["behavior_names"] = np.array(session.behavior_names, dtype=np.str_)
    if model.config.behavior_names:
        arrays["behavior_pred_names"] = np.array(model.config.behavior_names, dtype=np.str_)
    if session.neuropil is not None:
        arrays["neuropil"] = session.neuropil
    if session.neuron_ids is not None:
        arrays["neuron_ids"] = np.array(session.neuron_ids, dtype=np.str_)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
