"""Evaluation: tokenizer quality, forecasting and behaviour decoding against baselines.

The forecasting protocol is POCO's (see :mod:`calm_rt.data.splits`): context 48
frames, horizon 16, score = 1 - MSE(model) / MSE(copy last frame), averaged
over sessions, plus MSE, MAE and Pearson r; test windows every 16 frames
inside test blocks. Baselines are fitted on the training blocks of the very
sessions they are scored on; CalM is scored as pretrained (zero-shot).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from calm_rt.data import Session
from calm_rt.data.splits import TEST, TRAIN, VAL, PreparedSession, Protocol
from calm_rt.errors import ConfigError, DataError
from calm_rt.live import RidgeReadout, r2_score
from calm_rt.model import CalM, frame_windows
from calm_rt.offline.baselines import windows_at

__all__ = ["evaluate", "tokenizer_report"]


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


def _group_of(session: Session, meta: dict[str, Any]) -> str:
    """How a session relates to the checkpoint's pretraining data."""
    data = (meta.get("pretraining") or {}).get("data") or {}
    animals, sessions = set(data.get("animal_ids", [])), set(data.get("session_ids", []))
    if session.session_id in sessions:
        return "seen_sessions"  # only its test blocks are scored: never trained on
    if session.animal_id in animals:
        return "heldout_sessions"
    return "heldout_animals"


def evaluate(
    model: CalM,
    meta: dict[str, Any],
    sessions: Sequence[PreparedSession],
    protocol: Protocol,
    forecasters: Sequence[Any] | None = None,
    decoders: Sequence[Any] | None = None,
    progress: Callable[[str], None] | None = None,
    batch: int = 16,
    adapt_steps: int = 0,
) -> dict[str, Any]:
    """Score CalM and the baselines on the test blocks of ``sessions``.

    With ``adapt_steps > 0`` CalM is first fine-tuned (next-token objective,
    tokenizer frozen) on the training blocks of ``sessions`` - the very data
    the baselines are fitted on - and reported as ``calm``; the pretrained
    model as it is becomes ``calm_zeroshot``. Otherwise ``calm`` is zero-shot.

    Returns the JSON of DESIGN.md (``context``, ``horizon``, ``fps``,
    ``sessions``, ``forecast``, ``decoding`` when behaviour exists) plus
    ``groups`` (held-out animals / sessions separately), ``calibration`` of
    CalM's forecast intervals and the ``tokenizer`` report.
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
    calm_models = {"calm": model}
    if adapt_steps > 0:
        from calm_rt.offline.train import adapt

        say(f"adapting CalM on training blocks ({adapt_steps} steps)")
        tuned = adapt(model, sessions, adapt_steps, progress=False)
        calm_models = {"calm": tuned, "calm_zeroshot": model}
    for f in forecasters:
        say(f"fitting {f.name} on training blocks")
        f.fit(sessions, protocol)

    per_session: list[dict[str, Any]] = []
    coverage: list[tuple[float, float]] = []
    for k in scored:
        s = sessions[k]
        starts = protocol.window_starts(s.labels, TEST)
        ctx, tgt = windows_at(s.z, starts, protocol.context, protocol.horizon)
        copy = ctx[..., -1:].expand_as(tgt).numpy()
        target = tgt.numpy()
        row: dict[str, Any] = {
            "session_id": s.session.session_id,
            "group": _group_of(s.session, meta),
        }
        for name, m in calm_models.items():
            means, stds = [], []
            for b0 in range(0, len(starts), batch):
                m_, s_ = m.forecast_windows(ctx[b0 : b0 + batch])
                means.append(m_[..., : protocol.horizon])
                stds.append(s_[..., : protocol.horizon])
            mean, std = torch.cat(means).numpy(), torch.cat(stds).numpy()
            row[name] = _forecast_metrics(mean, target, copy)
            if name == "calm":
                err = np.abs(target - mean)
                coverage.append((float((err <= std).mean()), float((err <= 1.645 * std).mean())))
        for f in forecasters:
            pred = torch.cat(
                [f.predict(k, ctx[b0 : b0 + batch]) for b0 in range(0, len(starts), batch)]
            )
            row[f.name] = _forecast_metrics(pred.numpy(), target, copy)
        per_session.append(row)
        say(f"forecast {s.session.session_id}: calm score {row['calm']['score']:.3f}")

    names = [*calm_models, *(f.name for f in forecasters)]
    result: dict[str, Any] = {
        "context": protocol.context,
        "horizon": protocol.horizon,
        "fps": float(np.median([sessions[k].session.fps for k in scored])),
        "sessions": len(scored),
        "forecast": {n: _mean_metrics([r[n] for r in per_session]) for n in names},
        "calibration": {
            "nominal_68": float(np.mean([c[0] for c in coverage])),
            "nominal_90": float(np.mean([c[1] for c in coverage])),
        },
        "tokenizer": tokenizer_report(model, [sessions[k] for k in scored]),
        "adapt_steps": adapt_steps,
        "groups": {},
        "per_session": per_session,
    }

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
            hidden = (
                calm_models["calm"].run_offline(torch.from_numpy(s.z)).hidden.transpose(0, 1)
            )  # [T, N, W]
            readout = RidgeReadout()
            readout.fit_projection(hidden[torch.from_numpy(s.labels == TRAIN)])
            readout.fit(readout.features(hidden), s.behavior, s.labels == TRAIN, s.labels == VAL)
            pred = readout.predict(hidden).numpy()
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
            "forecast": {n: _mean_metrics([r[n] for r in rows]) for n in names},
        }
        drows = [r for r in dec_rows if r["group"] == group]
        if drows:
            entry["decoding"] = {
                n: _mean_metrics([r[n] for r in drows if n in r]) for n in result["decoding"]
            }
        result["groups"][group] = entry
    return result
