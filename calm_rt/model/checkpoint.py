"""Checkpoints: safetensors weights + a JSON config, never pickle.

A checkpoint is a folder with ``model.safetensors`` and ``config.json``
(``{"format": "calm-rt-checkpoint", "version": 1, "config": ..., ...}``,
plus what training recorded: data, steps, losses). The package ships one in
``calm_rt/checkpoints/default``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from calm_rt.errors import ConfigError
from calm_rt.model.calm import CalM
from calm_rt.model.config import CalMConfig

__all__ = ["default_checkpoint_path", "load_checkpoint", "save_checkpoint"]


def save_checkpoint(model: CalM, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / "model.safetensors")
    meta = {
        "format": "calm-rt-checkpoint",
        "version": 1,
        "config": model.config.to_dict(),
        **(extra or {}),
    }
    (folder / "config.json").write_text(json.dumps(meta, indent=2))
    return folder


def load_checkpoint(folder: str | Path | None = None) -> tuple[CalM, dict[str, Any]]:
    """Load a checkpoint folder (the shipped default when None); returns model and metadata."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else default_checkpoint_path()
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg_path.exists() or not weights.exists():
        raise ConfigError(
            f"{folder} is not a calm-rt checkpoint (needs config.json and model.safetensors); "
            "train one with `calm-rt pretrain` or omit --checkpoint for the shipped default"
        )
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != "calm-rt-checkpoint":
        raise ConfigError(f"{cfg_path} is not a calm-rt checkpoint config")
    model = CalM(CalMConfig.from_dict(meta["config"]))
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{weights} does not match its config (missing {missing}, unexpected {unexpected})"
        )
    model.eval()
    return model, meta


def default_checkpoint_path() -> Path:
    """The checkpoint shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "checkpoints" / "default"
