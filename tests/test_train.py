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
