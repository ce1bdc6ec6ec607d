"""Evaluation: tokenizer quality, forecasting and behaviour decoding against baselines.

The forecasting protocol is POCO's (see :mod:`calm_rt.data.splits`): context 48
frames, horizon 16, score = 1 - MSE(model) / MSE(copy last frame), averaged
over sessions, plus MSE, MAE and Pearson r; test windows every 16 frames
inside test blocks. Baselines are fitted on the training blocks of the very
sessions they are scored on; so is CalM's forecast calibration (ridge + continuous head)
(``calm``), beside the pretrained model as it is (``calm_zeroshot``) and the
streaming engine's own published forecasts (``calm_live``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from calm_rt.data import Session
from calm_rt.data.splits import TEST, TRAIN, VAL, PreparedSession, Protocol
from calm_rt.errors import ConfigError, DataError
from calm_rt.live import RidgeReadout, r2_score
from calm_rt.live.engine import HISTORY
from calm_rt.live.forecast_calibration import (
    ForecastCalibration,
    HiddenProjection,
    calm_forecast_features,
)
from calm_rt.live.readout import lagged_activity
from calm_rt.model import CalM, OfflineOutput, frame_windows
from calm_rt.offline.baselines import dense_window_starts, windows_at
from calm_rt.offline.replay import replay_session

__all__ = ["HORIZONS", "CalmForecasts", "calibrate_forecasts", "evaluate", "tokenizer_report"]


@torch.no_grad()
def tokenizer_report(
    model: CalM, sessions: list[PreparedSession], split: int = TEST
) -> dict[str, float]:
    """Reconstruction and codebook usage of the tokenizer on frames of ``split``.

    Each neuron's trace is cut into non-overlapping windows of P frames,
    tokenised and decoded through the code table; Pearson r between the
    reconstruction and the input is taken per neuron (neurons with no
    variance in the split are skipped).
    """
    tok = model.tokenizer
    p = model.config.patch
    table = tok.decode_table()
    k = table.shape[0]
    counts = torch.zeros(k)
    rs, mses, variances = [], [], []
    for s in sessions:
        z = torch.from_numpy(np.nan_to_num(s.z, nan=0.0))
        frames = np.flatnonzero(s.labels == split)
        if frames.size < p:
            continue
        ends = frames[p - 1 :: p]
        ends = ends[ends - (p - 1) >= frames[0]]
        windows = frame_windows(z, p)[:, ends]  # [N, W, P]
        ids = tok.tokenize_windows(windows.reshape(-1, p)).view(windows.shape[:2])
        counts += torch.bincount(ids.flatten(), minlength=k).float()
        recon = table[ids].flatten(1).numpy()  # [N, W * P]
        target = windows.flatten(1).numpy()
        mses.append(float(((recon - target) ** 2).mean()))
        variances.append(float(target.var()))
        for a, b in zip(recon, target):
            if b.std() > 1e-6 and a.std() > 1e-9:
                rs.append(float(np.corrcoef(a, b)[0, 1]))
    prob = counts / counts.sum().clamp_min(1)
    nz = prob[prob > 0]
    return {
        "recon_pearson_median": float(np.median(rs)) if rs else float("nan"),
        "recon_pearson_mean": float(np.mean(rs)) if rs else float("nan"),
        "recon_mse": float(np.mean(mses)) if mses else float("nan"),
        "recon_relative_mse": float(np.mean(mses) / np.mean(variances)) if mses else float("nan"),
        "perplexity": float(torch.exp(-(nz * nz.log()).sum())),
        "codes_used": float((counts > 0).float().mean()),
    }


# ---------------------------------------------------------------------------
# Forecasting and decoding


def _forecast_metrics(pred: np.ndarray, target: np.ndarray, copy: np.ndarray) -> dict[str, float]:
    mse = float(((pred - target) ** 2).mean())
    mse_copy = float(((copy - target) ** 2).mean())
    p, t = pred.ravel(), target.ravel()
    pearson = float(np.corrcoef(p, t)[0, 1]) if p.std() > 0 and t.std() > 0 else 0.0
    return {
        "score": 1.0 - mse / max(mse_copy, 1e-12),
        "mse": mse,
        "mae": float(np.abs(pred - target).mean()),
        "pearson": pearson,
    }


def _mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def _mean_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over sessions of flat metrics and of per-horizon dicts."""
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        if isinstance(value, dict):
            out[key] = _mean_metrics([r[key] for r in rows])
        else:
            out[key] = float(np.mean([r[key] for r in rows]))
    return out


def _group_of(session: Session, meta: dict[str, Any]) -> str:
    """How a session relates to the checkpoint's pretraining data."""
    data = (meta.get("pretraining") or {}).get("data") or {}
    animals, sessions = set(data.get("animal_ids", [])), set(data.get("session_ids", []))
    if session.session_id in sessions:
        return "seen_sessions"  # only its test blocks are scored: never trained on
    if session.animal_id in animals:
        return "heldout_sessions"
    return "heldout_animals"


HORIZONS = (1, 4, 8, 16)  # frames ahead reported separately (h = 1 is the next frame)


def _by_horizon(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """MSE at each of :data:`HORIZONS` that the forecast reaches (``[..., H]`` inputs)."""
    err = ((pred - target) ** 2).reshape(-1, target.shape[-1]).mean(0)
    return {str(h): float(err[h - 1]) for h in HORIZONS if h <= target.shape[-1]}


def _coverage(mean: np.ndarray, sd: np.ndarray, target: np.ndarray) -> dict[str, dict[str, float]]:
    """Interval coverage at +-1 and +-1.645 s.d. and s.d./RMSE, per horizon of :data:`HORIZONS`."""
    err = np.abs(target - mean).reshape(-1, target.shape[-1])
    sd = sd.reshape(-1, target.shape[-1])
    out = {}
    for h in HORIZONS:
        if h <= target.shape[-1]:
            e, s_ = err[:, h - 1], sd[:, h - 1]
            out[str(h)] = {
                "nominal_68": float((e <= s_).mean()),
                "nominal_90": float((e <= 1.645 * s_).mean()),
                "sd_over_rmse": float(s_.mean() / max(np.sqrt((e**2).mean()), 1e-12)),
            }
    return out


def _intervals(mean: np.ndarray, sd: np.ndarray, target: np.ndarray) -> dict[str, Any]:
    """Pooled coverage at +-1 and +-1.645 s.d., and per horizon (:func:`_coverage`)."""
    err = np.abs(target - mean)
    return {
        "nominal_68": float((err <= sd).mean()),
        "nominal_90": float((err <= 1.645 * sd).mean()),
        "by_horizon": _coverage(mean, sd, target),
    }


@dataclass
class CalmForecasts:
    """CalM's outputs on one session: the whole-recording pass and its calibration."""

    offline: OfflineOutput  # run_offline over the whole session
    calibration: ForecastCalibration  # fitted on training blocks, penalty and s.d. on validation
    projection: HiddenProjection


MAX_FIT_WINDOWS = 4096  # per session: [N, S, F] float64 design matrices stay within memory


def calibrate_forecasts(
    model: CalM, s: PreparedSession, protocol: Protocol, head_steps: int = 2000
) -> CalmForecasts:
    """Run CalM over the session (causal, as the engine does) and fit its forecast calibration.

    Fitted on the windows ending at every frame inside training blocks (every
    k-th when there are more than 2 * ``MAX_FIT_WINDOWS``, to bound memory);
    the ridge penalty, the continuous head's early stopping, the blend weight
    and the s.d. model are chosen on the windows ending at every frame of the
    validation blocks (the test stride would leave a 150-frame block six).
    """
    out = model.run_offline(torch.from_numpy(s.z))
    h = protocol.horizon
    dense = dense_window_starts(s.labels, TRAIN, protocol)
    fit_ends = dense[:: max(1, dense.size // MAX_FIT_WINDOWS)] + protocol.context - 1
    val_ends = dense_window_starts(s.labels, VAL, protocol) + protocol.context - 1
    sample = fit_ends[:: max(1, fit_ends.size // 256)]
    projection = HiddenProjection.fit(out.hidden[:, sample])
    calibration = ForecastCalibration.fit(
        s.z,
        _calm_features(model, out.forecast, out.token_forecast, h),
        out.forecast_std[..., :h],
        projection(out.hidden),
        projection,
        fit_ends,
        val_ends,
        context=protocol.context,
        head_steps=head_steps,
    )
    return CalmForecasts(out, calibration, projection)


def _calm_features(
    model: CalM, mean: torch.Tensor, token_mean: torch.Tensor, h: int
) -> torch.Tensor:
    """:func:`calm_forecast_features` of a model's outputs (the tokens' apart only beside a head)."""
    return calm_forecast_features(mean, token_mean if model.forecast_head is not None else None, h)


def _score_runs(
    f: Any, k: int, ctx: torch.Tensor, target: np.ndarray, copy: np.ndarray, batch: int
) -> dict[str, Any]:
    """A baseline's metrics on session ``k``; for one with several training runs
    (``predict_runs``), the mean over runs and ``score_min`` / ``score_max``."""
    runs = getattr(f, "predict_runs", lambda k_, c: [f.predict(k_, c)])
    chunks = [runs(k, ctx[b0 : b0 + batch]) for b0 in range(0, ctx.shape[0], batch)]
    rows = []
    for r in range(len(chunks[0])):
        pred = torch.cat([c[r] for c in chunks]).numpy()
        rows.append(
            {**_forecast_metrics(pred, target, copy), "mse_by_horizon": _by_horizon(pred, target)}
        )
    out = _mean_rows(rows)
    if len(rows) > 1:
        out["runs"] = float(len(rows))
        out["score_min"] = min(r["score"] for r in rows)
        out["score_max"] = max(r["score"] for r in rows)
    return out


def evaluate(
    model: CalM,
    meta: dict[str, Any],
    sessions: Sequence[PreparedSession],
    protocol: Protocol,
    forecasters: Sequence[Any] | None = None,
    decoders: Sequence[Any] | None = None,
    progress: Callable[[str], None] | None = None,
    batch: int = 16,
    live: bool = True,
    head_steps: int = 2000,
) -> dict[str, Any]:
    """Score CalM and the baselines on the test blocks of ``sessions``.

    Rows: ``calm`` is CalM with its forecast calibration (ridge + continuous head) fitted
    on the training blocks (the data the baselines are fitted on, penalty on
    validation blocks; :mod:`calm_rt.live.forecast_calibration`);
    ``calm_zeroshot`` the pretrained model's own forecast (its continuous
    head's; ``calm_tokens`` the token forecast beside it); with
    ``live``, ``calm_live`` replays each session frame by frame through the
    streaming engine with that calibration installed and scores what the
    engine published (``live_max_abs_diff`` says how far it is from ``calm``).

    Returns the JSON of DESIGN.md (``context``, ``horizon``, ``fps``,
    ``sessions``, ``forecast`` with ``mse_by_horizon`` per model,
    ``decoding`` when behaviour exists) plus ``groups`` (held-out animals /
    sessions separately), ``calibration`` (interval coverage of ``calm``,
    pooled and per horizon; ``calibration_zeroshot`` the same of
    ``calm_zeroshot`` with the model's own s.d.) and the ``tokenizer`` report.
    """
    from calm_rt.offline.baselines import (
        CopyLast,
        GRUDecoder,
        LinearAR,
        POCOForecaster,
        RidgeDecoder,
    )

    say = progress or (lambda _msg: None)
    if model.config.horizon_frames < protocol.horizon:
        raise ConfigError(
            f"the model forecasts {model.config.horizon_frames} frames but the protocol asks for "
            f"{protocol.horizon}; use --horizon {model.config.horizon_frames} or less"
        )
    if protocol.context > HISTORY:
        raise ConfigError(
            f"the engine keeps {HISTORY} frames of context for its forecast calibration; "
            f"use --context {HISTORY} or less"
        )
    scored = [k for k, s in enumerate(sessions) if protocol.window_starts(s.labels, TEST).size]
    if not scored:
        raise DataError(
            f"no session has a test block with a full window of {protocol.context + protocol.horizon} "
            f"frames (blocks of {protocol.block_frames}, pattern {protocol.pattern}); "
            "use longer sessions or a smaller --block-frames"
        )
    forecasters = (
        list(forecasters) if forecasters is not None else [CopyLast(), LinearAR(), POCOForecaster()]
    )
    for f in forecasters:
        say(f"fitting {f.name} on training blocks")
        f.fit(sessions, protocol)

    h = protocol.horizon
    per_session: list[dict[str, Any]] = []
    calm_of: dict[int, CalmForecasts] = {}
    pooled: dict[str, list[np.ndarray]] = {
        "mean": [], "sd": [], "target": [], "zeroshot": [], "zeroshot_sd": []
    }  # fmt: skip
    live_diff = 0.0
    for k in scored:
        s = sessions[k]
        starts = protocol.window_starts(s.labels, TEST)
        ends = starts + protocol.context - 1
        ctx, tgt = windows_at(s.z, starts, protocol.context, h)
        copy = ctx[..., -1:].expand_as(tgt).numpy()
        target = tgt.numpy()
        row: dict[str, Any] = {
            "session_id": s.session.session_id,
            "group": _group_of(s.session, meta),
        }
        say(f"CalM over {s.session.session_id} and its forecast calibration")
        calm = calm_of[k] = calibrate_forecasts(model, s, protocol, head_steps)
        e = torch.from_numpy(ends)
        off = calm.offline
        zeroshot = off.forecast[:, e, :h].transpose(0, 1)  # [B, N, H]
        features = _calm_features(model, off.forecast[:, e], off.token_forecast[:, e], h)
        mean, sd = calm.calibration.predict(
            ctx,
            features.transpose(0, 1),
            off.forecast_std[:, e, :h].transpose(0, 1),
            off.hidden[:, e].transpose(0, 1),
        )
        outputs = {"calm": mean.numpy(), "calm_zeroshot": zeroshot.numpy()}
        if model.forecast_head is not None:  # what the tokens alone say (the paper's forecast)
            outputs["calm_tokens"] = off.token_forecast[:, e, :h].transpose(0, 1).numpy()
        pooled["mean"].append(outputs["calm"])
        pooled["sd"].append(sd.numpy())
        pooled["target"].append(target)
        pooled["zeroshot"].append(outputs["calm_zeroshot"])
        pooled["zeroshot_sd"].append(off.forecast_std[:, e, :h].transpose(0, 1).numpy())
        if live:
            say(f"replaying {s.session.session_id} through the streaming engine")
            replay = replay_session(s.session, model, horizon=h, calibration=calm.calibration)
            outputs["calm_live"] = replay["forecast"][:, ends].transpose(1, 0, 2)
            live_diff = max(live_diff, float(np.abs(outputs["calm_live"] - outputs["calm"]).max()))
        for name, pred in outputs.items():
            row[name] = _forecast_metrics(pred, target, copy)
            row[name]["mse_by_horizon"] = _by_horizon(pred, target)
        row["calm"]["calibration_cv_gain"] = calm.calibration.cv_gain
        row["calm"]["head_weight"] = calm.calibration.head_weight  # 0: the ridge alone
        for f in forecasters:
            row[f.name] = _score_runs(f, k, ctx, target, copy, batch)
        per_session.append(row)
        say(
            f"forecast {s.session.session_id}: calm {row['calm']['score']:.3f}, "
            f"zero-shot {row['calm_zeroshot']['score']:.3f}"
        )

    names = [
        "calm",
        "calm_zeroshot",
        *(["calm_tokens"] if model.forecast_head is not None else []),
        *(["calm_live"] if live else []),
        *(f.name for f in forecasters),
    ]
    every = {key: np.concatenate([a.reshape(-1, h) for a in rows]) for key, rows in pooled.items()}
    result: dict[str, Any] = {
        "context": protocol.context,
        "horizon": protocol.horizon,
        "fps": float(np.median([sessions[k].session.fps for k in scored])),
        "sessions": len(scored),
        "forecast": {n: _mean_rows([r[n] for r in per_session]) for n in names},
        "calibration": _intervals(every["mean"], every["sd"], every["target"]),
        # What an uncalibrated engine publishes: the continuous head's learned s.d.
        "calibration_zeroshot": _intervals(
            every["zeroshot"], every["zeroshot_sd"], every["target"]
        ),
        "tokenizer": tokenizer_report(model, [sessions[k] for k in scored]),
        "groups": {},
        "per_session": per_session,
    }
    if live:
        result["live_max_abs_diff"] = live_diff

    # -- behaviour decoding ---------------------------------------------------
    with_beh = [k for k in scored if sessions[k].behavior is not None]
    dec_rows: list[dict[str, Any]] = []
    if with_beh:
        decoders = list(decoders) if decoders is not None else [RidgeDecoder(), GRUDecoder()]
        for k in with_beh:
            s = sessions[k]
            test = s.labels == TEST
            say(f"decoding {s.session.session_id}")
            row = {"session_id": s.session.session_id, "group": _group_of(s.session, meta)}
            hidden = calm_of[k].offline.hidden.transpose(0, 1)  # [T, N, W]
            readout = RidgeReadout()
            forecast = calm_of[k].offline.forecast.transpose(0, 1)  # [T, N, H]
            features = readout.features(forecast, lagged_activity(s.z), hidden)
            readout.fit(features, s.behavior, s.labels == TRAIN, s.labels == VAL)
            pred = readout.model.predict(features).float().numpy()
            row["calm_ridge"] = {"r2": float(r2_score(pred[test], s.behavior[test]).mean())}
            if model.behavior_head is not None and tuple(model.config.behavior_names) == tuple(
                s.session.behavior_names
            ):
                with torch.no_grad():
                    head = model.behavior_head(hidden) * model.behavior_std + model.behavior_mean
                row["calm"] = {"r2": float(r2_score(head.numpy()[test], s.behavior[test]).mean())}
            for d in decoders:
                row[d.name] = {
                    "r2": float(r2_score(d.fit_predict(s)[test], s.behavior[test]).mean())
                }
            dec_rows.append(row)
        dec_names = [n for n in dec_rows[0] if n not in ("session_id", "group")]
        result["decoding"] = {
            n: _mean_metrics([r[n] for r in dec_rows if n in r]) for n in dec_names
        }
        result["per_session_decoding"] = dec_rows

    for group in ("heldout_animals", "heldout_sessions", "seen_sessions"):
        rows = [r for r in per_session if r["group"] == group]
        if not rows:
            continue
        entry: dict[str, Any] = {
            "sessions": len(rows),
            "forecast": {n: _mean_rows([r[n] for r in rows]) for n in names},
        }
        drows = [r for r in dec_rows if r["group"] == group]
        if drows:
            entry["decoding"] = {
                n: _mean_metrics([r[n] for r in drows if n in r]) for n in result["decoding"]
            }
        result["groups"][group] = entry
    return result
