"""CalM: the NQ trace tokenizer, the dual-axis transformer (DAT) and its heads.

How a recording becomes predictions (shapes for one session of N neurons)::

    z [N, T]              normalised traces (calm_rt.data preprocessing)
    windows [N, T, P]     the last P frames before each frame (zeros before t=0)
    tokens [N, T]         NQ tokenizer: causal encoder + shared codebook argmin
    chains                tokens at stride P: chain phi holds frames phi, phi+P, ...
    DAT                   per chain: token embedding + its raw window (the
                          continuous path), temporal attention (causal, sliding
                          window of C tokens, rotary), neural attention (all N at
                          one step), SwiGLU MLP
    logits [N, T, k, K]   multi-token heads: token m steps ahead = frames
                          t+(m-1)P+1 .. t+mP
    token forecast        expected decoded window under each head's distribution,
      [N, T, kP]          with its standard deviation
    forecast [N, T, kP]   the continuous head: the neuron's last C*P frames,
                          FiLM-modulated by its hidden state, to the change from
                          the last frame and its s.d. (the token forecast when
                          the model has no continuous head)

Every frame has a token, so the streaming engine (:mod:`calm_rt.live`)
advances exactly one of the P chains per frame and answers every frame.
The parts: :mod:`~calm_rt.model.config` (shapes and presets),
:mod:`~calm_rt.model.tokenizer`, :mod:`~calm_rt.model.dat` (with the KV
cache), :mod:`~calm_rt.model.heads`, :mod:`~calm_rt.model.checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from calm_rt.model.config import CalMConfig
from calm_rt.model.dat import DualAxisTransformer
from calm_rt.model.heads import BehaviorHead, ContinuousForecastHead, token_forecast
from calm_rt.model.tokenizer import NQTokenizer, frame_windows

__all__ = ["CalM", "OfflineOutput"]


class CalM(nn.Module):
    """Tokenizer + DAT + heads, with the offline (whole-recording) forward pass.

    ``behavior_mean`` / ``behavior_std`` buffers map the head's standardised
    output back to behaviour units.
    """

    def __init__(self, config: CalMConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = NQTokenizer(config.tokenizer)
        self.dat = DualAxisTransformer(config.dat, config.tokenizer.codebook_size, config.patch)
        self.forecast_head = (
            ContinuousForecastHead(
                config.forecast_context,
                config.horizon_frames,
                config.dat.width,
                config.forecast_head,
            )
            if config.forecast_head
            else None
        )
        n_beh = len(config.behavior_names)
        self.behavior_head = (
            BehaviorHead(config.dat.width, n_beh, config.behavior_queries) if n_beh else None
        )
        self.register_buffer("behavior_mean", torch.zeros(n_beh))
        self.register_buffer("behavior_std", torch.ones(n_beh))

    def with_behavior(self, names: tuple[str, ...]) -> CalM:
        """A copy with a fresh behaviour head for ``names`` (backbone shared by value)."""
        model = CalM(replace(self.config, behavior_names=tuple(names)))
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("behavior")}
        model.load_state_dict(state, strict=False)
        return model

    # -- tokens and forecasts -------------------------------------------------

    def tokenize(self, z: Tensor) -> Tensor:
        """Traces ``[N, T]`` (NaN already replaced) to token ids ``[N, T]``."""
        windows = frame_windows(z, self.config.patch)  # [N, T, P]
        n, t, p = windows.shape
        return self.tokenizer.tokenize_windows(windows.reshape(n * t, p)).view(n, t)

    def forecast_from_logits(
        self, logits: Tensor, table: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``[..., k, K]`` logits to forecast mean and s.d. ``[..., k * P]`` (see :func:`token_forecast`).

        ``table`` is the tokenizer's ``[K, P]`` decode table (computed when
        not given; the streaming engine passes its cached copy).
        """
        return token_forecast(logits, self.tokenizer.decode_table() if table is None else table)

    def forecast(
        self, context: Tensor, hidden: Tensor, logits: Tensor, table: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The model's forecast and s.d., then the token forecast and s.d., each ``[..., H]``.

        ``context [..., forecast_context]``: the neuron's last frames, oldest first (0 where
        missing or before the recording); ``hidden [..., W]``, ``logits [..., k, K]``.
        Without a continuous head the model's forecast is the token forecast.
        """
        token_mean, token_std = self.forecast_from_logits(logits, table)
        if self.forecast_head is None:
            return token_mean, token_std, token_mean, token_std
        mean, std = self.forecast_head(context.to(hidden.dtype), hidden)
        return mean, std, token_mean, token_std

    @torch.no_grad()
    def run_offline(self, z: Tensor) -> OfflineOutput:
        """Run the model over a whole recording, as the streaming engine would.

        ``z [N, T]`` normalised traces, NaN allowed (treated as 0, the running
        mean). Every frame gets outputs computed from frames up to it only.
        """
        z = torch.nan_to_num(z.float(), nan=0.0)
        n, t = z.shape
        p, c = self.config.patch, self.config.forecast_context
        windows = frame_windows(z, p)  # [N, T, P]
        tokens = self.tokenizer.tokenize_windows(windows.reshape(n * t, p)).view(n, t)
        contexts = frame_windows(z, c)  # [N, T, forecast_context] (a view)
        h = self.config.horizon_frames
        keys = ("mean", "std", "token_mean", "token_std")
        out = {k: torch.empty(n, t, h, device=z.device) for k in keys}
        hidden = torch.empty(n, t, self.config.dat.width, device=z.device)
        for phase in range(min(p, t)):
            chain = tokens[:, phase::p]  # [N, L]
            hid, logits = self.dat(chain[None], values=windows[None, :, phase::p])
            parts = self.forecast(contexts[:, phase::p], hid[0], logits[0])
            for key, part in zip(out, parts, strict=True):
                out[key][:, phase::p] = part
            hidden[:, phase::p] = hid[0]
        behavior = None
        if self.behavior_head is not None:
            behavior = (
                self.behavior_head(hidden.transpose(0, 1)) * self.behavior_std + self.behavior_mean
            )
        return OfflineOutput(
            tokens, out["mean"], out["std"], hidden, behavior, out["token_mean"], out["token_std"]
        )

    @torch.no_grad()
    def forecast_windows(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Forecast after each context window: ``z [B, N, Tc]`` to mean, s.d. ``[B, N, H]``.

        Uses only the window (the evaluation protocol's fixed context): the
        chain ending at the window's last frame, at most C tokens, and the
        window's last ``forecast_context`` frames for the continuous head
        (zeros before it).
        """
        z = torch.nan_to_num(z.float(), nan=0.0)
        b, n, tc = z.shape
        p, c = self.config.patch, self.config.forecast_context
        ends = torch.arange(tc - 1, -1, -p).flip(0)[-self.config.dat.context_tokens :]
        windows = frame_windows(z, p)[:, :, ends]  # [B, N, L, P]
        ids = self.tokenizer.tokenize_windows(windows.reshape(-1, p)).view(b, n, -1)
        hidden, logits = self.dat(ids, values=windows)
        context = frame_windows(z, c)[:, :, -1]  # [B, N, forecast_context]
        mean, std, _, _ = self.forecast(context, hidden[:, :, -1], logits[:, :, -1])
        return mean, std


@dataclass
class OfflineOutput:
    """Per-frame outputs of :meth:`CalM.run_offline` for one session.

    ``forecast[:, t, h]`` predicts frame ``t + 1 + h`` from frames ``<= t``
    (the continuous head's; the token forecast beside it).
    """

    tokens: Tensor  # [N, T] int64
    forecast: Tensor  # [N, T, H]
    forecast_std: Tensor  # [N, T, H]
    hidden: Tensor  # [N, T, W]
    behavior: Tensor | None  # [T, B] in behaviour units, when a head is fitted
    token_forecast: Tensor  # [N, T, H] the tokens' own forecast (= forecast without a head)
    token_std: Tensor  # [N, T, H]
