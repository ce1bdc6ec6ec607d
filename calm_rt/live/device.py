"""Which torch device the live path runs on: ``auto``, ``cpu`` or ``cuda`` (``cuda:N``)."""

from __future__ import annotations

import torch

from calm_rt.errors import ConfigError

__all__ = ["DEVICE_CHOICES", "resolve_device"]

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(spec: str | torch.device | None) -> str:
    """``spec`` as a concrete device string: ``auto`` (or None) is ``cuda`` when a GPU is usable.

    Raises :class:`ConfigError` for an unknown name, and for ``cuda`` on a
    machine where torch sees no CUDA GPU (a CPU build of torch, no driver,
    or ``CUDA_VISIBLE_DEVICES`` empty): better one clear line at start-up
    than a crash on the first frame.
    """
    name = "auto" if spec is None else str(spec).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = name.split(":", 1)[0]
    if kind not in ("cpu", "cuda") or (kind == "cpu" and name != "cpu"):
        raise ConfigError(f"device must be auto, cpu or cuda (cuda:N), got {spec!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + (
                "" if torch.version.cuda else ", a CPU-only build"
            )
            raise ConfigError(
                f"--device {name}: no CUDA GPU is usable here ({build}); "
                "run with --device cpu (or auto), or install a CUDA build of torch on a GPU machine"
            )
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if not 0 <= index < torch.cuda.device_count():
            raise ConfigError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return name
