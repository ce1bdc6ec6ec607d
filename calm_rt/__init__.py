"""calm-rt: the CalM calcium-imaging foundation model, live at the microscope.

One frame's way through the packages (each a room of its own)::

    scope --ZeroMQ--> calm_rt.wire     decode (topic, JSON header, raw buffers)
                  --> calm_rt.extract  motion correction, ROI + neuropil traces
                  --> calm_rt.live     StreamingEngine.step: causal dF/F and
                                       normalisation, tokenizer, one DAT step over
                                       the KV cache, heads; then trigger rules
                  --> calm_rt.wire     encode --ZeroMQ--> rigs, napari
                      (calm_rt.serve runs the threads and sockets around this,
                      and records beside it)

The model itself is :mod:`calm_rt.model`; sessions, readers, the causal
preprocessing, the evaluation splits and the simulator are
:mod:`calm_rt.data`. What never runs at the rig (training, evaluation,
baselines, probes, replay) is :mod:`calm_rt.offline`; the ``calm-rt``
command is :mod:`calm_rt.cli`. See the README for the commands and
DESIGN.md for the contract.
"""

from __future__ import annotations

import importlib
from typing import Any

from calm_rt.errors import CalmError, ConfigError, DataError, NotAvailableError, ProtocolError

__version__ = "0.1.0"

# The public API, imported on first use: ``import calm_rt`` (and ``calm-rt --help``)
# stays cheap, and torch or ZeroMQ load only when something needs them.
_LAZY = {
    "CalM": "calm_rt.model",
    "CalMConfig": "calm_rt.model",
    "load_checkpoint": "calm_rt.model",
    "save_checkpoint": "calm_rt.model",
    "EngineConfig": "calm_rt.live",
    "Prediction": "calm_rt.live",
    "StreamingEngine": "calm_rt.live",
    "RigClient": "calm_rt.serve",
    "Server": "calm_rt.serve",
    "ServiceConfig": "calm_rt.serve",
    "control_request": "calm_rt.serve",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'calm_rt' has no attribute {name!r}")


__all__ = [
    "CalM",
    "CalMConfig",
    "CalmError",
    "ConfigError",
    "DataError",
    "EngineConfig",
    "NotAvailableError",
    "Prediction",
    "ProtocolError",
    "RigClient",
    "Server",
    "ServiceConfig",
    "StreamingEngine",
    "__version__",
    "control_request",
    "load_checkpoint",
    "save_checkpoint",
]
