"""Evaluation emits the contract's JSON, with every model, on simulated and real data."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from calm_rt.data import SimConfig, make_animal, simulate_session
from calm_rt.data.splits import TEST, TRAIN, VAL, Protocol, prepare_session
from calm_rt.model import PRESETS, CalM
from calm_rt.offline.baselines import (
    CopyLast,
    GRUDecoder,
    LinearAR,
    POCOForecaster,
    RidgeDecoder,
    windows_at,
)
from calm_rt.offline.evaluate import HORIZONS, evaluate, tokenizer_report
from calm_rt.offline.replay import replay_session

PROTOCOL = Protocol(block_frames=200)


@pytest.fixture(scope="module")
def sessions():
    cfg = SimConfig(neurons=20, frames=1200, seed=9)
    return [
        prepare_session(simulate_session(cfg, make_animal(cfg, a), 0)[0], PROTOCOL)
        for a in range(2)
    ]


def test_protocol_splits_blocks_in_turn():
    labels = Protocol(context=4, horizon=2, block_frames=10).labels(60)
    assert labels[:50].reshape(5, 10)[:, 0].tolist() == [TRAIN, TRAIN, TRAIN, VAL, TEST]
    starts = Protocol(context=4, horizon=2, block_frames=10, stride=2).window_starts(labels, TEST)
    assert starts.tolist() == [40, 42, 44]  # windows never cross a block boundary


def test_offline_normalisation_is_the_engines(sessions):
    """One normalisation: prepare_session's z is what the streaming engine publishes as activity."""
    s = sessions[0]
    replay = replay_session(s.session, CalM(PRESETS["tiny"]).eval(), horizon=4)
    np.testing.assert_array_equal(replay["activity"], s.z)


def test_baselines_beat_or_match_copy_last_where_they_should(sessions):
    lin = LinearAR()
    lin.fit(sessions, PROTOCOL)
    s = sessions[0]
    ctx, tgt = windows_at(
        s.z, PROTOCOL.window_starts(s.labels, TEST), PROTOCOL.context, PROTOCOL.horizon
    )
    copy = CopyLast()
    copy.fit(sessions, PROTOCOL)
    mse_copy = float(((copy.predict(0, ctx) - tgt) ** 2).mean())
    mse_lin = float(((lin.predict(0, ctx) - tgt) ** 2).mean())
    assert mse_lin < mse_copy  # noisy calcium: a fitted linear model beats copying the last frame


def test_evaluate_emits_the_full_json(sessions):
    torch.manual_seed(0)
    model = CalM(PRESETS["tiny"]).eval()
    meta = {
        "pretraining": {"data": {"animal_ids": [sessions[0].session.animal_id], "session_ids": []}}
    }
    result = evaluate(
        model, meta, sessions, PROTOCOL,
        forecasters=[CopyLast(), LinearAR(), POCOForecaster(steps=30, runs=2)],
        decoders=[RidgeDecoder(), GRUDecoder(steps=20)],
    )  # fmt: skip
    assert result["context"] == 48 and result["horizon"] == 16 and result["sessions"] == 2
    assert result["fps"] == 30.0
    forecast = result["forecast"]
    assert set(forecast) == {
        "calm", "calm_zeroshot", "calm_tokens", "calm_live", "copy_last", "linear_ar", "poco_mlp"
    }  # fmt: skip
    # Zero-shot is the continuous head's forecast, the token forecast its own row.
    assert forecast["calm_zeroshot"]["score"] != forecast["calm_tokens"]["score"]
    for name, metrics in forecast.items():
        assert {"score", "mse", "mae", "pearson", "mse_by_horizon"} <= set(metrics), name
        assert list(metrics["mse_by_horizon"]) == [str(h) for h in HORIZONS]
        assert all(np.isfinite(v) for v in metrics["mse_by_horizon"].values())
    # Copy-last is the score's reference (0 by definition); its error must grow with the
    # horizon on autocorrelated activity, or the horizons are mis-indexed.
    copy_mse = forecast["copy_last"]["mse_by_horizon"]
    assert copy_mse["1"] < copy_mse["4"] < copy_mse["16"]
    # Two POCO runs (seeds 0 and 1) are two models, scored apart and averaged.
    poco = forecast["poco_mlp"]
    assert poco["runs"] == 2 and poco["score_min"] < poco["score_max"]
    assert poco["score_min"] <= poco["score"] <= poco["score_max"]
    # What the engine published, replayed frame by frame, is what eval scores as calm.
    assert result["live_max_abs_diff"] < 1e-3
    assert forecast["calm_live"]["score"] == pytest.approx(forecast["calm"]["score"], abs=1e-3)
    assert -1 < forecast["calm"]["calibration_cv_gain"] < 1
    assert set(result["calibration"]["by_horizon"]) == {str(h) for h in HORIZONS}
    assert {"calm_ridge", "ridge", "gru"} <= set(result["decoding"])
    assert set(result["groups"]) == {"heldout_sessions", "heldout_animals"}
    assert 0 <= result["calibration"]["nominal_90"] <= 1
    zeroshot = result["calibration_zeroshot"]
    assert set(zeroshot["by_horizon"]) == {str(h) for h in HORIZONS}
    assert 0 <= zeroshot["nominal_68"] <= zeroshot["nominal_90"] <= 1
    json.dumps(result)  # serialisable as is


def test_tokenizer_report_counts_codes(sessions):
    torch.manual_seed(0)
    report = tokenizer_report(CalM(PRESETS["tiny"]).eval(), sessions)
    assert 0 < report["codes_used"] <= 1 and report["perplexity"] >= 1


@pytest.mark.slow
def test_eval_cli_on_real_zebrafish_regions(shared_data, tmp_path):
    """Real data, the shipped checkpoint: it runs and reports every model (numbers are whatever they are)."""
    out = tmp_path / "zf.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "calm_rt", "eval", "--data", str(shared_data / "zebrafish_legare"),
            "--fps", "1", "--block-frames", "150", "--poco-steps", "60", "--poco-runs", "1",
            "--head-steps", "100",
            "--json", str(out),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["forecast"]) >= {"calm", "copy_last", "linear_ar", "poco_mlp"}
    assert result["sessions"] == 1 and "decoding" not in result


def test_eval_cli_refuses_negative_head_steps(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "calm_rt", "eval", "--data", str(tmp_path), "--json",
         str(tmp_path / "x.json"), "--head-steps", "-1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "--head-steps must be >= 0" in proc.stderr
    assert not (tmp_path / "x.json").exists()
