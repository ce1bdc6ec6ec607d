"""Pretraining and fine-tuning: losses fall, runs are deterministic and resumable, DDP works."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from calm_rt.data import SimConfig, make_animal, simulate_corpus, simulate_session
from calm_rt.data.splits import Protocol, prepare_session
from calm_rt.model import load_checkpoint
from calm_rt.offline.finetune import FinetuneConfig, finetune_behavior
from calm_rt.offline.train import TrainConfig, pretrain

PROTOCOL = Protocol(block_frames=200)
FAST = TrainConfig(
    tokenizer_steps=120, dat_steps=80, tokenizer_batch=512, dat_batch=4, max_neurons=16,
    seq_tokens=16, save_every=40, restart_every=40, warmup_steps=10,
)  # fmt: skip


@pytest.fixture(scope="module")
def sessions():
    cfg = SimConfig(neurons=24, frames=1500, seed=7)
    return [
        prepare_session(simulate_session(cfg, make_animal(cfg, a), s)[0], PROTOCOL)
        for a in range(2)
        for s in range(2)
    ]


def _history(folder):
    return json.loads((folder / "train_state.json").read_text())["history"]


def test_pretraining_lowers_both_losses(sessions, tmp_path):
    pretrain(sessions, tmp_path / "run", "tiny", FAST, progress=False)
    hist = _history(tmp_path / "run")
    tok = [h["loss"] for h in hist if h["stage"] == "tokenizer"]
    dat = [h["next_token_ce"] for h in hist if h["stage"] == "dat"]
    assert tok[-1] < 0.8 * tok[0]
    assert dat[-1] < dat[0]
    # The next-token loss beats a uniform guess over the codebook by a margin.
    assert dat[-1] < 0.9 * torch.log(torch.tensor(64.0)).item()
    # The continuous head learns to forecast: better than copying the last frame.
    score = [h["forecast_score"] for h in hist if h["stage"] == "dat"]
    assert score[-1] > score[0] and score[-1] > 0.0, score
    _, meta = load_checkpoint(tmp_path / "run")
    assert meta["pretraining"]["tokenizer_final"]["codes_used"] > 0.3


class _Killed(Exception):
    """Stands for the process dying (power cut, OOM kill) right after a save."""


@pytest.mark.parametrize("stage", ["tokenizer", "dat"])
def test_resumed_run_equals_uninterrupted_run(sessions, tmp_path, monkeypatch, stage):
    import calm_rt.offline.train as train

    straight = pretrain(sessions, tmp_path / "a", "tiny", FAST, progress=False)
    write_state = train._write_state

    def write_then_die(out, state):
        write_state(out, state)
        if state["stage"] == stage and state["step"] == 40:
            raise _Killed

    monkeypatch.setattr(train, "_write_state", write_then_die)
    with pytest.raises(_Killed):
        pretrain(sessions, tmp_path / "b", "tiny", FAST, progress=False)
    monkeypatch.setattr(train, "_write_state", write_state)
    resumed = pretrain(sessions, tmp_path / "b", "tiny", FAST, progress=False)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=f"{name} differs after resume")


def test_finetuned_head_decodes_behaviour(sessions, tmp_path):
    model = pretrain(sessions, tmp_path / "run", "tiny", FAST, progress=False)
    tuned = finetune_behavior(
        model,
        sessions,
        sessions[0].session.behavior_names,
        FinetuneConfig(steps=150),
        progress=False,
    )
    assert tuned.behavior_head is not None
    s = sessions[0]
    out = tuned.run_offline(torch.from_numpy(s.z))
    assert out.behavior is not None and out.behavior.shape == (s.session.n_frames, 3)
    # Running speed is decoded better than its mean on held-back frames.
    from calm_rt.data.splits import TEST
    from calm_rt.live import r2_score

    test = s.labels == TEST
    r2 = r2_score(out.behavior.numpy()[test], s.behavior[test])
    assert r2[0] > 0.1, r2


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    data = tmp_path / "corpus"
    simulate_corpus(SimConfig(animals=2, sessions=1, neurons=16, frames=1200, seed=3), data)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "calm_rt", "pretrain", "--data", str(data), "--out", str(tmp_path / "ckpt"), "--preset", "tiny",
        "--tokenizer-steps", "30", "--dat-steps", "20", "--block-frames", "200", "--quiet",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((tmp_path / "ckpt" / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["stage"] == "done"
    model, _ = load_checkpoint(tmp_path / "ckpt")
    assert model.run_offline(torch.zeros(4, 40)).forecast.shape == (4, 40, 16)


def test_dat_batches_draw_neuron_subsets_of_many_sizes(sessions):
    # Neural attention must meet the population sizes it runs on live, so each batch
    # draws its own subset size (log-uniform in [min_neurons, max_neurons]).
    import numpy as np

    import calm_rt.offline.train as train
    from calm_rt.model import PRESETS

    cfg = TrainConfig(dat_batch=2, min_neurons=4, max_neurons=24, seq_tokens=8)
    model_cfg = PRESETS["tiny"]
    ends = [train._train_window_ends(s, train._dat_span(cfg, model_cfg)) for s in sessions]
    tokens = [np.zeros((s.n_neurons, s.z.shape[1]), np.int64) for s in sessions]
    rng = np.random.default_rng(0)
    sizes = [
        train._sample_dat_batch(sessions, tokens, ends, rng, cfg, model_cfg)[0].shape[1]
        for _ in range(300)
    ]
    assert min(sizes) >= 4 and max(sizes) <= 24
    assert min(sizes) <= 5 and max(sizes) >= 22, (min(sizes), max(sizes))
    assert len(set(sizes)) >= 12
    with pytest.raises(Exception, match="max_neurons"):
        TrainConfig(min_neurons=32, max_neurons=16)

    # One size (the shipped recipe) draws no size: the random stream behind
    # `make checkpoint` stays the one the shipped checkpoint was trained with.
    class Recording:
        def __init__(self, rng):
            self.rng, self.calls = rng, []

        def __getattr__(self, name):
            self.calls.append(name)
            return getattr(self.rng, name)

    one = TrainConfig(dat_batch=2, min_neurons=16, max_neurons=16, seq_tokens=8)
    recording = Recording(np.random.default_rng(1))
    train._sample_dat_batch(sessions, tokens, ends, recording, one, model_cfg)
    assert "uniform" not in recording.calls and recording.calls
    recording = Recording(np.random.default_rng(1))
    train._sample_dat_batch(sessions, tokens, ends, recording, cfg, model_cfg)
    assert "uniform" in recording.calls


def test_a_mixed_in_recording_trains_only_on_the_blocks_eval_trains_on(shared_data):
    # `pretrain --recording PATH FPS BLOCK_FRAMES` splits the recording as `eval` does
    # with the same block length: nothing its validation or test blocks hold is trained on.
    import argparse

    import numpy as np

    from calm_rt.cli.model import _prepare_recordings
    from calm_rt.data import load_corpus
    from calm_rt.data.splits import TRAIN
    from calm_rt.errors import ConfigError
    from calm_rt.offline.train import _train_window_ends

    path = shared_data / "zebrafish_hindbrain"
    args = argparse.Namespace(context=48, horizon=16, block_frames=1000, stride=16)
    with pytest.warns(Warning):  # the file stores 5.81 Hz
        (prepared,), (summary,) = _prepare_recordings([[str(path), "5.8", "300"]], args)
        (session,) = load_corpus([path], fps=5.8)
    evaluated = prepare_session(session, Protocol(48, 16, 300))
    np.testing.assert_array_equal(prepared.labels, evaluated.labels)
    assert summary["block_frames"] == 300 and summary["fps"] == 5.8
    assert summary["train_frames"] == int((evaluated.labels == TRAIN).sum()) < session.n_frames
    ends = _train_window_ends(prepared, 64)
    used = np.unique(ends[:, None] - np.arange(64)[None, :])
    assert used.size and (evaluated.labels[used] == TRAIN).all()
    with pytest.raises(ConfigError, match="BLOCK_FRAMES an integer"):
        _prepare_recordings([[str(path), "5.8", "three hundred"]], args)


def test_dat_batches_carry_each_tokens_raw_frames(sessions):
    """The continuous path's inputs: each token's window, its context and the frames after it."""
    import numpy as np

    import calm_rt.offline.train as train
    from calm_rt.model import PRESETS

    model_cfg = PRESETS["tiny"]
    p, c, h = model_cfg.patch, model_cfg.forecast_context, model_cfg.horizon_frames
    cfg = TrainConfig(min_neurons=2, max_neurons=12, sequence_budget=24, seq_tokens=6)
    ends = [train._train_window_ends(s, train._dat_span(cfg, model_cfg)) for s in sessions]
    # Token ids that name their session, neuron and frame, so a batch says what it drew.
    ids = [
        k * 10**7 + np.arange(s.n_neurons)[:, None] * 10**4 + np.arange(s.z.shape[1])[None, :]
        for k, s in enumerate(sessions)
    ]
    rng = np.random.default_rng(1)
    for _ in range(20):
        batch = train._sample_dat_batch(sessions, ids, ends, rng, cfg, model_cfg)
        b, n, _ = batch.inputs.shape
        assert b * n <= 24 and b * n > 24 - n  # the budget, in whole windows
        for w, j in [(0, 0), (b - 1, n - 1)]:
            code = batch.inputs[w, j]  # [L]
            k, i = int(code[0]) // 10**7, int(code[0]) // 10**4 % 1000
            z = np.nan_to_num(sessions[k].z[i])
            assert (batch.targets[w, j, :, 0] == code + p).all()  # the next token: P frames on
            for pos, f in enumerate((code % 10**4).tolist()):
                np.testing.assert_array_equal(batch.context[w, j, pos], z[f - c + 1 : f + 1])
                np.testing.assert_array_equal(batch.values[w, j, pos], z[f - p + 1 : f + 1])
                np.testing.assert_array_equal(batch.future[w, j, pos], z[f + 1 : f + h + 1])
