"""Open session files (``.npz``) and recordings (``.h5``) replayed through the model, to scrub in time.

A file that already holds a replay (written by :func:`calm_rt.offline.replay.replay_session`:
``forecast``, ``forecast_std``, ``activity``) is shown as it is; any other
session or recording is replayed frame by frame through the streaming engine
with the shipped default checkpoint first (exactly what the live system would
have answered; about a second per thousand frames of 256 neurons on 2 cores).

Every layer has the frame axis first, so napari's time slider scrubs them all
together. At frame ``t`` (``W`` frames of context, ``H`` of horizon)::

    activity     [T, N, W + H]   frames t-W+1 .. t (the past) then t+1 .. t+H (what happened)
    forecast     [T, N, H]       what the model predicted at t for t+1 .. t+H, drawn under the
                                 actual future, so the two can be compared by eye
    forecast s.d. [T, N, H]      its predictive spread (hidden at first)
    decoded behaviour [T, B, W]  when the model decodes behaviour

The windows are strided views: no copy of the recording is made per frame.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["get_reader", "layers_from_replay", "read_replayed"]

CONTEXT = 48  # frames of past shown left of "now" (the peer protocol's context length)
_REPLAY_KEYS = ("forecast", "forecast_std", "activity")

LayerData = tuple[Any, dict[str, Any], str]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader hook: a reader for calm-rt sessions and recordings, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".npz" and p.is_file():
        try:
            with zipfile.ZipFile(p) as z:
                names = {Path(n).stem for n in z.namelist()}
        except (OSError, zipfile.BadZipFile):
            return None
        return read_layers if {"traces", "fps"} <= names else None
    if suffix in (".h5", ".hdf5") and p.is_file():
        import h5py

        from calm_rt.serve.recording import FORMAT

        try:
            with h5py.File(p, "r") as f:
                ok = f.attrs.get("format") == FORMAT
        except OSError:
            return None
        return read_layers if ok else None
    return None


def read_layers(path: str | list[str]) -> list[LayerData]:
    """napari reader: layers of one session file or recording."""
    p = Path(path[0] if isinstance(path, list) else path)
    return layers_from_replay(read_replayed(p), name=p.stem)


def _load_model() -> Any:
    from calm_rt.model import load_checkpoint

    model, _ = load_checkpoint()
    return model


def read_replayed(path: str | Path) -> dict[str, Any]:
    """The session at ``path`` with the engine's per-frame outputs (replaying it if needed).

    Returns ``activity`` ``[N, T]``, ``forecast``/``forecast_std`` ``[N, T, H]``,
    ``fps``, and when known ``behavior_pred`` ``[T, B]`` with
    ``behavior_pred_names``.
    """
    p = Path(path)
    if p.suffix.lower() == ".npz":
        with np.load(p, allow_pickle=False) as z:
            if all(k in z for k in _REPLAY_KEYS):
                out: dict[str, Any] = {k: np.asarray(z[k], np.float32) for k in _REPLAY_KEYS}
                out["fps"] = float(z["fps"])
                if "behavior_pred" in z:
                    out["behavior_pred"] = np.asarray(z["behavior_pred"], np.float32)
                    names = z["behavior_pred_names"] if "behavior_pred_names" in z else ()
                    out["behavior_pred_names"] = tuple(str(n) for n in names)
                _check_replay(out, p)
                return out
        from calm_rt.data import load_session

        session = load_session(p)
    else:
        from calm_rt.serve.recording import read_recording

        session = read_recording(p)
    return _replay(session)


def _check_replay(out: dict[str, Any], path: Path) -> None:
    from calm_rt.errors import DataError

    n, t = out["activity"].shape
    for key in ("forecast", "forecast_std"):
        if out[key].ndim != 3 or out[key].shape[:2] != (n, t):
            raise DataError(
                f"{key} has shape {out[key].shape}, expected [N={n}, T={t}, H] like activity; "
                "replay the session again with calm_rt.offline.replay.replay_session",
                path=str(path),
            )


def _replay(session: Any) -> dict[str, Any]:
    from napari.utils import progress

    from calm_rt.offline.replay import replay_session

    model = _load_model()
    with progress(
        total=session.n_frames, desc=f"replaying {session.session_id or 'session'}"
    ) as bar:

        def advance(done: int, total: int) -> None:
            bar.update(done - bar.n)

        result = replay_session(session, model, progress=advance)
    out: dict[str, Any] = {k: result[k] for k in _REPLAY_KEYS}
    out["fps"] = float(session.fps)
    if "behavior_pred" in result:
        out["behavior_pred"] = result["behavior_pred"]
        out["behavior_pred_names"] = tuple(model.config.behavior_names)
    return out


def _windows(x: np.ndarray, before: int, after: int) -> np.ndarray:
    """``x [R, T]`` -> view ``[T, R, before + after]``: row t holds ``x[:, t-before+1 .. t+after]``."""
    padded = np.pad(x, ((0, 0), (before - 1, after)), constant_values=np.nan)
    view = np.lib.stride_tricks.sliding_window_view(padded, before + after, axis=1)  # [R, T, W+H]
    return view.transpose(1, 0, 2)


def _limits(x: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return 0.0, 1.0
    a, b = np.percentile(finite, [lo, hi])
    return float(a), float(max(b, a + 1e-6))


def layers_from_replay(data: dict[str, Any], name: str = "session") -> list[LayerData]:
    """Image layers sharing the frame axis (see the module docstring for the layout)."""
    activity = np.asarray(data["activity"], np.float32)  # [N, T]
    forecast = np.asarray(data["forecast"], np.float32)  # [N, T, H]
    spread = np.asarray(data["forecast_std"], np.float32)
    n, t = activity.shape
    h = forecast.shape[2]
    w = min(CONTEXT, t)
    gap = max(2, n // 20)
    sx = max(1.0, n / (w + h))  # keep the block roughly square however many neurons
    scale = (1.0, 1.0, sx)
    limits = _limits(activity, 1, 99.5)
    meta = {"fps": float(data["fps"]), "context": w, "horizon": h, "source": name}
    common = dict(scale=scale, axis_labels=("frame", "neuron", "time"), metadata=meta)
    layers: list[LayerData] = [
        (
            _windows(activity, w, h),
            dict(name=f"{name} activity", colormap="magma", contrast_limits=limits, **common),
            "image",
        ),
        (
            forecast.transpose(1, 0, 2),
            dict(
                name=f"{name} forecast",
                colormap="magma",
                contrast_limits=limits,
                translate=(0.0, n + gap, w * sx),
                **common,
            ),
            "image",
        ),
        (
            spread.transpose(1, 0, 2),
            dict(
                name=f"{name} forecast s.d.",
                colormap="viridis",
                contrast_limits=_limits(spread, 0, 99),
                translate=(0.0, 2 * (n + gap), w * sx),
                visible=False,
                **common,
            ),
            "image",
        ),
    ]
    beh = data.get("behavior_pred")
    if beh is not None:
        beh = np.asarray(beh, np.float32)  # [T, B]
        z = (beh - np.nanmean(beh, axis=0)) / (np.nanstd(beh, axis=0) + 1e-6)
        layers.append(
            (
                _windows(z.T, w, 0),
                dict(
                    name=f"{name} decoded behaviour",
                    colormap="twilight_shifted",
                    contrast_limits=(-3.0, 3.0),
                    translate=(0.0, -(beh.shape[1] + gap), 0.0),
                    **{
                        **common,
                        "metadata": {**meta, "names": data.get("behavior_pred_names", ())},
                    },
                ),
                "image",
            )
        )
    now = np.array([[-1.0, w - 0.5], [3 * (n + gap), w - 0.5]]) * (1.0, sx)
    layers.append(
        (
            [now],
            dict(
                name=f"{name} now",
                shape_type="line",
                edge_color="white",
                edge_width=max(1.0, n / 200),
                axis_labels=("neuron", "time"),
                metadata=meta,
            ),
            "shapes",
        )
    )
    return layers
