"""Movies (TIFF, HDF5, .npy), ImageJ ROIs and ROI traces."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import roifile
import tifffile

from calm_rt.data import (
    Movie,
    open_movie,
    read_imagej_rois,
    session_from_movie,
    traces_from_masks,
)
from calm_rt.data._movies import _polygon_mask
from calm_rt.errors import DataError

RNG = np.random.default_rng(1)


def _movie(t: int = 12, h: int = 16, w: int = 20, dtype: type = np.uint16) -> np.ndarray:
    return RNG.integers(0, 4000, size=(t, h, w)).astype(dtype)


def _check_frames(movie: Movie, data: np.ndarray) -> None:
    assert movie.shape == data.shape
    assert len(movie) == data.shape[0]
    assert movie.dtype == data.dtype
    np.testing.assert_array_equal(movie[0], data[0])
    np.testing.assert_array_equal(movie[-1], data[-1])
    np.testing.assert_array_equal(movie[np.int64(3)], data[3])
    np.testing.assert_array_equal(movie[2:7], data[2:7])
    np.testing.assert_array_equal(movie[::5], data[::5])
    np.testing.assert_array_equal(movie[::-4], data[::-4])
    assert movie[5:5].shape == (0, *data.shape[1:])
    with pytest.raises(IndexError):
        movie[data.shape[0]]


# ----------------------------------------------------------------------------
# opening movies


@pytest.mark.parametrize("compression", [None, "zlib"], ids=["memmap", "pages"])
def test_tiff_movie(tmp_path: Path, compression: str | None) -> None:
    data = _movie()
    path = tmp_path / "m.tif"
    tifffile.imwrite(
        path, data, imagej=True, metadata={"finterval": 1 / 30}, compression=compression
    )
    with open_movie(path) as movie:
        _check_frames(movie, data)
        assert movie.fps == pytest.approx(30.0)
        frames = movie[0:2]
    frames[0, 0, 0] = 1  # frames are the caller's own, writable after close
    assert movie.closed
    with pytest.raises(ValueError, match="closed"):
        movie[0]


def test_tiff_without_rate_and_float_pixels(tmp_path: Path) -> None:
    data = _movie(dtype=np.float32)
    tifffile.imwrite(tmp_path / "m.tif", data)
    with open_movie(tmp_path / "m.tif") as movie:
        _check_frames(movie, data)
        assert movie.fps is None


def test_hdf5_movie_single_and_named_dataset(tmp_path: Path) -> None:
    data = _movie()
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("imaging/raw", data=data, chunks=(1, 16, 20))
        f["imaging/raw"].attrs["fps"] = 15.0
        f.create_dataset("mean_image", data=data.mean(axis=0))
    with open_movie(path) as movie:
        _check_frames(movie, data)
        assert movie.fps == 15.0
    with open_movie(path, dataset="/imaging/raw") as movie:
        assert movie.shape == data.shape
    with pytest.raises(DataError, match=r"no dataset 'nope'.*imaging/raw"):
        open_movie(path, dataset="nope")
    with pytest.raises(DataError, match="single image") as info:
        open_movie(path, dataset="mean_image")
    assert info.value.field == "mean_image"


def test_hdf5_ambiguous_dataset_lists_candidates(tmp_path: Path) -> None:
    path = tmp_path / "m.hdf5"
    with h5py.File(path, "w") as f:
        f["green"] = _movie()
        f["red"] = _movie()
        f.attrs["fps"] = "unknown"  # junk metadata must not break opening
    with pytest.raises(DataError, match=r"2 3D datasets; pass dataset=.*green.*red") as info:
        open_movie(path)
    assert str(path) in str(info.value)
    with open_movie(path, dataset="red") as movie:
        assert movie.shape == (12, 16, 20)
        assert movie.fps is None


def test_npy_movie_and_singleton_channel(tmp_path: Path) -> None:
    data = _movie()
    np.save(tmp_path / "m.npy", data)
    with open_movie(tmp_path / "m.npy") as movie:
        _check_frames(movie, data)
    np.save(tmp_path / "c.npy", data[:, None])  # [T, 1, H, W]
    with open_movie(tmp_path / "c.npy") as movie:
        _check_frames(movie, data)
    np.save(tmp_path / "d.npy", data[..., None])  # [T, H, W, 1]
    with open_movie(tmp_path / "d.npy") as movie:
        _check_frames(movie, data)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((16, 20), np.uint16), "single image"),
        (np.zeros((4, 2, 16, 20), np.uint16), "several channels"),
        (np.zeros((4, 16, 20), bool), "integer or float"),
        (np.zeros((4, 16, 20), np.complex64), "integer or float"),
    ],
    ids=["2d", "2-channel", "bool", "complex"],
)
def test_bad_movies(tmp_path: Path, array: np.ndarray, match: str) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(DataError, match=match) as info:
        open_movie(path)
    assert str(path) in str(info.value)


def test_single_page_tiff_and_unknown_format(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "one.tif", np.zeros((16, 20), np.uint16))
    with pytest.raises(DataError, match="single image"):
        open_movie(tmp_path / "one.tif")
    (tmp_path / "m.avi").write_bytes(b"xx")
    with pytest.raises(DataError, match="unsupported movie format"):
        open_movie(tmp_path / "m.avi")
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    with pytest.raises(DataError, match="not a readable TIFF"):
        open_movie(tmp_path / "bad.tif")


# ----------------------------------------------------------------------------
# ROIs


def test_polygon_mask_matches_brute_force_on_concave_shape() -> None:
    # An L shape (concave) with a vertex off the pixel grid.
    poly = np.array([[2, 2], [12, 2], [12, 5.5], [6, 5.5], [6, 14], [2, 14]], float)
    got = _polygon_mask([poly], (16, 16))
    yy, xx = np.mgrid[0:16, 0:16] + 0.5
    want = ((xx > 2) & (xx < 12) & (yy > 2) & (yy < 5.5)) | (
        (xx > 2) & (xx < 6) & (yy > 2) & (yy < 14)
    )
    np.testing.assert_array_equal(got, want)
    assert got.sum() == 10 * 3 + 4 * 9


def test_polygon_hole_by_even_odd_and_clipping() -> None:
    outer = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    inner = np.array([[3, 3], [7, 3], [7, 7], [3, 7]], float)
    mask = _polygon_mask([outer, inner], (12, 12))
    assert mask.sum() == 100 - 16
    assert not mask[5, 5]
    # A square hanging off the image's corner keeps only its inside part.
    clipped = _polygon_mask([np.array([[-5, -5], [3, -5], [3, 3], [-5, 3]], float)], (8, 8))
    assert clipped.sum() == 9


def _write_rois(path: Path, rois: list[roifile.ImagejRoi]) -> None:
    if path.exists():
        path.unlink()
    roifile.roiwrite(path, rois)


def _rect(
    name: str, left: int, top: int, right: int, bottom: int, oval: bool = False
) -> roifile.ImagejRoi:
    roi = roifile.ImagejRoi()
    roi.roitype = roifile.ROI_TYPE.OVAL if oval else roifile.ROI_TYPE.RECT
    roi.left, roi.top, roi.right, roi.bottom = left, top, right, bottom
    roi.name = name
    return roi


def test_imagej_rois_rasterise_polygon_rect_oval(tmp_path: Path) -> None:
    tri = roifile.ImagejRoi.frompoints(np.array([[4, 4], [24, 4], [4, 24]]), name="tri")
    rois = [tri, _rect("box", 30, 5, 40, 9), _rect("disc", 10, 30, 30, 50, oval=True)]
    path = tmp_path / "rois.zip"
    _write_rois(path, rois)
    got = read_imagej_rois(path, (64, 64))
    assert got.names == ("tri", "box", "disc")
    assert got.masks.shape == (3, 64, 64) and got.masks.dtype == bool
    # Triangle legs of 20 px: area 200; pixel-centre sampling is within an edge's width.
    assert abs(int(got.masks[0].sum()) - 200) <= 20
    box = np.zeros((64, 64), bool)
    box[5:9, 30:40] = True
    np.testing.assert_array_equal(got.masks[1], box)
    assert abs(int(got.masks[2].sum()) - np.pi * 10 * 10) <= 15
    assert got.masks[2][40, 20]  # the disc's centre


def test_single_roi_file(tmp_path: Path) -> None:
    path = tmp_path / "one.roi"
    _rect("solo", 1, 2, 5, 6).tofile(path)
    got = read_imagej_rois(path, (8, 8))
    assert got.names == ("solo",)
    assert got.masks[0].sum() == 16


def test_roi_outside_image_or_not_an_area(tmp_path: Path) -> None:
    path = tmp_path / "rois.zip"
    _write_rois(path, [_rect("ok", 1, 1, 4, 4), _rect("faraway", 100, 100, 110, 110)])
    with pytest.raises(DataError, match="'faraway' covers no pixel") as info:
        read_imagej_rois(path, (32, 32))
    assert str(path) in str(info.value)
    line = roifile.ImagejRoi()
    line.roitype = roifile.ROI_TYPE.LINE
    line.x1, line.y1, line.x2, line.y2 = 1.0, 1.0, 9.0, 9.0
    line.name = "cut"
    _write_rois(path, [line])
    with pytest.raises(DataError, match="'cut' is a line ROI"):
        read_imagej_rois(path, (32, 32))
    (tmp_path / "junk.roi").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a readable ImageJ ROI"):
        read_imagej_rois(tmp_path / "junk.roi", (32, 32))


# ----------------------------------------------------------------------------
# traces


def test_traces_from_masks_exact_means_in_chunks() -> None:
    data = _movie(t=11)
    masks = np.zeros((3, 16, 20), bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 4:10, 6:7] = True  # overlaps ROI 0
    masks[2, 15, 19] = True  # one pixel
    want = np.stack([data[:, m].astype(np.float64).mean(axis=1) for m in masks])
    for chunk in (None, 1, 4, 11, 50):
        got = traces_from_masks(data, masks, chunk_frames=chunk)
        assert got.dtype == np.float32 and got.shape == (3, 11)
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_traces_from_masks_rejects_mismatch() -> None:
    data = _movie()
    with pytest.raises(DataError, match=r"frame shape \(8, 8\)") as info:
        traces_from_masks(data, np.ones((1, 8, 8), bool))
    assert info.value.field == "masks"
    empty = np.zeros((2, 16, 20), bool)
    empty[0, 0, 0] = True
    with pytest.raises(DataError, match=r"ROIs \[1\] are empty"):
        traces_from_masks(data, empty)
    with pytest.raises(DataError, match="must be bool"):
        traces_from_masks(data, np.ones((1, 16, 20), np.uint8))


def test_session_from_movie(tmp_path: Path) -> None:
    data = _movie()
    tifffile.imwrite(tmp_path / "m.tif", data, imagej=True, metadata={"finterval": 0.1})
    _write_rois(tmp_path / "r.zip", [_rect("n1", 0, 0, 4, 4), _rect("n2", 10, 8, 20, 16)])
    s = session_from_movie(tmp_path / "m.tif", tmp_path / "r.zip")
    assert (s.kind, s.fps, s.neuron_ids, s.session_id) == (
        "F",
        pytest.approx(10.0),
        ("n1", "n2"),
        "m",
    )
    np.testing.assert_allclose(s.traces[1], data[:, 8:16, 10:20].mean(axis=(1, 2)), rtol=1e-6)
    np.save(tmp_path / "m.npy", data)
    with pytest.raises(DataError, match="stores no frame rate; pass fps="):
        session_from_movie(tmp_path / "m.npy", tmp_path / "r.zip")


# ----------------------------------------------------------------------------
# real data


def _shoelace(xy: np.ndarray) -> float:
    x, y = xy[:, 0].astype(float), xy[:, 1].astype(float)
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def test_real_sima_movie_and_rois(shared_data: Path) -> None:
    folder = shared_data / "sima"
    with open_movie(folder / "example.tif") as movie:
        assert movie.shape == (20, 128, 256)
        assert movie.dtype == np.uint16
        rois = read_imagej_rois(folder / "imageJ_ROIs.zip", movie.shape[1:])
        traces = traces_from_masks(movie, rois)
        first = movie[0]
    assert len(rois) == 2
    for roi, mask in zip(roifile.roiread(folder / "imageJ_ROIs.zip"), rois.masks):
        area = _shoelace(roi.coordinates())
        assert mask.any()
        # Pixel-centre sampling of a ~20 px wide outline: within 5% of its area.
        assert abs(int(mask.sum()) - area) <= 0.05 * area, (roi.name, mask.sum(), area)
        # The mask lies inside the ROI's bounding box.
        rows, cols = np.nonzero(mask)
        assert rows.min() >= roi.top and rows.max() < roi.bottom
        assert cols.min() >= roi.left and cols.max() < roi.right
    assert traces.shape == (2, 20)
    assert np.isfinite(traces).all()
    np.testing.assert_allclose(traces[:, 0], [first[m].mean() for m in rois.masks], rtol=1e-6)
    s = session_from_movie(folder / "example.tif", folder / "imageJ_ROIs.zip", fps=10.0)
    assert s.neuron_ids == rois.names
    np.testing.assert_array_equal(s.traces, traces)
