"""Frame-to-trace extraction: motion correction, ROI formats, segmentation, bad frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import roifile
from scipy import sparse

from calm_rt.data import (
    MovieTruth,
    SimConfig,
    make_animal,
    open_movie,
    read_imagej_rois,
    render_movie,
    simulate_session,
    traces_from_masks,
)
from calm_rt.errors import ConfigError, DataError
from calm_rt.extract import (
    Footprints,
    FrameFlags,
    MotionConfig,
    MotionCorrector,
    RoiExtractor,
    SegmentConfig,
    load_rois,
    segment_movie,
)

# A small field (160 px, 50 cells, 500 frames at 30 Hz) with the simulator's
# default motion (AR(1) wander, s.d. 1.5 px, up to 4.5 px): about 3 s to render.
SIM = SimConfig(
    animals=1,
    sessions=1,
    neurons=50,
    frames=500,
    movie=True,
    movie_size=160,
    motion_px=1.5,
    seed=3,
)
# Phase correlation on a 128 px central square of the 160 px frame, so the
# cropped path is the one tested.
MOTION = MotionConfig(crop=128)


@pytest.fixture(scope="module")
def sim() -> tuple[np.ndarray, MovieTruth]:
    session, truth = simulate_session(SIM, make_animal(SIM, 0), 0)
    frames, mtruth = render_movie(session, truth, SIM)
    return np.concatenate(list(frames())), mtruth


def _truth_footprints(t: MovieTruth) -> Footprints:
    n = t.centers.shape[0]
    w = sparse.csr_matrix(
        (t.footprint_weights, t.footprint_pixels, t.footprint_indptr),
        shape=(n, t.shape[0] * t.shape[1]),
    )
    return Footprints(w, t.shape, tuple(str(i) for i in range(n)))


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson r of ``[N, T]`` arrays."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def _run(ex: RoiExtractor, movie: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[FrameFlags]]:
    out = [ex.extract(frame) for frame in movie]
    f = np.stack([o[0] for o in out], axis=1)  # [R, T]
    fneu = np.stack([o[1] for o in out], axis=1)
    return f, fneu, [o[2] for o in out]


# ---------------------------------------------------------------------------
# accuracy on simulated movies


def test_motion_corrected_traces_match_the_truth(sim):
    movie, truth = sim
    fp = _truth_footprints(truth)
    f, fneu, flags = _run(RoiExtractor(fp, motion=MOTION), movie)
    # Our shift is the scene's displacement, the simulator's convention:
    # anchored to the ROIs, it should equal truth.shifts on every frame.
    shifts = np.array([(fl.shift_y, fl.shift_x) for fl in flags])
    err = np.abs(shifts - truth.shifts)
    assert err.max() < 0.5, err.max()
    assert np.median(err) < 0.1
    assert not any(fl.any for fl in flags)
    assert sum(fl.motion_warmup for fl in flags) == MOTION.reference_frames
    r = _pearson(f - 0.7 * fneu, truth.cell_fluorescence)
    assert np.median(r) >= 0.9, np.median(r)
    # Without correction the same ROIs do measurably worse.
    f0, fneu0, _ = _run(RoiExtractor(fp), movie)
    r0 = _pearson(f0 - 0.7 * fneu0, truth.cell_fluorescence)
    assert np.median(r) > np.median(r0) + 0.03


@pytest.mark.parametrize(
    "config",
    [
        MotionConfig(crop=128, anchor="none"),
        MotionConfig(crop=None, anchor="mean", reference_tau=100),
    ],
    ids=["first-frame", "mean-anchor-updated-reference"],
)
def test_motion_corrector_alone_is_right_up_to_its_origin(sim, config):
    movie, truth = sim
    mc = MotionCorrector(movie.shape[1:], config)
    est = np.array([(e.dy, e.dx) for e in map(mc.register, movie)])
    assert mc.ready and mc.anchor_used == config.anchor
    # Without ROIs the origin is the first frame's (or the warm-up's mean)
    # position: a constant offset, the same for every frame after the warm-up.
    err = est[config.reference_frames :] - truth.shifts[config.reference_frames :]
    assert np.abs(err - np.median(err, axis=0)).max() < 0.5


def test_given_reference_skips_the_warm_up(sim):
    movie, _ = sim
    mc = MotionCorrector(movie.shape[1:], MOTION)
    for frame in movie[:60]:
        mc.register(frame)
    given = MotionCorrector(movie.shape[1:], MOTION, reference=mc.reference)
    first = given.register(movie[100])
    assert given.ready and not first.warmup
    again = mc.register(movie[100])
    assert abs(first.dy - again.dy) < 1e-3 and abs(first.dx - again.dx) < 1e-3


def test_segmentation_finds_the_cells_and_extraction_continues(sim):
    movie, truth = sim
    n = 200  # frames to learn from; the other 300 are extracted
    seg = segment_movie(movie, SegmentConfig(frames=n, cell_diameter=9.0))
    assert seg.frames == n and seg.footprints is not None
    assert seg.correlation_image.shape == seg.mean_image.shape == truth.shape
    # The ROIs live in the reference's coordinates (the first frame's
    # position); continue with the same corrector and its shifts tell the
    # offset to the simulator's coordinates.
    ex = RoiExtractor(seg.footprints, motion=seg.motion)
    f, fneu, flags = _run(ex, movie[n:])
    est = np.array([(fl.shift_y, fl.shift_x) for fl in flags])
    offset = np.median(truth.shifts[n:] - est, axis=0)
    found = seg.footprints.centers()
    dist = np.linalg.norm((truth.centers + offset)[:, None] - found[None], axis=-1)
    recall = (dist.min(axis=1) <= 3).mean()
    precision = (dist.min(axis=0) <= 3).mean()
    assert recall >= 0.7, recall
    assert precision >= 0.7, precision
    assert np.isfinite(f).all() and f.shape == (seg.footprints.n_rois, len(movie) - n)
    # Traces of the found cells follow their true fluorescence.
    match = dist.argmin(axis=0)[dist.min(axis=0) <= 3]
    good = dist.min(axis=0) <= 3
    r = _pearson((f - 0.7 * fneu)[good], truth.cell_fluorescence[match, n:])
    assert np.median(r) >= 0.8, np.median(r)
    # The correlation image alone (no mean image) finds only cells that
    # fired in the 200 frames; still most of them here (0.78 when written).
    alone = segment_movie(movie, SegmentConfig(frames=n, cell_diameter=9.0, mean_weight=0.0))
    dist = np.linalg.norm(
        (truth.centers + offset)[:, None] - alone.footprints.centers()[None], axis=-1
    )
    assert (dist.min(axis=1) <= 3).mean() >= 0.6
    assert (dist.min(axis=0) <= 3).mean() >= 0.8


def test_real_sima_movie_with_imagej_rois(shared_data: Path):
    folder = shared_data / "sima"
    with open_movie(folder / "example.tif") as m:
        movie = m[:]
    shape = movie.shape[1:]
    rois = load_rois(folder / "imageJ_ROIs.zip", shape)
    assert rois.n_rois == 2
    ex = RoiExtractor(rois, motion=MotionConfig(reference_frames=10))
    f, fneu, _ = _run(ex, movie)
    assert f.shape == fneu.shape == (2, 20)
    assert np.isfinite(f).all() and np.isfinite(fneu).all()
    assert (f > 0).all() and ex.motion is not None and ex.motion.ready
    # Without motion correction the ROI means are exactly the offline reference's.
    plain, _, _ = _run(RoiExtractor(rois), movie)
    expected = traces_from_masks(movie, read_imagej_rois(folder / "imageJ_ROIs.zip", shape))
    np.testing.assert_allclose(plain, expected, rtol=1e-5)


# ---------------------------------------------------------------------------
# ROI formats


def _write_suite2p(folder: Path, with_ops: bool = True) -> None:
    folder.mkdir(parents=True)
    stat = np.array(
        [
            {
                "ypix": np.array([2, 2, 3]),
                "xpix": np.array([4, 5, 4]),
                "lam": np.array([1.0, 0.5, 0.5]),
            },
            {"ypix": np.array([10, 11]), "xpix": np.array([10, 10]), "lam": np.array([2.0, 2.0])},
            {"ypix": np.array([15]), "xpix": np.array([3]), "lam": np.array([1.0])},
        ],
        dtype=object,
    )
    np.save(folder / "stat.npy", stat, allow_pickle=True)
    np.save(folder / "iscell.npy", np.array([[1.0, 0.9], [0.0, 0.2], [1.0, 0.8]]))
    if with_ops:
        ops = {"Ly": 20, "Lx": 24, "meanImg": np.ones((20, 24), np.float32)}
        np.save(folder / "ops.npy", np.array(ops, dtype=object), allow_pickle=True)


def test_suite2p_rois(tmp_path):
    from calm_rt.extract import load_rois

    plane = tmp_path / "suite2p" / "plane0"
    _write_suite2p(plane)
    for path in (tmp_path, plane, plane / "stat.npy"):
        fp = load_rois(path)
        assert fp.shape == (20, 24) and fp.names == ("suite2p_0", "suite2p_2")
        dense = fp.dense()
        assert dense[0, 2, 4] == 1.0 and dense[0, 2, 5] == 0.5 and dense[1, 15, 3] == 1.0
        assert fp.reference is not None and fp.reference.shape == (20, 24)
    bare = tmp_path / "bare"
    _write_suite2p(bare, with_ops=False)
    with pytest.raises(DataError, match="shape"):
        load_rois(bare / "stat.npy")
    assert load_rois(bare / "stat.npy", shape=(20, 24)).n_rois == 2
    with pytest.raises(DataError, match="outside"):
        load_rois(bare / "stat.npy", shape=(12, 24))


def test_npz_and_imagej_rois(tmp_path):
    labels = np.zeros((20, 24), np.int32)
    labels[2:5, 2:5] = 3
    labels[10:14, 10:12] = 7
    np.savez(tmp_path / "labels.npz", labels=labels)
    fp = load_rois(tmp_path / "labels.npz")
    assert fp.n_rois == 2 and fp.dense()[1, 10, 10] == 1.0 and fp.dense().sum() == 9 + 8
    weights = np.zeros((1, 20, 24), np.float32)
    weights[0, 5, 5] = 2.0
    np.savez(tmp_path / "weights.npz", footprints=weights)
    assert load_rois(tmp_path / "weights.npz").dense()[0, 5, 5] == 2.0
    np.savez(tmp_path / "other.npz", something=labels)
    with pytest.raises(DataError, match="footprints"):
        load_rois(tmp_path / "other.npz")

    roi = roifile.ImagejRoi.frompoints(np.array([[2, 2], [8, 2], [8, 6], [2, 6]], np.float32))
    roi.name = "square"
    roifile.roiwrite(tmp_path / "rois.zip", [roi])
    with pytest.raises(DataError, match="shape"):
        load_rois(tmp_path / "rois.zip")
    fp = load_rois(tmp_path / "rois.zip", shape=(20, 24))
    assert fp.names == ("square",) and fp.dense()[0, 4, 5] == 1.0 and fp.dense()[0, 10, 10] == 0
    (tmp_path / "rois.txt").write_text("no")
    with pytest.raises(DataError, match="unknown ROI format"):
        load_rois(tmp_path / "rois.txt")


def test_neuropil_ring_leaves_out_every_roi():
    fp = np.zeros((2, 40, 40), np.float32)
    fp[0, 18:22, 10:14] = 1
    fp[1, 18:22, 17:21] = 1  # close enough to fall inside ROI 0's ring
    frame = np.full((40, 40), 100, np.uint16)
    frame[fp.max(axis=0) > 0] = 1000  # bright cells on a dim field
    f, fneu, flags = RoiExtractor(fp).extract(frame)
    np.testing.assert_allclose(f, [1000, 1000], rtol=1e-5)
    np.testing.assert_allclose(fneu, [100, 100], rtol=1e-5)  # no cell light in either ring
    assert not flags.any


# ---------------------------------------------------------------------------
# bad input


def _small_extractor(dtype: type = np.uint16, **motion: object) -> RoiExtractor:
    fp = np.zeros((3, 64, 64), np.float32)
    for i, (y, x) in enumerate([(16, 16), (32, 40), (48, 20)]):
        fp[i, y - 3 : y + 4, x - 3 : x + 4] = 1
    # anchor="none": these few square ROIs are no map of the random texture.
    config = MotionConfig(anchor="none", **motion) if motion else False
    return RoiExtractor(fp, dtype=dtype, motion=config)


def _textured(rng: np.random.Generator, shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    from scipy import ndimage

    base = ndimage.gaussian_filter(np.random.default_rng(0).random((64, 64)), 2) * 4000
    return np.roll(rng.poisson(base + 200), shift, axis=(0, 1)).astype(np.uint16)


def test_wrong_shape_or_dtype_raises_data_error():
    ex = _small_extractor()
    with pytest.raises(DataError, match="shape"):
        ex.extract(np.zeros((64, 63), np.uint16))
    with pytest.raises(DataError, match="dtype"):
        ex.extract(np.zeros((64, 64), np.float32))
    with pytest.raises(DataError, match="no pixels"):
        RoiExtractor(np.zeros((1, 8, 8), np.float32))
    with pytest.raises(ConfigError):
        MotionConfig(max_shift=0.9)


def test_blank_nan_and_saturated_frames_are_flagged_not_passed_on():
    rng = np.random.default_rng(1)
    ex = _small_extractor(reference_frames=3)
    for _ in range(5):
        ex.extract(_textured(rng))
    before = ex.motion.last
    f, fneu, flags = ex.extract(np.zeros((64, 64), np.uint16))
    assert flags.blank and flags.any and np.isnan(f).all() and np.isnan(fneu).all()
    f, _, flags = ex.extract(np.full((64, 64), 65535, np.uint16))
    assert flags.blank and flags.saturated_fraction == 1.0 and np.isnan(f).all()
    assert ex.motion.last == before  # bad frames leave the motion state alone
    part = _textured(rng)
    part[:8] = 65535  # 12.5 % saturated: values kept, frame flagged
    f, _, flags = ex.extract(part)
    assert flags.any and flags.saturated_fraction == pytest.approx(0.125)
    assert np.isfinite(f).all()

    exf = _small_extractor(np.float32)
    f, _, flags = exf.extract(np.full((64, 64), np.nan, np.float32))
    assert flags.non_finite and flags.any and np.isnan(f).all()
    one_bad = np.ones((64, 64), np.float32)
    one_bad[3, 3] = np.inf
    assert exf.extract(one_bad)[2].non_finite


def test_implausible_motion_is_flagged_and_not_applied():
    rng = np.random.default_rng(2)
    ex = _small_extractor(reference_frames=5, max_shift=0.1)
    for _ in range(8):
        ex.extract(_textured(rng))
    good = ex.extract(_textured(rng, (2, -1)))[2]
    assert not good.any and abs(good.shift_y - 2) < 0.3 and abs(good.shift_x + 1) < 0.3
    f, _, flags = ex.extract(_textured(rng, (20, 0)))  # 31 % of the frame: not a brain moving
    assert flags.motion_rejected and flags.any
    assert (flags.shift_y, flags.shift_x) == (good.shift_y, good.shift_x)  # the last good shift
    assert abs(ex.motion.last_estimate[0] - 20) < 0.5  # measured, just not applied
    assert np.isfinite(f).all()
    # The flags travel as JSON in the service's header: plain types only.
    header = json.loads(json.dumps(flags.__dict__))
    assert header["motion_rejected"] is True
    assert all(type(v) in (bool, int, float) for v in flags.__dict__.values())
