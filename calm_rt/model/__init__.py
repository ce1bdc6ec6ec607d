"""The CalM model: configuration, tokenizer, dual-axis transformer, heads, checkpoints.

Read top-down: :class:`CalM` (:mod:`.calm`) holds an :class:`NQTokenizer`
(:mod:`.tokenizer`), a :class:`DualAxisTransformer` with its :class:`KVCache`
(:mod:`.dat`) and the heads (:mod:`.heads`); shapes are in
:mod:`.config`; :mod:`.ops` dispatches the hot-path ops to Triton kernels on
CUDA and to their torch references elsewhere.
"""

from calm_rt.model.calm import CalM, OfflineOutput
from calm_rt.model.checkpoint import default_checkpoint_path, load_checkpoint, save_checkpoint
from calm_rt.model.config import PRESETS, CalMConfig, DATConfig, TokenizerConfig
from calm_rt.model.dat import DualAxisTransformer, KVCache
from calm_rt.model.heads import BehaviorHead, ContinuousForecastHead, token_forecast
from calm_rt.model.tokenizer import NQTokenizer, frame_windows

__all__ = [
    "PRESETS",
    "BehaviorHead",
    "CalM",
    "CalMConfig",
    "ContinuousForecastHead",
    "DATConfig",
    "DualAxisTransformer",
    "KVCache",
    "NQTokenizer",
    "OfflineOutput",
    "TokenizerConfig",
    "default_checkpoint_path",
    "frame_windows",
    "load_checkpoint",
    "save_checkpoint",
    "token_forecast",
]
