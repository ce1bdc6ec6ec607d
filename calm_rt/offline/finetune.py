"""Behaviour fine-tuning: the attention-pooling head on a frozen pretrained backbone.

Deterministic for a seed (batches from the same seeded generators as
pretraining); the head kept is the one with the lowest validation-block MSE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from calm_rt.data.splits import TRAIN, VAL, PreparedSession
from calm_rt.errors import DataError
from calm_rt.model import CalM
from calm_rt.offline.train import _progress, _rng

__all__ = ["FinetuneConfig", "finetune_behavior", "session_hidden"]


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 600
    batch_frames: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0


def session_hidden(model: CalM, prepared: PreparedSession) -> Tensor:
    """Per-frame DAT hidden states ``[T, N, W]`` of a whole session (causal)."""
    z = torch.from_numpy(prepared.z)
    return model.run_offline(z).hidden.transpose(0, 1).contiguous()


def finetune_behavior(
    model: CalM,
    sessions: Sequence[PreparedSession],
    names: Sequence[str],
    config: FinetuneConfig | None = None,
    progress: bool = True,
) -> CalM:
    """Fit the attention-pooling behaviour head on the training frames of ``sessions``.

    With the backbone frozen (default) the per-frame hidden states are
    computed once; targets are standardised with training-frame statistics.
    """
    cfg = config or FinetuneConfig()
    usable = [
        s
        for s in sessions
        if s.behavior is not None and tuple(s.session.behavior_names) == tuple(names)
    ]
    if not usable:
        raise DataError(f"no session has behaviour {list(names)}")
    model = model.with_behavior(tuple(names))
    model.eval()
    hidden = [session_hidden(model, s) for s in usable]
    train_y = np.concatenate([s.behavior[s.labels == TRAIN] for s in usable])
    mean = torch.from_numpy(np.nanmean(train_y, axis=0)).float()
    std = torch.from_numpy(np.nanstd(train_y, axis=0)).float().clamp_min(1e-6)
    model.behavior_mean.copy_(mean)
    model.behavior_std.copy_(std)
    head = model.behavior_head
    assert head is not None  # built by with_behavior
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    frames = [np.flatnonzero(s.labels == TRAIN) for s in usable]
    val_frames = [np.flatnonzero(s.labels == VAL) for s in usable]
    bar = _progress(cfg.steps, "behaviour head", 0, progress)
    best, best_state = math.inf, None
    for step in range(cfg.steps):
        rng, _ = _rng(cfg.seed, 3, step, 0)
        k = int(rng.integers(len(usable)))
        t = rng.choice(frames[k], size=min(cfg.batch_frames, len(frames[k])), replace=False)
        y = (torch.from_numpy(usable[k].behavior[t]) - mean) / std
        pred = head(hidden[k][t])
        ok = torch.isfinite(y)
        loss = F.mse_loss(pred[ok], y[ok])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(mse=f"{float(loss.detach()):.3f}", refresh=False)
        bar.update(1)
        if (step + 1) % 50 == 0 and any(len(v) for v in val_frames):
            with torch.no_grad():
                errs = []
                for h, s, v in zip(hidden, usable, val_frames):
                    if len(v):
                        yv = (torch.from_numpy(s.behavior[v]) - mean) / std
                        ok = torch.isfinite(yv)  # the same mask as the training loss
                        if bool(ok.any()):
                            errs.append(float(F.mse_loss(head(h[v])[ok], yv[ok])))
                val = float(np.mean(errs)) if errs else math.inf
            if val < best:  # keep the head that generalises best to validation blocks
                best, best_state = (
                    val,
                    {n: q.detach().clone() for n, q in head.state_dict().items()},
                )
    bar.close()
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    return model
