"""Seconds-fast calibration of CalM's forecasts to one session: a closed-form ridge and a small MLP.

The pretrained model forecasts through its tokens; what a rig is scored on
is the mean squared error of the continuous forecast. This calibration
stacks a per-neuron ridge on top of CalM, fitted in closed form on minutes
of the session itself (training blocks offline, the first minutes live):

    features of neuron i at frame t (all causal, all relative to z[i, t]):
        own past        z[i, t-C+1 .. t-1] - z[i, t]              [C - 1]
        own level       z[i, t]                                   [1]
        population      loadings' z[:, t]  and  loadings' (z[:, t-l] - z[:, t]), l = 1..L
                                                                  [k * (L + 1)]
        CalM            its forecasts mean[i, t, :H] - z[i, t]    [M * H]
                        (the continuous head's and the tokens')
                        hidden state[i, t] on its leading PCs     [r]
    target              z[i, t+1 .. t+H] - z[i, t]                [H]

The own-past and population features are the linear-AR baseline's, so the
penalty chosen on held-out frames can always fall back to it; CalM's
features are what the pretrained model adds. Beside the ridge, CalM's
continuous head (:mod:`calm_rt.live.continuous_head`, a small MLP shared by
the session's neurons, fitted in seconds) forecasts the same change
nonlinearly; the two are blended by a weight chosen on held-out windows (0
when the head does not help there). Forecast s.d. is fitted to
held-out residuals (validation blocks offline, out-of-fold predictions
live), so intervals include everything the model
misses, not only the token mixture's spread (:class:`SpreadModel`).

The same object is used offline (:mod:`calm_rt.offline.evaluate`) and by the
streaming engine (``engine.forecast_calibration``); a test proves both give
the same forecasts on the same recording.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from calm_rt.errors import DataError
from calm_rt.live.continuous_head import MIN_SAMPLES_PER_WEIGHT, ContinuousHead, head_inputs
from calm_rt.live.ridge import RidgeModel, fit_ridge, fit_ridge_cv

__all__ = [
    "CalibrationRecorder",
    "ForecastCalibration",
    "HiddenProjection",
    "SpreadModel",
    "calibration_features",
    "calm_forecast_features",
    "population_loadings",
]


@dataclass
class HiddenProjection:
    """Leading principal axes of per-neuron hidden states, pooled over neurons and frames."""

    center: Tensor  # [W]
    axes: Tensor  # [W, r]

    @classmethod
    def fit(cls, hidden: Tensor, components: int = 8) -> HiddenProjection:
        """``hidden [..., W]`` (any leading dims) to the top ``components`` axes."""
        flat = hidden.double().reshape(-1, hidden.shape[-1])
        center = flat.mean(0)
        _, _, vh = torch.linalg.svd(flat - center, full_matrices=False)
        return cls(center, vh[:components].T.contiguous())

    def __call__(self, hidden: Tensor) -> Tensor:
        """``[..., W]`` to ``[..., r]`` float64."""
        return (hidden.double() - self.center) @ self.axes


def calm_forecast_features(mean: Tensor, token_mean: Tensor | None, horizon: int) -> Tensor:
    """CalM's forecasts a calibration reads, each cut to ``horizon``: ``[..., M * horizon]``.

    ``mean [..., H]`` the model's forecast; ``token_mean`` the tokens' own
    when the model has a continuous head beside them (None: it has not, and
    ``mean`` is the token forecast).
    """
    parts = [mean[..., :horizon]]
    if token_mean is not None:
        parts.append(token_mean[..., :horizon])
    return torch.cat(parts, dim=-1)


def population_loadings(z: np.ndarray, components: int) -> Tensor:
    """Leading principal axes over neurons of ``z [N, T]`` (NaN as 0): ``[N, k]`` float64."""
    x = np.nan_to_num(z.astype(np.float64))
    u, _, _ = np.linalg.svd(x - x.mean(1, keepdims=True), full_matrices=False)
    k = min(components, u.shape[1])
    return torch.from_numpy(np.ascontiguousarray(u[:, :k]))


def calibration_features(
    context: Tensor, calm_mean: Tensor, hidden_pcs: Tensor, loadings: Tensor, pop_lags: int
) -> Tensor:
    """Stacked features for windows ending at the last context frame.

    ``context [B, N, C]`` normalised activity (NaN already 0) ending at
    frame t, ``calm_mean [B, N, M * H]`` CalM's forecasts made at t
    (:func:`calm_forecast_features`),
    ``hidden_pcs [B, N, r]``, ``loadings [N, k]``. Returns ``[N, B, F]``
    float64 (neurons lead: one ridge per neuron).
    """
    ctx = context.double()
    last = ctx[..., -1:]
    rel = ctx - last  # [B, N, C]
    level = torch.einsum("bn,nk->bk", last[..., 0], loadings)  # [B, k]
    lags = rel[..., -1 - pop_lags : -1]  # [B, N, L]
    pop_rel = torch.einsum("bnl,nk->bkl", lags, loadings).flatten(1)  # [B, k * L]
    pop = torch.cat([level, pop_rel], dim=-1)[:, None, :].expand(-1, ctx.shape[1], -1)
    own = torch.cat([rel[..., :-1], last], dim=-1)
    calm = calm_mean.double() - last
    x = torch.cat([own, pop, calm, hidden_pcs.double()], dim=-1)  # [B, N, F]
    return x.transpose(0, 1)


@dataclass
class ForecastCalibration:
    """A fitted per-neuron stacked ridge on CalM's outputs (see the module docstring).

    ``predict`` returns the forecast and its s.d., ``[N, H]`` or ``[B, N,
    H]``; ``cv_gain`` is the held-out score ``1 - MSE / MSE(copy last)`` it
    was selected on. The forecast change is ``(1 - head_weight) * ridge +
    head_weight * head`` (no head: the ridge alone).
    """

    context: int
    horizon: int
    pop_lags: int
    loadings: Tensor  # [N, k]
    projection: HiddenProjection
    model: RidgeModel  # batched over neurons: weights [N, F + 1, H]
    spread: SpreadModel
    cv_gain: float
    frames: int  # windows it was fitted on
    head: ContinuousHead | None = None
    head_weight: float = 0.0

    @property
    def n_neurons(self) -> int:
        return int(self.loadings.shape[0])

    @classmethod
    def fit(
        cls,
        z: np.ndarray,
        calm_mean: Tensor,
        calm_std: Tensor,
        hidden_pcs: Tensor,
        projection: HiddenProjection,
        fit_ends: np.ndarray,
        val_ends: np.ndarray | None = None,
        context: int = 48,
        pop_components: int = 8,
        pop_lags: int = 4,
        head_steps: int = 2000,
    ) -> ForecastCalibration:
        """Fit on windows ending at ``fit_ends`` of one session.

        ``z [N, T]`` normalised activity (NaN allowed), ``calm_mean [N, T, M * H]``
        CalM's forecasts at every frame (:func:`calm_forecast_features` of what
        :meth:`calm_rt.model.CalM.run_offline` or the engine produce) and
        ``calm_std [N, T, H]`` its forecast s.d. (H is the calibration's horizon),
        ``hidden_pcs [N, T, r]`` its hidden states through ``projection``
        (fitted by the caller on a sample, so a live calibration never
        holds full hidden states for minutes).
        With ``val_ends`` the penalty is chosen on those windows and the s.d.
        is fitted to their residuals; without (the live calibration), both
        come from blocked cross-validation over ``fit_ends`` in time.
        The continuous head (``head_steps`` > 0) is trained on the fitting
        windows and early-stopped on the validation windows; without them,
        on the first 80% of ``fit_ends`` and stopped on the last 20%, where
        the blend weight and the s.d. are then chosen (against the ridge's
        out-of-fold forecasts there).
        """
        t = z.shape[1]
        h = calm_std.shape[-1]
        if calm_mean.shape[-1] % h:
            raise DataError(
                f"CalM's forecasts have {calm_mean.shape[-1]} values per frame, not a multiple of "
                f"the horizon {h}; build them with calm_forecast_features"
            )
        fit_ends = _usable(fit_ends, t, context, h)
        if fit_ends.size < 20:
            raise DataError(
                f"need at least 20 windows of {context} + {h} frames to calibrate forecasts, "
                f"got {fit_ends.size}; calibrate for longer"
            )
        zt = torch.from_numpy(np.nan_to_num(z.astype(np.float32)))
        used = np.unique(fit_ends[:, None] - np.arange(context)[None, :])
        loadings = population_loadings(z[:, used], pop_components)
        part = dict(loadings=loadings, pop_lags=pop_lags, context=context, horizon=h)
        x, y, xh = _design(zt, calm_mean, hidden_pcs, fit_ends, **part)
        val_ends = _usable(val_ends, t, context, h) if val_ends is not None else None
        if val_ends is not None and val_ends.size >= 2:
            xv, yv, xhv = _design(zt, calm_mean, hidden_pcs, val_ends, **part)
            model = fit_ridge(x, y, xv, yv)
            held_out, truth, scored = model.predict(xv), yv, val_ends
            head_fit, head_val, on = (xh, y), (xhv, yv), slice(None)
        else:
            model, held_out = fit_ridge_cv(x, y)
            truth, scored = y, fit_ends
            cut = int(round(0.8 * fit_ends.size))
            head_fit, head_val, on = (
                (xh[:, :cut], y[:, :cut]),
                (xh[:, cut:], y[:, cut:]),
                slice(cut, None),
            )
        head, weight = None, 0.0
        samples, inputs = head_fit[0].shape[0] * head_fit[0].shape[1], head_fit[0].shape[-1]
        enough = samples >= MIN_SAMPLES_PER_WEIGHT * ContinuousHead.weights(inputs, h)
        if head_steps > 0 and enough and head_val[0].shape[1] >= 2:
            head = ContinuousHead.fit(
                *(a.flatten(0, 1) for a in (*head_fit, *head_val)), steps=head_steps
            )
            blended, weight = _blend(held_out[:, on], head(head_val[0]).double(), truth[:, on])
            if weight == 0.0:
                head = None
            else:  # held-out forecasts of the blend exist where the head was not trained
                held_out, truth, scored = blended, truth[:, on], scored[on]
        e = torch.from_numpy(scored)
        spread = SpreadModel.fit(
            held_out - truth,
            calm_std[:, e],
            zt[:, e[None, :] - torch.arange(4)[:, None]].transpose(0, 1),
        )
        gain = 1.0 - float((held_out - truth).pow(2).mean()) / max(
            float(truth.pow(2).mean()), 1e-12
        )
        return cls(
            context=context,
            horizon=h,
            pop_lags=pop_lags,
            loadings=loadings,
            projection=projection,
            model=model,
            spread=spread,
            cv_gain=gain,
            frames=int(fit_ends.size),
            head=head,
            head_weight=weight,
        )

    def predict(
        self, context: Tensor, calm_mean: Tensor, calm_std: Tensor, hidden: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Forecast and s.d. ``[B, N, H]`` from ``context [B, N, C]`` and CalM's outputs at its end.

        ``calm_mean [B, N, M * H]`` (:func:`calm_forecast_features` with this
        calibration's horizon), ``calm_std [B, N, >= H]``, ``hidden [B, N, W]``.
        Unbatched inputs (``[N, C]``, ``[N, M * H]``, ``[N, W]``) give ``[N, H]``.
        """
        context = torch.nan_to_num(context, nan=0.0)  # missing samples: the running mean, 0
        single = context.dim() == 2
        if single:
            context, calm_mean, calm_std, hidden = (
                context[None],
                calm_mean[None],
                calm_std[None],
                hidden[None],
            )
        if context.shape[1] != self.n_neurons:
            raise DataError(
                f"this forecast calibration was fitted on {self.n_neurons} neurons, "
                f"got {context.shape[1]}; calibrate again for this session"
            )
        ctx, pcs = context[..., -self.context :], self.projection(hidden)
        x = calibration_features(ctx, calm_mean, pcs, self.loadings, self.pop_lags)
        delta = self.model.predict(x).transpose(0, 1)  # [B, N, H]
        if self.head is not None:
            nonlinear = self.head(head_inputs(ctx, calm_mean, pcs)).double()
            delta = (1.0 - self.head_weight) * delta + self.head_weight * nonlinear
        mean = (context[..., -1:].double() + delta).float()
        recent = context[..., -4:].flip(-1).permute(2, 0, 1)  # [4, B, N], newest first
        sd = self.spread.predict(calm_std[..., : self.horizon], recent)
        return (mean[0], sd[0]) if single else (mean, sd)


@dataclass
class SpreadModel:
    """Forecast s.d. per neuron and horizon, scaled by how eventful the moment is.

    Calcium residuals are heavy-tailed because they are heteroscedastic:
    errors are large during transients and small at rest. So the s.d. is
    ``base[n, h] * exp(coef[h] . u)`` with ``u`` = (log of CalM's token
    s.d., |activity now|, log mean |recent change|), fitted by least squares
    on the log squared held-out residuals, then one factor per horizon brings
    the held-out coverage at +-1 s.d. and +-1.645 s.d. as close to nominal
    (68.3%, 90%) as one factor can.
    """

    base: Tensor  # [N, H]
    coef: Tensor  # [H, 4] (intercept last)
    scale: Tensor  # [H]

    @staticmethod
    def _covariates(calm_std: Tensor, recent: Tensor) -> Tensor:
        """``calm_std [..., N, H]``, ``recent [4, ..., N]`` (newest first) to ``[..., N, H, 4]``."""
        level = recent[0].abs()
        change = (recent[:-1] - recent[1:]).abs().mean(0)
        u = torch.stack(
            torch.broadcast_tensors(
                calm_std.double().clamp_min(1e-4).log(),
                level.double()[..., None],
                (change.double() + 1e-3).log()[..., None],
            ),
            dim=-1,
        )
        return torch.cat([u, torch.ones_like(u[..., :1])], dim=-1)

    @classmethod
    def fit(cls, residual: Tensor, calm_std: Tensor, recent: Tensor) -> SpreadModel:
        """``residual [N, S, H]`` held-out, ``calm_std [N, S, H]``, ``recent [4, N, S]`` newest first."""
        r2 = residual.double().pow(2)
        base = r2.mean(1).sqrt().clamp_min(1e-6)  # [N, H]
        u = cls._covariates(calm_std, recent)  # [N, S, H, 4]
        v = (r2 + 1e-8).log() - 2 * base.log()[:, None]  # [N, S, H]
        a = u.permute(2, 0, 1, 3).reshape(residual.shape[-1], -1, 4)  # [H, N*S, 4]
        b = v.permute(2, 0, 1).reshape(residual.shape[-1], -1, 1)
        gram = a.transpose(1, 2) @ a + 1e-3 * torch.eye(4, dtype=a.dtype)
        coef = torch.linalg.solve(gram, a.transpose(1, 2) @ b)[..., 0]  # [H, 4]
        coef[:, -1] = 0.0  # the level is base's; the factor below restores the overall scale
        sd = base[:, None] * (u * coef).sum(-1).clamp(-6, 6).mul(0.5).exp()
        ratio = (residual.double().abs() / sd).permute(2, 0, 1).reshape(residual.shape[-1], -1)
        # Residuals stay heavier-tailed than Gaussian, so one factor cannot make both
        # +-1 s.d. (68.3%) and +-1.645 s.d. (90%) exact: take the geometric mean of the two
        # factors that would, which splits the error between the two levels.
        q68, q90 = torch.quantile(ratio, torch.tensor([0.6827, 0.90], dtype=ratio.dtype), dim=1)
        scale = (q68 * q90 / 1.645).sqrt()
        return cls(base.float(), coef, scale)

    def predict(self, calm_std: Tensor, recent: Tensor) -> Tensor:
        """``calm_std [..., N, H]``, ``recent [4, ..., N]`` (newest first) to s.d. ``[..., N, H]``."""
        u = self._covariates(calm_std, recent)
        factor = (u * self.coef).sum(-1).clamp(-6, 6).mul(0.5).exp()
        return (self.base * factor * self.scale).float()


def _usable(ends: np.ndarray | None, t: int, context: int, horizon: int) -> np.ndarray:
    if ends is None:
        return np.zeros(0, np.int64)
    ends = np.asarray(ends, np.int64)
    return ends[(ends >= context - 1) & (ends + horizon < t)]


BLEND_WEIGHTS = tuple(i / 10 for i in range(11))


def _blend(ridge: Tensor, head: Tensor, truth: Tensor) -> tuple[Tensor, float]:
    """The blend of two held-out forecasts ``[N, S, H]`` with the lowest MSE, and its weight."""
    errors = [float(((1 - a) * ridge + a * head - truth).pow(2).mean()) for a in BLEND_WEIGHTS]
    a = BLEND_WEIGHTS[int(np.argmin(errors))]
    return (1 - a) * ridge + a * head, a


def _design(
    z: Tensor,
    calm_mean: Tensor,
    hidden_pcs: Tensor,
    ends: np.ndarray,
    *,
    loadings: Tensor,
    pop_lags: int,
    context: int,
    horizon: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Ridge features ``[N, S, F]``, targets ``[N, S, H]`` (the change from the last frame), head inputs ``[N, S, F']``."""
    h = horizon
    idx = torch.from_numpy(ends[:, None] + np.arange(-context + 1, h + 1)[None, :])
    windows = z[:, idx].transpose(0, 1)  # [S, N, C + H]
    ctx, future = windows[..., :context], windows[..., context:]
    e = torch.from_numpy(ends)
    mean, pcs = calm_mean[:, e].transpose(0, 1), hidden_pcs[:, e].transpose(0, 1)
    x = calibration_features(ctx, mean, pcs, loadings, pop_lags)
    y = (future - ctx[..., -1:]).double().transpose(0, 1)
    return x, y, head_inputs(ctx, mean, pcs).transpose(0, 1)


class CalibrationRecorder:
    """What a live calibration keeps per frame, in bounded memory, until it fits.

    Full hidden states ``[N, W]`` are kept only for the first
    ``projection_frames`` (to fit :class:`HiddenProjection`), then only their
    ``components`` leading PCs; the token forecast and its s.d. only for the
    ``horizon`` the engine publishes.
    """

    MIN_WINDOWS = 40

    def __init__(
        self, target_frames: int, projection_frames: int = 150, components: int = 8
    ) -> None:
        self.target_frames = target_frames
        self.projection_frames = max(1, min(projection_frames, target_frames))
        self.components = components
        self.projection: HiddenProjection | None = None
        self._z: list[Tensor] = []
        self._mean: list[Tensor] = []
        self._std: list[Tensor] = []
        self._hidden: list[Tensor] = []

    @staticmethod
    def min_frames(context: int, horizon: int) -> int:
        """Frames a calibration needs for :attr:`MIN_WINDOWS` windows of context + horizon."""
        return context + horizon + CalibrationRecorder.MIN_WINDOWS

    @property
    def frames(self) -> int:
        return len(self._z)

    @property
    def full(self) -> bool:
        return self.frames >= self.target_frames

    def add(self, z: Tensor, calm_mean: Tensor, calm_std: Tensor, hidden: Tensor) -> None:
        """One frame: ``z [N]`` (0 where missing), ``calm_mean [N, M * H]``
        (:func:`calm_forecast_features`), ``calm_std [N, H]``, ``hidden [N, W]``."""
        self._z.append(z.clone())
        self._mean.append(calm_mean.clone())
        self._std.append(calm_std.clone())
        if self.projection is None:
            self._hidden.append(hidden.clone())
            if len(self._hidden) == self.projection_frames:
                self.projection = HiddenProjection.fit(torch.stack(self._hidden), self.components)
                self._hidden = [self.projection(h).float() for h in self._hidden]
        else:
            self._hidden.append(self.projection(hidden).float())

    def fit(self, context: int, horizon: int, head_steps: int = 2000) -> ForecastCalibration:
        """Fit on every window inside the recorded frames (blocked CV for penalty and s.d.)."""
        if self.projection is None:
            raise DataError("the calibration ended before its hidden-state projection was fitted")
        z = torch.stack(self._z, dim=1).numpy()  # [N, T]
        mean = torch.stack(self._mean, dim=1)  # [N, T, M * H]
        std = torch.stack(self._std, dim=1)[..., :horizon]  # [N, T, H]
        pcs = torch.stack(self._hidden, dim=1)  # [N, T, r]
        ends = np.arange(context - 1, z.shape[1] - horizon)
        return ForecastCalibration.fit(
            z, mean, std, pcs, self.projection, ends, context=context, head_steps=head_steps
        )
