"""Causal preprocessing: raw fluorescence to normalised activity, one frame at a time.

One implementation serves offline training, evaluation and the live engine, so
that what the model sees at the rig is exactly what it saw in training:

    F_corr = F - r * F_neuropil                       (when neuropil is given)
    F0     = running q-th percentile of F_corr over the last W seconds
    dF/F   = (F_corr - F0) / max(|F0|, eps)           (skipped for kind="dff")
    z      = (dF/F - m) / s, clipped to +-clip        (m, s: exponentially
                                                       weighted running mean and
                                                       s.d., time constant tau)

Everything uses only the present and past samples. A missing sample (NaN)
yields NaN and leaves the state untouched, so a gap never poisons the
baseline. The whole-array path runs the very same per-sample update in a loop,
which is why `run` over a recording equals `step` frame by frame bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from calm_rt.errors import ConfigError, DataError

__all__ = ["CausalPreprocessor", "PreprocessConfig", "preprocess_traces"]


@dataclass(frozen=True)
class PreprocessConfig:
    """Knobs of the causal preprocessing (units in the names).

    The defaults follow common two-photon practice (suite2p's 0.7 neuropil
    coefficient, a low running percentile as baseline as in CaImAn).
    """

    neuropil_coef: float = 0.7
    baseline_window_s: float = 30.0
    baseline_percentile: float = 8.0
    norm_timescale_s: float = 60.0
    clip: float = 10.0
    eps: float = 1e-6
    normalize: bool = True  # False: stop at dF/F (the analysis of dF/F itself)

    def __post_init__(self) -> None:
        if not 0.0 <= self.neuropil_coef <= 2.0:
            raise ConfigError(f"neuropil_coef must be in [0, 2], got {self.neuropil_coef}")
        if self.baseline_window_s <= 0 or self.norm_timescale_s <= 0:
            raise ConfigError("baseline_window_s and norm_timescale_s must be positive")
        if not 0.0 <= self.baseline_percentile <= 100.0:
            raise ConfigError(
                f"baseline_percentile must be in [0, 100], got {self.baseline_percentile}"
            )
        if self.clip <= 0 or self.eps <= 0:
            raise ConfigError("clip and eps must be positive")

    def window_frames(self, fps: float) -> int:
        """Baseline window length in frames at ``fps`` (at least 2)."""
        return max(2, int(round(self.baseline_window_s * fps)))

    def norm_alpha(self, fps: float) -> float:
        """Per-frame weight of the running normalisation's exponential average."""
        return min(1.0, 1.0 / (self.norm_timescale_s * fps))


# ---------------------------------------------------------------------------
# numba kernels: one per-neuron update shared by the per-frame and whole-array
# paths. State arrays are per neuron: ring/sorted [N, W] hold the baseline
# window in arrival order and in sorted order; count/head index the ring;
# sx/sxx/sw are the weighted sums of the running normalisation (float64).


@numba.njit(cache=True, inline="always")
def _update_neuron(
    i, x, is_raw, normalize, q, alpha, clip, eps, ring, srt, count, head, sx, sxx, sw
):  # pragma: no cover - compiled
    if not math.isfinite(x):
        return math.nan
    if is_raw:
        w = ring.shape[1]
        n = count[i]
        if n == w:
            # Remove the oldest sample from the sorted window.
            old = ring[i, head[i]]
            lo = 0
            hi = n
            while lo < hi:
                mid = (lo + hi) // 2
                if srt[i, mid] < old:
                    lo = mid + 1
                else:
                    hi = mid
            for k in range(lo, n - 1):
                srt[i, k] = srt[i, k + 1]
            n -= 1
        ring[i, head[i]] = x
        head[i] = (head[i] + 1) % w
        # Insert the new sample keeping the window sorted.
        lo = 0
        hi = n
        while lo < hi:
            mid = (lo + hi) // 2
            if srt[i, mid] <= x:
                lo = mid + 1
            else:
                hi = mid
        for k in range(n, lo, -1):
            srt[i, k] = srt[i, k - 1]
        srt[i, lo] = x
        n += 1
        count[i] = n
        pos = q * (n - 1)
        k0 = int(math.floor(pos))
        k1 = min(k0 + 1, n - 1)
        frac = pos - k0
        f0 = srt[i, k0] + frac * (srt[i, k1] - srt[i, k0])
        value = (x - f0) / max(abs(f0), eps)
    else:
        value = x
    if not normalize:
        return value
    sw[i] = (1.0 - alpha) * sw[i] + alpha
    sx[i] = (1.0 - alpha) * sx[i] + alpha * value
    sxx[i] = (1.0 - alpha) * sxx[i] + alpha * value * value
    mean = sx[i] / sw[i]
    var = max(sxx[i] / sw[i] - mean * mean, 0.0)
    z = (value - mean) / (math.sqrt(var) + eps)
    return min(max(z, -clip), clip)


@numba.njit(cache=True)
def _step_kernel(
    f, fneu, coef, is_raw, normalize, q, alpha, clip, eps, ring, srt, count, head, sx, sxx, sw, out
):  # pragma: no cover - compiled
    use_neuropil = fneu.shape[0] == f.shape[0]
    for i in range(f.shape[0]):
        x = f[i] - coef * fneu[i] if use_neuropil else f[i]
        out[i] = _update_neuron(
            i, x, is_raw, normalize, q, alpha, clip, eps, ring, srt, count, head, sx, sxx, sw
        )


@numba.njit(cache=True)
def _run_kernel(
    f, fneu, coef, is_raw, normalize, q, alpha, clip, eps, ring, srt, count, head, sx, sxx, sw, out
):  # pragma: no cover - compiled
    use_neuropil = fneu.shape[0] == f.shape[0]
    for t in range(f.shape[1]):
        for i in range(f.shape[0]):
            x = f[i, t] - coef * fneu[i, t] if use_neuropil else f[i, t]
            out[i, t] = _update_neuron(
                i, x, is_raw, normalize, q, alpha, clip, eps, ring, srt, count, head, sx, sxx, sw
            )


class CausalPreprocessor:
    """Per-neuron causal dF/F and running normalisation with preallocated state.

    Memory is fixed at construction: two ``[N, W]`` float64 windows plus a few
    ``[N]`` vectors, where ``W`` is the baseline window in frames.

    Args:
        n_neurons: number of neurons N (fixed for the session).
        fps: frame rate in Hz; converts the config's seconds to frames.
        kind: ``"F"`` for raw fluorescence (baseline + dF/F) or ``"dff"`` for
            traces that are already dF/F (normalisation only).
        config: the knobs; defaults in :class:`PreprocessConfig`.
    """

    def __init__(
        self,
        n_neurons: int,
        fps: float,
        kind: str = "F",
        config: PreprocessConfig | None = None,
    ) -> None:
        if n_neurons < 1:
            raise ConfigError(f"n_neurons must be >= 1, got {n_neurons}")
        if not (fps > 0 and math.isfinite(fps)):
            raise ConfigError(f"fps must be a positive frame rate in Hz, got {fps}")
        if kind not in ("F", "dff"):
            raise ConfigError(f"kind must be 'F' or 'dff', got {kind!r}")
        self.config = config or PreprocessConfig()
        self.n_neurons = int(n_neurons)
        self.fps = float(fps)
        self.kind = kind
        w = self.config.window_frames(fps) if kind == "F" else 1
        self._ring = np.zeros((n_neurons, w), np.float64)
        self._sorted = np.zeros((n_neurons, w), np.float64)
        self._count = np.zeros(n_neurons, np.int64)
        self._head = np.zeros(n_neurons, np.int64)
        self._sx = np.zeros(n_neurons, np.float64)
        self._sxx = np.zeros(n_neurons, np.float64)
        self._sw = np.zeros(n_neurons, np.float64)
        # numba needs an array either way; an empty one means "no neuropil".
        self._no_neuropil = {1: np.zeros(0, np.float32), 2: np.zeros((0, 0), np.float32)}
        self.frames_seen = 0

    def reset(self) -> None:
        """Forget all history (a new session with the same neurons)."""
        for arr in (
            self._ring,
            self._sorted,
            self._count,
            self._head,
            self._sx,
            self._sxx,
            self._sw,
        ):
            arr[...] = 0
        self.frames_seen = 0

    @property
    def state_nbytes(self) -> int:
        """Bytes of incremental state (constant over the session)."""
        return sum(
            a.nbytes
            for a in (
                self._ring,
                self._sorted,
                self._count,
                self._head,
                self._sx,
                self._sxx,
                self._sw,
            )
        )

    def _args(self) -> tuple:
        c = self.config
        return (
            c.neuropil_coef,
            self.kind == "F",
            c.normalize,
            c.baseline_percentile / 100.0,
            c.norm_alpha(self.fps),
            c.clip,
            c.eps,
            self._ring,
            self._sorted,
            self._count,
            self._head,
            self._sx,
            self._sxx,
            self._sw,
        )

    def _neuropil(self, neuropil: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        if neuropil is None:
            return self._no_neuropil[len(shape)]
        if self.kind != "F":
            raise DataError(
                "neuropil subtraction applies to raw fluorescence (kind='F') only", field="neuropil"
            )
        neuropil = np.asarray(neuropil, dtype=np.float32)
        if neuropil.shape != shape:
            raise DataError(
                f"neuropil shape {neuropil.shape} differs from traces {shape}", field="neuropil"
            )
        return neuropil

    def step(self, traces: np.ndarray, neuropil: np.ndarray | None = None) -> np.ndarray:
        """Preprocess one frame: ``[N]`` raw values in, ``[N]`` float32 z out.

        NaN inputs give NaN outputs and do not update that neuron's state.
        """
        f = np.asarray(traces, dtype=np.float32)
        if f.shape != (self.n_neurons,):
            raise DataError(
                f"expected one value per neuron, shape ({self.n_neurons},), got {f.shape}",
                field="traces",
            )
        out = np.empty(self.n_neurons, np.float32)
        _step_kernel(f, self._neuropil(neuropil, f.shape), *self._args(), out)
        self.frames_seen += 1
        return out

    def run(self, traces: np.ndarray, neuropil: np.ndarray | None = None) -> np.ndarray:
        """Preprocess ``[N, T]`` frames in order, continuing from the current state."""
        f = np.ascontiguousarray(traces, dtype=np.float32)
        if f.ndim != 2 or f.shape[0] != self.n_neurons:
            raise DataError(
                f"expected [{self.n_neurons}, T] traces, got shape {f.shape}", field="traces"
            )
        fneu = self._neuropil(neuropil, f.shape)
        out = np.empty(f.shape, np.float32)
        _run_kernel(f, np.ascontiguousarray(fneu), *self._args(), out)
        self.frames_seen += f.shape[1]
        return out


def preprocess_traces(
    traces: np.ndarray,
    fps: float,
    kind: str = "F",
    neuropil: np.ndarray | None = None,
    config: PreprocessConfig | None = None,
) -> np.ndarray:
    """Whole-recording causal preprocessing: ``[N, T]`` in, ``[N, T]`` float32 z out.

    Equal, bit for bit, to feeding the frames one by one to a fresh
    :class:`CausalPreprocessor`.
    """
    traces = np.asarray(traces)
    if traces.ndim != 2:
        raise DataError(f"expected [N, T] traces, got shape {traces.shape}", field="traces")
    return CausalPreprocessor(traces.shape[0], fps, kind, config).run(traces, neuropil)
