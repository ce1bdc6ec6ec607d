"""Representation analysis: linear probes of what CalM learned about neurons and populations.

Two kinds of representation come out of :meth:`CalM.run_offline` (hidden
states ``[N, T, W]``):

* **neuron representations** ``[N, W]``: how each neuron's hidden state
  co-varies with the population's (:func:`population_coupling`), computed
  over the frames of training blocks (probes are fitted on these) and,
  separately, over the frames of test blocks (held-out neurons are scored on
  these, so a probe never sees the frames it is scored on);
* **population representations** ``[T, F]`` per frame: the mean hidden state
  over neurons plus each neuron's hidden state on the 8 leading principal
  axes, concatenated (:class:`calm_rt.live.forecast_calibration.HiddenProjection`).

Every probe is linear and is run three times with the same protocol: on the
model's representation, on hand-made features of the raw traces (the
baseline), and on both together (what the model adds beyond the baseline).
Neuron-level probes are multinomial logistic regressions (L2 penalty chosen
by inner cross-validation) scored with stratified folds over neurons and,
for functional type, with whole animals held out. Behaviour probes are ridge
regressions fitted on training blocks, penalty chosen on validation blocks,
scored (R2) on test blocks - never random frames. Chance is the majority
class (classification) or R2 = 0 (regression).

For region-level recordings with anatomical centroids (the Légaré zebrafish
data), a Mantel test asks whether regions with similar representations lie
close together in the brain, compared with the same for raw-trace
correlation distances.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calm_rt.data.splits import TEST, TRAIN, PreparedSession
from calm_rt.live.forecast_calibration import HiddenProjection
from calm_rt.model import CalM
from calm_rt.offline.probes import (
    AnalysisConfig,
    causal_mean,
    classification_probe,
    group_folds,
    hand_features,
    mantel_test,
    read_region_centroids,
    read_truth_types,
    ridge_time_probe,
    standardize,
    stratified_folds,
)

__all__ = [
    "AnalysisConfig",
    "NeuronSet",
    "classification_probe",
    "group_folds",
    "hand_features",
    "mantel_test",
    "population_coupling",
    "read_region_centroids",
    "read_truth_types",
    "ridge_time_probe",
    "run_analysis",
    "stratified_folds",
]

_FEATURE_SETS = ("model", "baseline", "combined")


# ---------------------------------------------------------------------------
# One session


@dataclass
class NeuronSet:
    """Per-neuron representations and labels of the sessions analysed, stacked."""

    rep_train: list[np.ndarray] = field(default_factory=list)  # [N, W] per session
    rep_test: list[np.ndarray] = field(default_factory=list)
    hand_train: list[np.ndarray] = field(default_factory=list)  # [N, F]
    hand_test: list[np.ndarray] = field(default_factory=list)
    session: list[str] = field(default_factory=list)  # one entry per neuron
    animal: list[str] = field(default_factory=list)
    types: list[str | None] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    hand_names: list[str] = field(default_factory=list)

    def stack(self, name: str) -> np.ndarray:
        return np.concatenate(getattr(self, name), 0)


def _summarise_session(
    model: CalM, ps: PreparedSession, config: AnalysisConfig, neurons: NeuronSet
) -> dict[str, Any]:
    """Run the model over one session; append its neuron features; probe its behaviour."""
    s = ps.session
    train, test = ps.labels == TRAIN, ps.labels == TEST
    if not test.any():  # too short for a test block: neurons are scored on training frames
        test = train
    hidden = model.run_offline(torch.from_numpy(ps.z)).hidden  # [N, T, W]
    neurons.rep_train.append(population_coupling(hidden, train))
    neurons.rep_test.append(population_coupling(hidden, test))
    # z is the engine's running z-score of dF/F; its scale is the dF/F s.d.
    dff_sd = _dff_sd(ps)
    for frames, out in ((train, neurons.hand_train), (test, neurons.hand_test)):
        feats, names = hand_features(ps.z, dff_sd, ps.behavior, s.behavior_names, frames)
        out.append(feats)
    neurons.hand_names = names
    types, why = read_truth_types(s)
    neurons.session += [s.session_id] * s.n_neurons
    neurons.animal += [s.animal_id or s.session_id] * s.n_neurons
    neurons.ids += list(s.neuron_ids or [str(i) for i in range(s.n_neurons)])
    neurons.types += list(types) if types is not None else [None] * s.n_neurons
    info: dict[str, Any] = {
        "session_id": s.session_id,
        "animal_id": s.animal_id,
        "neurons": s.n_neurons,
        "frames": s.n_frames,
        "train_frames": int(train.sum()),
        "test_frames": int((ps.labels == TEST).sum()),
        "truth": types is not None,
    }
    if types is None:
        info["truth_note"] = why
    if not (ps.labels == TEST).any():
        info["note"] = "no test block: neuron probes scored on training-block representations"
    if ps.behavior is not None and (ps.labels == TEST).any():
        info["behavior"] = _behavior_probe(model, ps, hidden, config)
    z = np.nan_to_num(ps.z[:, train].astype(np.float64))
    info["_raw_corr"] = np.corrcoef(z) if s.n_neurons > 1 else np.ones((1, 1))
    return info


def population_coupling(hidden: torch.Tensor, frames: np.ndarray) -> np.ndarray:
    """Each neuron's representation ``[N, W]``: how its hidden state moves with the population's.

    Unit ``w`` of neuron ``i`` is the correlation over ``frames`` between
    ``hidden[i, :, w]`` and the population mean ``hidden[:, :, w].mean(0)``.
    Time-averaged hidden states were tried first: they mostly encode the
    session (decoding functional type below chance on held-out animals);
    the coupling carries the neuron's role in the population dynamics.
    """
    h = hidden[:, torch.from_numpy(frames)].double()  # [N, T', W]
    pop = h.mean(0, keepdim=True)
    hc, pc = h - h.mean(1, keepdim=True), pop - pop.mean(1, keepdim=True)
    denom = hc.std(1, unbiased=False) * pc.std(1, unbiased=False) + 1e-9
    return ((hc * pc).mean(1) / denom).numpy()


def _dff_sd(ps: PreparedSession) -> np.ndarray:
    from calm_rt.data import PreprocessConfig, preprocess_traces

    s = ps.session
    dff = preprocess_traces(s.traces, s.fps, s.kind, s.neuropil, PreprocessConfig(normalize=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sd = np.nanstd(dff[:, ps.labels == TRAIN], axis=1)
    return np.where(np.isfinite(sd), sd, 0.0)


def _behavior_probe(
    model: CalM, ps: PreparedSession, hidden: torch.Tensor, config: AnalysisConfig
) -> dict[str, dict[str, float]]:
    """R2 on test blocks per behaviour variable, for model, baseline and combined features."""
    train = ps.labels == TRAIN
    sample = np.flatnonzero(train)[:: max(1, int(train.sum()) // 2000)]
    projection = HiddenProjection.fit(hidden[:, sample], min(config.components, hidden.shape[-1]))
    ht = hidden.transpose(0, 1)  # [T, N, W]
    model_x = np.concatenate([ht.mean(1).double().numpy(), projection(ht).flatten(1).numpy()], 1)
    z = np.nan_to_num(ps.z.astype(np.float64))
    slow = causal_mean(z, model.config.context_frames)
    base_x = np.concatenate([z.T, slow.T, z.mean(0)[:, None], slow.mean(0)[:, None]], 1)
    y = ps.behavior.astype(np.float64)
    out: dict[str, dict[str, float]] = {}
    for name, x in (
        ("model", model_x),
        ("baseline", base_x),
        ("combined", np.concatenate([model_x, base_x], 1)),
    ):
        r2, _ = ridge_time_probe(x, y, ps.labels)
        out[name] = dict(zip(ps.session.behavior_names, map(float, r2)))
    return out


# ---------------------------------------------------------------------------
# The whole analysis


def _class_probes(
    name: str,
    target: str,
    labels: np.ndarray,
    neurons: NeuronSet,
    folds: list[tuple[np.ndarray, np.ndarray]],
    split: str,
    config: AnalysisConfig,
) -> dict[str, Any]:
    classes, y = np.unique(labels, return_inverse=True)
    rep_tr, rep_te = neurons.stack("rep_train"), neurons.stack("rep_test")
    hand_tr, hand_te = neurons.stack("hand_train"), neurons.stack("hand_test")
    sets = {
        "model": (rep_tr, rep_te),
        "baseline": (hand_tr, hand_te),
        "combined": (np.hstack([rep_tr, hand_tr]), np.hstack([rep_te, hand_te])),
    }
    row: dict[str, Any] = {"name": name, "level": "neuron", "target": target, "split": split}
    row["metric"] = "accuracy"
    for key, (xf, xe) in sets.items():
        res = classification_probe(xf, y, folds, xe, config)
        row[key] = res["accuracy"]
        row[f"{key}_balanced"] = res["balanced_accuracy"]
        row.update(chance=res["chance"], chance_balanced=res["chance_balanced"], n=res["n"])
        row["folds"] = res["folds"]
    row["classes"] = {str(c): int((y == i).sum()) for i, c in enumerate(classes)}
    return row


def run_analysis(
    model: CalM,
    prepared: list[PreparedSession],
    out_dir: str | Path,
    config: AnalysisConfig | None = None,
    progress: Callable[[str], None] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Probe ``model``'s representations of ``prepared`` sessions; write JSON and figures.

    Writes ``analysis.json``, ``pca.png``, ``probes.png`` and, for region
    data with centroids, ``anatomy.png`` into ``out_dir``. Returns the JSON
    content.
    """
    config = config or AnalysisConfig()
    say = progress or (lambda msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    neurons = NeuronSet()
    sessions = []
    for i, ps in enumerate(prepared):
        say(
            f"[{i + 1}/{len(prepared)}] {ps.session.session_id}: "
            f"{ps.n_neurons} neurons x {ps.session.n_frames} frames"
        )
        sessions.append(_summarise_session(model, ps, config, neurons))
    probes, skipped = [], []
    animals, sess = np.array(neurons.animal), np.array(neurons.session)
    strat = f"stratified {config.folds}-fold over neurons"
    specs = []  # name, target, labels, folds, split
    if all(t is not None for t in neurons.types):
        y = np.array(neurons.types)
        target = "functional type (simulator truth)"
        specs.append(("type", target, y, stratified_folds(y, config.folds, config.seed), strat))
        if np.unique(animals).size > 1:
            held = "held-out animal (leave one animal out)"
            specs.append(("type_heldout_animal", target, y, group_folds(animals), held))
        else:
            skipped.append({"probe": "type_heldout_animal", "reason": "one animal only"})
    else:
        why = next((s.get("truth_note") for s in sessions if not s["truth"]), "")
        skipped.append({"probe": "type", "reason": f"no simulator truth ({why})"})
    for name, labels in (("session", sess), ("animal", animals)):
        if np.unique(labels).size < 2:
            skipped.append({"probe": name, "reason": f"one {name} only"})
            continue
        folds = stratified_folds(labels, config.folds, config.seed)
        specs.append((name, f"{name} identity", labels, folds, strat))
    for name, target, labels, folds, split in specs:
        say(f"probing {name}: {split}, {len(labels)} neurons")
        probes.append(_class_probes(name, target, labels, neurons, folds, split, config))
    beh = [s for s in sessions if "behavior" in s]
    if beh:
        probes += _behavior_rows(beh)
    else:
        skipped.append({"probe": "behavior", "reason": "no session has behaviour and test blocks"})
    result: dict[str, Any] = {
        "format": "calm-rt-analysis",
        "version": 1,
        **(meta or {}),
        "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "features": {
            "neuron_model": "correlation of each DAT hidden unit with the population mean, over training-block frames (fit) / test-block frames (score)",
            "neuron_baseline": neurons.hand_names,
            "population_model": "mean hidden state over neurons + each neuron's hidden state on 8 principal axes",
            "population_baseline": "each neuron's z at t and its mean over the last context frames, and their population means",
        },
        "sessions": [{k: v for k, v in s.items() if not k.startswith("_")} for s in sessions],
        "probes": probes,
        "skipped": skipped,
    }
    anatomy, maps, why = _anatomy(prepared, neurons, sessions, config, say)
    colour = None
    if anatomy is None:
        skipped.append({"probe": "anatomy", "reason": why})
    else:
        result["anatomy"] = anatomy
        colour = ("centroid y (atlas axis 1)", maps["centroids"][:, 1])
    figures = [
        plot_pca(neurons, out / "pca.png", colour),
        plot_probes(probes, skipped, out / "probes.png"),
    ]
    if anatomy is not None:
        figures.append(plot_anatomy(maps, anatomy, out / "anatomy.png"))
    result["figures"] = [p.name for p in figures]
    (out / "analysis.json").write_text(json.dumps(_jsonable(result), indent=2))
    return result


def _behavior_rows(beh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One probe row per behaviour variable and their mean, averaged over sessions."""
    names = list(beh[0]["behavior"]["model"])
    rows = []
    for var in [*names, "mean"]:
        row: dict[str, Any] = {"name": f"behavior:{var}", "level": "population", "target": var}
        row.update(split="time blocks: fit train, penalty on val, score test", metric="r2")
        scored = [s for s in beh if np.isfinite(_r2(s, "model", var, names))]
        for key in _FEATURE_SETS:
            row[key] = float(np.mean([_r2(s, key, var, names) for s in scored] or [np.nan]))
        row.update(chance=0.0, n=int(sum(s["test_frames"] for s in scored)), folds=len(scored))
        if len(scored) < len(beh):
            left = len(beh) - len(scored)
            row["note"] = f"{left} session(s) left out: no variance in their test blocks"
        rows.append(row)
    return rows


def _r2(session: dict[str, Any], key: str, var: str, names: list[str]) -> float:
    """One session's test R2 of ``var`` (``"mean"``: over all variables) for feature set ``key``."""
    r2 = session["behavior"][key]
    if var != "mean":
        return r2[var]
    vals = [r2[n] for n in names if np.isfinite(r2[n])]  # variables that vary in the test blocks
    return float(np.mean(vals)) if vals else float("nan")


def _anatomy(
    prepared: list[PreparedSession],
    neurons: NeuronSet,
    sessions: list[dict[str, Any]],
    config: AnalysisConfig,
    say: Callable[[str], None],
) -> tuple[dict[str, Any] | None, dict[str, np.ndarray] | None, str]:
    """Mantel tests for the first session with region centroids: results, distance maps, or why not."""
    reasons = set()
    for i, ps in enumerate(prepared):
        cent, mirror, why = read_region_centroids(ps.session)
        if cent is None:
            reasons.add(why)
            continue
        say(
            f"Mantel tests: representation and raw distances vs. centroid distances ({config.permutations} permutations)"
        )
        rep = neurons.rep_train[i]
        d_rep = np.linalg.norm(rep[:, None] - rep[None], axis=-1)
        d_raw = 1.0 - sessions[i]["_raw_corr"]
        d_anat = np.linalg.norm(cent[:, None] - cent[None], axis=-1)
        d_mirror = np.linalg.norm(mirror[:, None] - mirror[None], axis=-1)
        test = lambda a, b: mantel_test(a, b, config.permutations, config.seed)  # noqa: E731
        result = {
            "session_id": ps.session.session_id,
            "regions": int(cent.shape[0]),
            "representation_distance": "Euclidean between training-block mean hidden states",
            "raw_distance": "1 - Pearson r of z-scored traces on training blocks",
            "anatomical_distance": "Euclidean between centroids (rows 0..R-1 of region_centroids.npy)",
            "representation_vs_anatomy": test(d_rep, d_anat),
            "raw_vs_anatomy": test(d_raw, d_anat),
            "representation_vs_raw": test(d_rep, d_raw),
            "representation_vs_anatomy_other_hemisphere": test(d_rep, d_mirror),
            "raw_vs_anatomy_other_hemisphere": test(d_raw, d_mirror),
        }
        maps = {"representation": d_rep, "raw": d_raw, "anatomy": d_anat, "centroids": cent}
        return result, maps, ""
    return None, None, "; ".join(sorted(reasons))


def _jsonable(obj: Any) -> Any:
    """NaN and inf to None, numpy scalars to Python, so the JSON is strict."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# ---------------------------------------------------------------------------
# Figures (matplotlib's object API: no pyplot, no global backend change)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _pca2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First two principal components of standardised rows, and their variance fractions."""
    (xs,) = standardize(x)
    _, s, vt = np.linalg.svd(xs, full_matrices=False)
    return xs @ vt[:2].T, (s[:2] ** 2) / (s**2).sum()


def plot_pca(neurons: NeuronSet, path: Path, colour: tuple[str, np.ndarray] | None = None) -> Path:
    """PCA of neuron representations (model and baseline features), coloured by type.

    Without truth types, points are coloured by ``colour`` (a name and one
    value per neuron, e.g. a centroid coordinate) or else by session.
    """
    fig = _figure(10, 4.4)
    types = neurons.types
    if all(t is not None for t in types):
        groups, title = np.array(types), "functional type (simulator truth)"
    elif colour is None:
        groups, title = np.array(neurons.session), "session"
    else:
        groups, title = None, colour[0]
    for i, (key, label) in enumerate((("rep_train", "CalM neuron representation"),
                                      ("hand_train", "raw-trace features (baseline)"))):  # fmt: skip
        ax = fig.add_subplot(1, 2, i + 1)
        pc, frac = _pca2(neurons.stack(key))
        if groups is None:
            sc = ax.scatter(pc[:, 0], pc[:, 1], c=colour[1], cmap="viridis", s=18)
            fig.colorbar(sc, ax=ax, label=title)
            if len(pc) <= 100:
                for (px, py), name in zip(pc, neurons.ids):
                    ax.annotate(name, (px, py), fontsize=6, alpha=0.7)
        else:
            for g in np.unique(groups):
                m = groups == g
                ax.scatter(pc[m, 0], pc[m, 1], s=8, alpha=0.7, label=str(g))
            if np.unique(groups).size <= 10:
                ax.legend(fontsize=7, title=title, title_fontsize=7, markerscale=1.5)
        ax.set_xlabel(f"PC1 ({100 * frac[0]:.0f}% var.)")
        ax.set_ylabel(f"PC2 ({100 * frac[1]:.0f}% var.)")
        ax.set_title(label, fontsize=10)
    unit = "neurons" if groups is not None else "regions"
    fig.suptitle(f"{len(neurons.ids)} {unit}, coloured by {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_probes(probes: list[dict[str, Any]], skipped: list[dict[str, str]], path: Path) -> Path:
    """Grouped bars per probe: model, baseline, model + baseline, and the chance level."""
    fig = _figure(8, 1.2 + 0.55 * max(len(probes), 2))
    ax = fig.add_subplot(1, 1, 1)
    colours = {"model": "tab:blue", "baseline": "tab:orange", "combined": "tab:gray"}
    labels = []
    for i, row in enumerate(probes):
        for j, key in enumerate(_FEATURE_SETS):
            v = row[key] if row[key] is not None and np.isfinite(row[key]) else np.nan
            y = i + (j - 1) * 0.26
            ax.barh(y, max(v, -0.2) if np.isfinite(v) else 0.0, height=0.24,
                    color=colours[key], label=key if i == 0 else None)  # fmt: skip
            text = f"{v:.2f}" if np.isfinite(v) else "n/a"
            ax.text(max(v, 0) + 0.01 if np.isfinite(v) else 0.01, y, text, va="center", fontsize=7)
        ax.plot([row["chance"]] * 2, [i - 0.45, i + 0.45], "k--", lw=1,
                label="chance" if i == 0 else None)  # fmt: skip
        labels.append(f"{row['name']}\n{row['split'].split(':')[0]} [{row['metric']}]")
    ax.set_yticks(range(len(probes)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(-0.2, 1.12)
    ax.set_xlabel("accuracy (neuron probes) / R2 on test blocks (behaviour)")
    if probes:
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.set_yticks([])
        text = "\n".join(f"{s['probe']}: skipped ({s['reason']})" for s in skipped)
        ax.text(0.45, 0.5, text or "no probes", ha="center", va="center", fontsize=8, wrap=True)
    ax.set_title("linear probes: CalM representation vs raw-trace baseline", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_anatomy(maps: dict[str, np.ndarray], result: dict[str, Any], path: Path) -> Path:
    """Pairwise distances: representation and raw-trace vs anatomical, with Mantel statistics."""
    d_rep, d_raw, d_anat = maps["representation"], maps["raw"], maps["anatomy"]
    fig = _figure(12, 3.8)
    iu = np.triu_indices(d_rep.shape[0], 1)
    panels = (
        (
            d_anat,
            d_rep,
            "representation_vs_anatomy",
            "centroid distance",
            "representation distance",
        ),
        (d_anat, d_raw, "raw_vs_anatomy", "centroid distance", "1 - r (raw traces)"),
        (d_raw, d_rep, "representation_vs_raw", "1 - r (raw traces)", "representation distance"),
    )
    for i, (a, b, key, xl, yl) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.scatter(a[iu], b[iu], s=3, alpha=0.3)
        m = result[key]
        ax.set_title(
            f"{key.replace('_', ' ')}\nSpearman {m['spearman']:.2f}, p = {m['p']:.3g}", fontsize=9
        )
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
    fig.suptitle(
        f"{result['session_id']}: {result['regions']} regions, {iu[0].size} pairs", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path)
    return path
