"""The probes of :mod:`calm_rt.offline.analysis`: folds, linear probes, the Mantel test,
and the hand-made raw-trace features and ground truth they are compared with.

Neuron-level probes are multinomial logistic regressions (L2 penalty chosen
by inner cross-validation) scored with stratified folds over neurons or with
whole groups held out; behaviour probes are the one ridge of
:mod:`calm_rt.live.ridge` fitted on training blocks, penalty chosen on
validation blocks, scored (R2) on test blocks.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import optimize

from calm_rt.data.splits import TEST, TRAIN, VAL
from calm_rt.live import fit_ridge, r2_score
from calm_rt.live.ridge import fit_ridge_at

__all__ = [
    "AnalysisConfig",
    "causal_mean",
    "classification_probe",
    "group_folds",
    "hand_features",
    "mantel_test",
    "read_region_centroids",
    "read_truth_types",
    "ridge_time_probe",
    "standardize",
    "stratified_folds",
]

_CLS_LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass(frozen=True)
class AnalysisConfig:
    """Knobs of the probes. ``components`` principal axes per neuron in the readout features."""

    folds: int = 5
    inner_folds: int = 3
    permutations: int = 2000
    components: int = 8
    max_iter: int = 300
    seed: int = 0


# ---------------------------------------------------------------------------
# Folds and probes


def stratified_folds(y: np.ndarray, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train, test) index pairs with every class spread evenly over the folds."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = (np.arange(idx.size) + rng.integers(k)) % k
    return [
        (np.flatnonzero(fold != f), np.flatnonzero(fold == f))
        for f in range(k)
        if (fold == f).any()
    ]


def group_folds(groups: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Leave-one-group-out (train, test) pairs, e.g. one held-out animal per fold."""
    return [(np.flatnonzero(groups != g), np.flatnonzero(groups == g)) for g in np.unique(groups)]


def _fit_logistic(
    x: np.ndarray, y: np.ndarray, k: int, lam: float, max_iter: int
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression: mean cross-entropy + ``lam/2 |W|^2`` by L-BFGS.

    ``x [M, F]`` standardised features, ``y [M]`` ints below ``k``.
    Returns ``W [F, K]`` and ``b [K]``.
    """
    m, f = x.shape
    onehot = np.zeros((m, k))
    onehot[np.arange(m), y] = 1.0

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: f * k].reshape(f, k), theta[f * k :]
        logits = x @ w + b
        logits -= logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        g = (np.exp(logp) - onehot) / m
        loss = -(onehot * logp).sum() / m + 0.5 * lam * (w * w).sum()
        return loss, np.concatenate([(x.T @ g + lam * w).ravel(), g.sum(0)])

    res = optimize.minimize(
        loss_grad, np.zeros(f * k + k), jac=True, method="L-BFGS-B",
        options={"maxiter": max_iter},
    )  # fmt: skip
    return res.x[: f * k].reshape(f, k), res.x[f * k :]


def standardize(fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = fit.mean(0), fit.std(0) + 1e-8
    return [(a - mean) / std for a in (fit, *others)]


def classification_probe(
    x: np.ndarray,
    y: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    x_eval: np.ndarray | None = None,
    config: AnalysisConfig | None = None,
) -> dict[str, Any]:
    """Cross-validated linear decoding of class ``y [M]`` (ints) from ``x [M, F]``.

    In each fold the probe is fitted on the train rows of ``x`` (penalty
    chosen by inner stratified cross-validation) and scores the test rows of
    ``x_eval`` (default ``x``): e.g. representations from training blocks to
    fit, from test blocks to score. Accuracy is pooled over folds; chance
    predicts each fold's majority training class.
    """
    config = config or AnalysisConfig()
    x_eval = x if x_eval is None else x_eval
    k = int(y.max()) + 1
    pred = np.full(len(y), -1)
    chance_pred = np.full(len(y), -1)
    chosen = []
    for train, test in folds:
        ytr = y[train]
        hits = np.zeros(len(_CLS_LAMBDAS))
        for itr, ite in stratified_folds(ytr, config.inner_folds, config.seed + 1):
            a, b = standardize(x[train][itr], x[train][ite])
            for j, lam in enumerate(_CLS_LAMBDAS):
                w, c = _fit_logistic(a, ytr[itr], k, lam, config.max_iter)
                hits[j] += ((b @ w + c).argmax(1) == ytr[ite]).sum()
        lam = _CLS_LAMBDAS[int(np.argmax(hits))]  # ties: the smallest penalty
        chosen.append(lam)
        a, b = standardize(x[train], x_eval[test])
        w, c = _fit_logistic(a, ytr, k, lam, config.max_iter)
        pred[test] = (b @ w + c).argmax(1)
        chance_pred[test] = np.bincount(ytr, minlength=k).argmax()
    scored = pred >= 0
    yt, yp, yc = y[scored], pred[scored], chance_pred[scored]
    present = np.unique(yt)
    return {
        "accuracy": float((yp == yt).mean()),
        "balanced_accuracy": float(np.mean([(yp[yt == c] == c).mean() for c in present])),
        "chance": float((yc == yt).mean()),
        "chance_balanced": float(1.0 / present.size),
        "n": int(scored.sum()),
        "folds": len(folds),
        "lambdas": chosen,
    }


def ridge_time_probe(
    x: np.ndarray, y: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, list[float]]:
    """R2 per column of ``y [T, B]`` on TEST frames from ``x [T, F]``.

    Fitted on TRAIN frames with each column's penalty chosen on VAL frames,
    then refitted on TRAIN + VAL. ``labels [T]`` are the protocol's split labels.
    R2 is NaN for a variable that is constant over the test frames.
    """
    ok = np.isfinite(y).all(1)
    train, val, test = ((labels == s) & ok for s in (TRAIN, VAL, TEST))
    if not val.any():  # short recordings: the last fifth of the training frames
        idx = np.flatnonzero(train)
        val = np.zeros_like(train)
        val[idx[int(0.8 * idx.size) :]] = True
        train = train & ~val
    xt, yt = torch.from_numpy(x).double(), torch.from_numpy(np.nan_to_num(y)).double()
    lams, cols = [], []
    fit = train | val
    for j in range(y.shape[1]):  # each variable its own penalty, chosen on VAL
        col = slice(j, j + 1)
        lam = fit_ridge(xt[train], yt[train, col], xt[val], yt[val, col]).penalty
        lams.append(lam)
        cols.append(fit_ridge_at(xt[fit], yt[fit, col], lam).predict(xt[test]))
    pred = torch.cat(cols, dim=1).numpy()
    r2 = r2_score(pred, y[test])
    # A variable that does not vary in the test blocks (no running bout) has no R2.
    flat = y[test].var(0) <= 1e-6 * (y[fit].var(0) + 1e-12)
    return np.where(flat, np.nan, r2), lams


def mantel_test(
    a: np.ndarray, b: np.ndarray, permutations: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Spearman correlation between two ``[R, R]`` distance matrices, permutation p-value.

    The items of ``b`` are relabelled at random (rows and columns together);
    p is one-sided, for a correlation at least as large as observed:
    ``(1 + #{r_perm >= r}) / (1 + permutations)``.
    """
    n = a.shape[0]
    iu = np.triu_indices(n, 1)

    def ranks(m: np.ndarray) -> np.ndarray:
        out = np.empty((n, n))
        out[iu] = np.argsort(np.argsort(m[iu], kind="stable"), kind="stable")
        out.T[iu] = out[iu]
        return out

    ra, rb = ranks(a), ranks(b)  # relabelling permutes ranks: rank once
    va = (ra[iu] - ra[iu].mean()) / ra[iu].std()

    def corr(m: np.ndarray) -> float:
        v = m[iu]
        return float(np.mean(va * (v - v.mean()) / v.std()))

    r = corr(rb)
    rng = np.random.default_rng(seed)
    null = np.array(
        [corr(rb[np.ix_(p, p)]) for p in (rng.permutation(n) for _ in range(permutations))]
    )
    pearson = float(np.corrcoef(a[iu], b[iu])[0, 1])
    p = float((1 + (null >= r).sum()) / (1 + permutations))
    return {"spearman": r, "pearson": pearson, "p": p, "permutations": permutations, "items": n}


# ---------------------------------------------------------------------------
# Features


def hand_features(
    z: np.ndarray,
    dff_sd: np.ndarray,
    behavior: np.ndarray | None,
    behavior_names: tuple[str, ...],
    frames: np.ndarray,
) -> tuple[np.ndarray, list[str]]:
    """Hand-made per-neuron features of the raw traces on ``frames`` (bool ``[T]``).

    ``z [N, T]`` z-scored dF/F (NaN allowed), ``dff_sd [N]`` s.d. of dF/F.
    Features: correlation with each behaviour variable and with the
    population mean, event rate (fraction of frames above 2 s.d.), lag-1 and
    lag-5 autocorrelation, skewness, log s.d. of dF/F. Returns ``[N, F]`` and names.
    """
    x = z[:, frames].astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        x = np.nan_to_num(x - np.nanmean(x, 1, keepdims=True))
    sd = x.std(1) + 1e-8
    cols, names = [], []

    def corr(v: np.ndarray) -> np.ndarray:
        v = v - v.mean()
        return (x @ v) / (x.shape[1] * sd * (v.std() + 1e-8))

    if behavior is not None:
        for j, name in enumerate(behavior_names):
            cols.append(corr(np.nan_to_num(behavior[frames, j].astype(np.float64))))
            names.append(f"corr_{name}")
    cols.append(corr(x.mean(0)))
    names.append("corr_population")
    cols.append((x > 2 * sd[:, None]).mean(1))
    names.append("event_rate")
    idx = np.flatnonzero(frames)
    for lag in (1, 5):
        pos = np.searchsorted(idx, idx + lag)
        pair = (pos < idx.size) & (idx[np.minimum(pos, idx.size - 1)] == idx + lag)
        a, b = x[:, pair], x[:, pos[pair]]  # frames t and t + lag, both inside ``frames``
        cols.append((a * b).mean(1) / sd**2 if a.shape[1] else np.zeros(len(x)))
        names.append(f"autocorr_lag{lag}")
    cols.append((x**3).mean(1) / sd**3)
    names.append("skewness")
    cols.append(np.log(dff_sd + 1e-8))
    names.append("log_sd_dff")
    return np.nan_to_num(np.stack(cols, 1)), names


def causal_mean(z: np.ndarray, frames: int) -> np.ndarray:
    """Mean of the last ``frames`` samples (fewer at the start), ``[N, T]``."""
    c = np.cumsum(z, axis=1)
    out = c.copy()
    out[:, frames:] -= c[:, :-frames]
    return out / np.minimum(np.arange(1, z.shape[1] + 1), frames)


def read_truth_types(session: Any) -> tuple[np.ndarray | None, str]:
    """The simulator's functional type of every neuron, or ``(None, why not)``.

    Reads ``<folder>/truth/<session_id>.truth.npz`` beside the session file
    and aligns its rows to the session's neurons through the simulator ids
    (``...-n0123`` is pool cell 123), so dropped neurons stay aligned.
    """
    path = Path(session.source).parent / "truth" / f"{session.session_id}.truth.npz"
    if not session.source or not path.is_file():
        return None, f"no simulator truth at {path}"
    with np.load(path, allow_pickle=False) as f:
        types, pool = f["neuron_types"].astype(str), f["pool_index"]
    if session.neuron_ids is None:
        if len(types) != session.n_neurons:
            return None, f"{path} has {len(types)} neurons, the session {session.n_neurons}"
        return types, ""
    row = {int(c): i for i, c in enumerate(pool)}
    out = []
    for nid in session.neuron_ids:
        m = re.search(r"-n(\d+)$", nid)
        if m is None or int(m.group(1)) not in row:
            return None, f"neuron id {nid!r} has no row in {path}"
        out.append(types[row[int(m.group(1))]])
    return np.array(out), ""


def read_region_centroids(session: Any) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """``region_centroids.npy`` beside a region-trace file, aligned to the session's regions.

    The Légaré file holds ``[2R, 3]`` rows for ``R`` labelled regions: rows
    ``i`` and ``i + R`` share y and z and mirror x about the midline - the
    same region in the two hemispheres. Returns the two hemispheres'
    ``[N, 3]`` centroids (``None, None, why`` when there are none).
    """
    folder = Path(session.source).parent if session.source else None
    if folder is None or not (folder / "region_centroids.npy").is_file():
        return None, None, "no region_centroids.npy beside the data"
    cent = np.load(folder / "region_centroids.npy", allow_pickle=False)
    for name in ("region_acronyms.npy", "region_names.npy"):
        if (folder / name).is_file():
            labels = [str(s) for s in np.load(folder / name, allow_pickle=False)]
            break
    else:
        return None, None, "no region_acronyms.npy or region_names.npy to align centroids"
    r = len(labels)
    if cent.shape not in ((r, 3), (2 * r, 3)) or session.neuron_ids is None:
        return None, None, f"centroids {cent.shape} do not match {r} region labels"
    pos = {s: i for i, s in enumerate(labels)}
    if any(nid not in pos for nid in session.neuron_ids):
        return None, None, "session regions are not among the centroid labels"
    idx = np.array([pos[nid] for nid in session.neuron_ids])
    second = cent[idx + r] if cent.shape[0] == 2 * r else cent[idx]
    return cent[idx], second, ""
