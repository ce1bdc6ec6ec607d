"""The shape of a CalM model: frozen dataclasses with named presets.

Runtime knobs (devices, gap policies, horizons served) live with the code
that uses them (:class:`calm_rt.live.EngineConfig`); these are what a
checkpoint stores in its ``config.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from calm_rt.errors import ConfigError

__all__ = ["PRESETS", "CalMConfig", "DATConfig", "TokenizerConfig"]


@dataclass(frozen=True)
class TokenizerConfig:
    """Shape of the NQ tokenizer. ``patch`` frames per token, ``codebook_size`` codes."""

    patch: int = 4
    codebook_size: int = 128
    code_dim: int = 16
    width: int = 16
    layers: int = 1
    heads: int = 2


@dataclass(frozen=True)
class DATConfig:
    """Shape of the dual-axis transformer.

    ``context_tokens`` is the temporal attention window C per chain (the
    context in frames is ``C * patch``); ``horizon_tokens`` the number of
    multi-token heads k (the forecast horizon in frames is ``k * patch``).
    ``value_input``: the raw normalised window a token summarises enters
    beside the token's embedding (the continuous path: a 7-bit code cannot
    say exactly where the trace is now).
    """

    width: int = 64
    layers: int = 3
    heads: int = 4
    context_tokens: int = 12
    horizon_tokens: int = 4
    mlp_ratio: float = 8 / 3
    neural_attention: bool = True
    rope_base: float = 1000.0
    value_input: bool = False


@dataclass(frozen=True)
class CalMConfig:
    """The whole model. ``behavior_names`` is empty until a head is fine-tuned.

    ``forecast_head``: hidden width of the continuous forecast head (0: none,
    the forecast is the tokens' alone, as in checkpoints before it);
    ``forecast_context``: frames of each neuron's own past it reads (POCO's
    48), whatever the transformer's window.
    """

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    dat: DATConfig = field(default_factory=DATConfig)
    behavior_names: tuple[str, ...] = ()
    behavior_queries: int = 4
    forecast_head: int = 0
    forecast_context: int = 48

    def __post_init__(self) -> None:
        t, d = self.tokenizer, self.dat
        if t.patch < 1 or t.codebook_size < 2 or t.code_dim < 1:
            raise ConfigError("tokenizer needs patch >= 1, codebook_size >= 2, code_dim >= 1")
        if t.width % t.heads or d.width % d.heads:
            raise ConfigError("width must be divisible by heads")
        if (t.width // t.heads) % 2 or (d.width // d.heads) % 2:
            raise ConfigError("head dimension must be even for rotary embeddings")
        if d.context_tokens < 1 or d.horizon_tokens < 1:
            raise ConfigError("context_tokens and horizon_tokens must be >= 1")
        if self.forecast_head < 0:
            raise ConfigError(f"forecast_head must be >= 0, got {self.forecast_head}")
        if self.forecast_context < 2:
            raise ConfigError(f"forecast_context must be >= 2 frames, got {self.forecast_context}")

    @property
    def patch(self) -> int:
        return self.tokenizer.patch

    @property
    def context_frames(self) -> int:
        return self.dat.context_tokens * self.tokenizer.patch

    @property
    def horizon_frames(self) -> int:
        return self.dat.horizon_tokens * self.tokenizer.patch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalMConfig:
        try:
            return cls(
                tokenizer=TokenizerConfig(**data["tokenizer"]),
                dat=DATConfig(**data["dat"]),
                behavior_names=tuple(data.get("behavior_names", ())),
                behavior_queries=int(data.get("behavior_queries", 4)),
                forecast_head=int(data.get("forecast_head", 0)),
                forecast_context=int(data.get("forecast_context", 48)),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"not a CalM configuration ({exc}); was it written by calm-rt?"
            ) from exc


PRESETS: dict[str, CalMConfig] = {
    # For tests: trains in seconds on a laptop core.
    "tiny": CalMConfig(
        tokenizer=TokenizerConfig(
            patch=4, codebook_size=64, code_dim=8, width=16, layers=1, heads=2
        ),
        dat=DATConfig(
            width=32, layers=2, heads=2, context_tokens=12, horizon_tokens=4, value_input=True
        ),
        forecast_head=32,
    ),
    # The shipped default: a few MB, pretrains on 2 CPU cores in under 40 minutes.
    "small": CalMConfig(dat=DATConfig(value_input=True), forecast_head=64),
    # Tokens alone (the checkpoints before the continuous path), for ablations.
    "small-tokens": CalMConfig(),
}
