"""Work that never runs at the rig: training, evaluation, baselines, probes, replay.

    pretrain (tokenizer, then DAT) -> finetune (behaviour head) -> evaluate
    (POCO's protocol against copy-last, linear AR, a POCO-style model, ridge,
    GRU) -> analyze (linear probes of the representations)

:func:`replay_session` feeds an old recording through the live engine frame
by frame (what the rig would have said).
"""

from calm_rt.offline.baselines import (
    CopyLast,
    GRUDecoder,
    LinearAR,
    POCOForecaster,
    RidgeDecoder,
    windows_at,
)
from calm_rt.offline.evaluate import evaluate, tokenizer_report
from calm_rt.offline.finetune import FinetuneConfig, finetune_behavior
from calm_rt.offline.replay import replay_session
from calm_rt.offline.train import TrainConfig, adapt, pretrain, pretrain_dat

__all__ = [
    "CopyLast",
    "FinetuneConfig",
    "GRUDecoder",
    "LinearAR",
    "POCOForecaster",
    "RidgeDecoder",
    "TrainConfig",
    "adapt",
    "evaluate",
    "finetune_behavior",
    "pretrain",
    "pretrain_dat",
    "replay_session",
    "tokenizer_report",
    "windows_at",
]
