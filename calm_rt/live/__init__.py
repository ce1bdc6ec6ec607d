"""What runs within a frame at the rig: the streaming engine, its readouts and triggers.

    traces [N] --StreamingEngine.step: causal preprocessing, tokenizer,
               DAT step over the KV cache, heads--> Prediction (forecast [N, H] +- s.d.,
               behaviour [B]) --TriggerSet.evaluate--> trigger events

:mod:`.ridge` is the one ridge regression of calm-rt (the live readout
calibrates with it; the offline baselines and probes use the same rule).
"""

from calm_rt.live.engine import Calibration, EngineConfig, Prediction, StreamingEngine
from calm_rt.live.readout import RidgeReadout
from calm_rt.live.ridge import PENALTIES, RidgeModel, fit_ridge, fit_ridge_cv, r2_score
from calm_rt.live.triggers import TriggerEvent, TriggerRule, TriggerSet, load_rules

__all__ = [
    "PENALTIES",
    "Calibration",
    "EngineConfig",
    "Prediction",
    "RidgeModel",
    "RidgeReadout",
    "StreamingEngine",
    "TriggerEvent",
    "TriggerRule",
    "TriggerSet",
    "fit_ridge",
    "fit_ridge_cv",
    "load_rules",
    "r2_score",
]
