"""Representation analysis: the probes on problems with known answers, and `calm-rt analyze`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from calm_rt.cli import main
from calm_rt.data import SimConfig, simulate_corpus
from calm_rt.data.splits import Protocol
from calm_rt.model import PRESETS, CalM, save_checkpoint
from calm_rt.offline.analysis import (
    classification_probe,
    group_folds,
    hand_features,
    mantel_test,
    ridge_time_probe,
    stratified_folds,
)

PROBE_KEYS = {"name", "level", "target", "split", "metric", "model", "baseline", "combined"}
PROBE_KEYS |= {"chance", "n", "folds"}


def _classes(n_per_class: int = 60, k: int = 3, dims: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n_per_class)
    x = rng.normal(size=(y.size, dims))
    x[np.arange(y.size), y] += 6.0  # class c is far out along axis c: linearly separable
    return x, y


def test_probe_decodes_a_separable_class_and_not_shuffled_labels():
    x, y = _classes()
    res = classification_probe(x, y, stratified_folds(y, 5))
    assert res["accuracy"] > 0.97 and res["balanced_accuracy"] > 0.97
    assert res["chance"] == pytest.approx(1 / 3, abs=0.02)
    assert res["n"] == y.size and res["folds"] == 5

    shuffled = np.random.default_rng(1).permutation(y)
    res = classification_probe(x, shuffled, stratified_folds(shuffled, 5))
    assert abs(res["accuracy"] - 1 / 3) < 0.12


def test_probe_scores_other_features_and_held_out_groups():
    x, y = _classes()
    groups = np.tile(np.arange(3), y.size // 3)  # every group holds every class
    res = classification_probe(x, y, group_folds(groups), x_eval=x + 0.1)
    assert res["folds"] == 3 and res["accuracy"] > 0.95
    # Evaluating on features that carry no class information drops to chance.
    noise = np.random.default_rng(2).normal(size=x.shape)
    res = classification_probe(x, y, group_folds(groups), x_eval=noise)
    assert res["accuracy"] < 0.55


def test_folds_are_stratified_and_cover_every_row_once():
    y = np.array([0] * 50 + [1] * 10)
    folds = stratified_folds(y, 5, seed=3)
    tests = np.concatenate([te for _, te in folds])
    assert np.array_equal(np.sort(tests), np.arange(y.size))
    for train, test in folds:
        assert not set(train) & set(test)
        assert (y[test] == 1).sum() == 2


def test_ridge_time_probe_scores_test_blocks_only():
    rng = np.random.default_rng(0)
    t = 3000
    labels = Protocol(block_frames=100).labels(t)
    x = rng.normal(size=(t, 5))
    y = np.stack([x @ [1.0, -2.0, 0.5, 0.0, 0.0] + 0.1 * rng.normal(size=t),
                  rng.normal(size=t)], 1)  # fmt: skip
    r2, lams = ridge_time_probe(x, y, labels)
    assert r2[0] > 0.95 and r2[1] < 0.05 and len(lams) == 2
    y[:, 1] = np.where(labels == 2, 1.0, y[:, 1])  # constant on test blocks: no R2
    assert np.isnan(ridge_time_probe(x, y, labels)[0][1])


def test_mantel_finds_shared_structure_and_not_chance():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(25, 3))
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    res = mantel_test(d, d**2 + 0.01 * d, permutations=200)
    assert res["spearman"] > 0.99 and res["p"] < 0.01
    other = rng.normal(size=(25, 3))
    res = mantel_test(d, np.linalg.norm(other[:, None] - other[None], axis=-1), permutations=200)
    assert res["p"] > 0.01 and abs(res["spearman"]) < 0.3


def test_hand_features_see_smoothness_and_behaviour():
    rng = np.random.default_rng(0)
    t = 2000
    beh = rng.normal(size=(t, 1)).cumsum(0)
    z = np.stack([beh[:, 0] + 0.1 * rng.normal(size=t), rng.normal(size=t)])
    feats, names = hand_features(z, np.ones(2), beh, ("speed",), np.ones(t, bool))
    col = {n: feats[:, i] for i, n in enumerate(names)}
    assert col["corr_speed"][0] > 0.9 and abs(col["corr_speed"][1]) < 0.1
    assert col["autocorr_lag1"][0] > 0.9 and abs(col["autocorr_lag1"][1]) < 0.1


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    simulate_corpus(SimConfig(animals=2, sessions=1, neurons=30, frames=1500), root / "sim")
    torch.manual_seed(0)
    save_checkpoint(CalM(PRESETS["tiny"]), root / "ckpt")
    return root


def test_analyze_writes_probes_and_figures(tiny_setup, capsys):
    out = tiny_setup / "out"
    argv = ["analyze", "--data", str(tiny_setup / "sim"), "--out", str(out)]
    argv += ["--checkpoint", str(tiny_setup / "ckpt"), "--block-frames", "200", "--folds", "3"]
    assert main(argv) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert result["format"] == "calm-rt-analysis" and len(result["sessions"]) == 2
    assert all(s["truth"] for s in result["sessions"])
    names = {p["name"] for p in result["probes"]}
    assert {"type", "type_heldout_animal", "session", "animal", "behavior:mean"} <= names
    for p in result["probes"]:
        assert PROBE_KEYS <= set(p), p["name"]
    type_row = next(p for p in result["probes"] if p["name"] == "type")
    assert type_row["n"] == 60 and set(type_row["classes"]) <= {
        "latent", "running", "pupil", "stimulus",
    }  # fmt: skip
    assert {"skipped", "features", "figures", "checkpoint"} <= set(result)
    for name in ("pca.png", "probes.png"):
        assert name in result["figures"]
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
    assert "type_heldout_animal" in capsys.readouterr().out


def test_analyze_region_data_tests_anatomy(tmp_path, tiny_setup):
    """A region-trace folder with centroids, like the Légaré zebrafish data."""
    rng = np.random.default_rng(0)
    regions, frames = 12, 400
    pos = rng.uniform(0, 300, size=(regions, 3))
    # Nearby regions share a slow signal, so raw correlations follow anatomy.
    sources = rng.normal(size=(4, frames)).cumsum(1)
    weights = np.exp(-np.linalg.norm(pos[:, None] - rng.uniform(0, 300, (1, 4, 3)), axis=-1) / 80)
    traces = weights @ sources + 0.5 * rng.normal(size=(regions, frames))
    mirror = pos.copy()
    mirror[:, 0] = 600 - mirror[:, 0]
    np.save(tmp_path / "timeseries_regions_fishX.npy", traces)
    np.save(tmp_path / "region_acronyms.npy", np.array([f"R{i}" for i in range(regions)]))
    np.save(tmp_path / "region_centroids.npy", np.concatenate([pos, mirror]))
    out = tmp_path / "out"
    argv = ["analyze", "--data", str(tmp_path), "--out", str(out), "--fps", "1"]
    argv += ["--block-frames", "64", "--checkpoint", str(tiny_setup / "ckpt")]
    argv += ["--permutations", "200"]
    assert main(argv) == 0
    result = json.loads((out / "analysis.json").read_text())
    anatomy = result["anatomy"]
    assert anatomy["regions"] == regions
    for key in ("representation_vs_anatomy", "raw_vs_anatomy", "representation_vs_raw"):
        assert {"spearman", "pearson", "p", "permutations"} <= set(anatomy[key])
        assert 0 < anatomy[key]["p"] <= 1
    assert anatomy["raw_vs_anatomy"]["spearman"] > 0.2
    assert {s["probe"] for s in result["skipped"]} >= {"type", "session", "animal", "behavior"}
    assert (out / "anatomy.png").stat().st_size < 200_000
