"""Session readers: every supported format read back from real files."""

from __future__ import annotations

import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from calm_rt.data import (
    CalmDataWarning,
    Session,
    find_session_files,
    load_corpus,
    load_session,
    read_npy_traces,
    read_nwb,
    read_suite2p,
    write_npz,
)
from calm_rt.errors import DataError

RNG = np.random.default_rng(0)


def _traces(n: int = 5, t: int = 40) -> np.ndarray:
    return RNG.normal(size=(n, t)).astype(np.float32)


# ----------------------------------------------------------------------------
# .npz


def test_npz_round_trip_keeps_every_field(tmp_path: Path) -> None:
    s = Session(
        traces=_traces(4, 30),
        fps=15.0,
        behavior=RNG.normal(size=(30, 2)).astype(np.float32),
        behavior_names=("speed", "pupil"),
        kind="dff",
        neuropil=_traces(4, 30),
        animal_id="m7",
        session_id="day3",
        neuron_ids=("a", "b", "c", "d"),
    )
    path = write_npz(tmp_path / "s.npz", s)
    got = load_session(path)
    np.testing.assert_array_equal(got.traces, s.traces)
    np.testing.assert_array_equal(got.behavior, s.behavior)
    np.testing.assert_array_equal(got.neuropil, s.neuropil)
    assert (got.fps, got.kind, got.animal_id, got.session_id) == (15.0, "dff", "m7", "day3")
    assert got.behavior_names == ("speed", "pupil")
    assert got.neuron_ids == ("a", "b", "c", "d")
    assert got.source == str(path)


def _bad_npz(tmp_path: Path, **arrays: object) -> Path:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize(
    ("arrays", "field", "match"),
    [
        ({"fps": 10.0}, "traces", "missing"),
        ({"traces": np.zeros((3, 10), np.float32)}, "fps", "missing"),
        ({"traces": np.zeros(10, np.float32), "fps": 10.0}, "traces", "dimensions"),
        ({"traces": np.ones((3, 10), np.int16), "fps": 10.0}, "traces", "integer"),
        ({"traces": np.ones((3, 10), np.float32), "fps": 0.0}, "fps", "positive"),
        ({"traces": np.ones((3, 10), np.float32), "fps": -5.0}, "fps", "positive"),
        (
            {
                "traces": np.ones((3, 10), np.float32),
                "fps": 10.0,
                "behavior": np.ones((9, 1), np.float32),
            },
            "behavior",
            "9 rows but traces have 10 frames",
        ),
        (
            {
                "traces": np.ones((3, 10), np.float32),
                "fps": 10.0,
                "neuropil": np.ones((3, 9), np.float32),
            },
            "neuropil",
            "differs",
        ),
    ],
    ids=[
        "no-traces",
        "no-fps",
        "1d",
        "int",
        "fps-0",
        "fps-neg",
        "behavior-len",
        "neuropil-shape",
    ],
)
def test_bad_npz_names_file_and_field(
    tmp_path: Path, arrays: dict[str, object], field: str, match: str
) -> None:
    path = _bad_npz(tmp_path, **arrays)
    with pytest.raises(DataError, match=match) as info:
        load_session(path)
    assert info.value.field == field
    assert str(path) in str(info.value)
    assert f"field '{field}'" in str(info.value)


def test_pickled_npz_is_rejected(tmp_path: Path) -> None:
    path = _bad_npz(
        tmp_path,
        traces=np.ones((2, 5), np.float32),
        fps=10.0,
        animal_id=np.array([{"evil": 1}], dtype=object),
    )
    with pytest.raises(DataError, match="pickled") as info:
        load_session(path)
    assert str(path) in str(info.value)


def test_nan_and_constant_neurons_dropped_with_warning(tmp_path: Path) -> None:
    traces = _traces(6, 50)
    traces[1] = np.nan
    traces[4] = 3.0
    traces[2, :10] = np.nan  # partly missing: kept
    path = write_npz(tmp_path / "s.npz", Session(traces=traces, fps=10.0))
    with pytest.warns(CalmDataWarning, match=r"all-NaN neurons \[1\]; constant neurons \[4\]"):
        got = load_session(path)
    assert got.n_neurons == 4
    np.testing.assert_array_equal(got.traces, traces[[0, 2, 3, 5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = load_session(path, drop_bad=False)
    assert kept.n_neurons == 6


def test_fps_argument_overrides_stored_rate_with_warning(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "s.npz", Session(traces=_traces(), fps=10.0))
    with pytest.warns(CalmDataWarning, match="fps=30 Hz as given, not the 10 Hz"):
        got = load_session(path, fps=30.0)
    assert got.fps == 30.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_session(path, fps=10.0).fps == 10.0


# ----------------------------------------------------------------------------
# dispatch errors


def test_missing_path_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_session(tmp_path / "nope.npz")
    csv = tmp_path / "traces.csv"
    csv.write_text("1,2,3\n")
    with pytest.raises(DataError, match=r"unsupported format.*\.npz.*\.nwb.*suite2p") as info:
        load_session(csv)
    assert str(csv) in str(info.value)
    with pytest.raises(DataError, match="neither a suite2p output folder"):
        load_session(tmp_path)


@pytest.mark.parametrize("name", ["x.npz", "x.npy", "x.nwb"])
@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_garbage_or_truncated_files_raise_data_error(
    tmp_path: Path, name: str, content: str
) -> None:
    path = tmp_path / name
    if content == "garbage":
        path.write_bytes(b"not a real file at all")
    else:  # e.g. an interrupted copy
        whole = tmp_path / ("whole" + path.suffix)
        if path.suffix == ".npz":
            write_npz(whole, Session(traces=_traces(), fps=10.0))
        elif path.suffix == ".npy":
            np.save(whole, _traces())
        else:
            _nwb(whole)
        data = whole.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable") as info:
        load_session(path, fps=10.0)
    assert str(path) in str(info.value)


def test_npy_saved_as_npz_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    with open(path, "wb") as fh:
        np.save(fh, _traces())
    with pytest.raises(DataError, match=r"single \.npy array, not an \.npz archive"):
        load_session(path)


# ----------------------------------------------------------------------------
# bare .npy


def test_bare_npy_needs_fps(tmp_path: Path) -> None:
    path = tmp_path / "traces.npy"
    data = _traces(3, 20).astype(np.float64)
    np.save(path, data)
    with pytest.raises(DataError, match=r"a bare \.npy has no frame rate; pass fps=") as info:
        load_session(path)
    assert info.value.field == "fps"
    s = load_session(path, fps=7.5)
    assert (s.kind, s.fps, s.traces.dtype, s.session_id) == ("dff", 7.5, np.float32, "traces")
    np.testing.assert_allclose(s.traces, data, rtol=1e-6)
    assert read_npy_traces(path, fps=7.5, kind="F").kind == "F"


def test_bare_npy_wrong_shape_or_dtype(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(DataError, match="expected 2 dimensions"):
        load_session(tmp_path / "a.npy", fps=1.0)
    np.save(tmp_path / "b.npy", np.ones((2, 30), np.int32))
    with pytest.raises(DataError, match="integer dtype"):
        load_session(tmp_path / "b.npy", fps=1.0)


# ----------------------------------------------------------------------------
# region traces


def _region_folder(folder: Path, fish: tuple[str, ...] = ("fish1",), n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in fish:
        np.save(folder / f"timeseries_regions_{name}.npy", RNG.normal(size=(n, 25)))
    np.save(folder / "region_acronyms.npy", np.array([f"R{i}" for i in range(n)]))
    np.save(folder / "region_names.npy", np.array([f"region_{i}" for i in range(n)]))
    return folder


def test_region_folder_single_session(tmp_path: Path) -> None:
    folder = _region_folder(tmp_path / "regions")
    with pytest.raises(DataError, match="pass fps="):
        load_session(folder)
    s = load_session(folder, fps=1.0)
    assert (s.kind, s.animal_id, s.n_neurons, s.n_frames) == ("dff", "fish1", 4, 25)
    assert s.neuron_ids == ("R0", "R1", "R2", "R3")


def test_region_labels_ignored_when_count_differs(tmp_path: Path) -> None:
    folder = _region_folder(tmp_path / "regions")
    np.save(folder / "region_acronyms.npy", np.array(["only", "two"]))
    s = load_session(folder, fps=1.0)
    assert s.neuron_ids == ("region_0", "region_1", "region_2", "region_3")
    (folder / "region_names.npy").unlink()
    assert load_session(folder, fps=1.0).neuron_ids is None


def test_region_folder_with_several_sessions_needs_load_corpus(tmp_path: Path) -> None:
    folder = _region_folder(tmp_path / "regions", fish=("fish2", "fish1"))
    with pytest.raises(DataError, match="use load_corpus"):
        load_session(folder, fps=1.0)
    sessions = load_corpus(folder, fps=1.0)
    assert [s.animal_id for s in sessions] == ["fish1", "fish2"]


# ----------------------------------------------------------------------------
# suite2p


def _suite2p(plane: Path, *, n: int = 5, t: int = 40, fs: float | None = 30.0) -> np.ndarray:
    plane.mkdir(parents=True, exist_ok=True)
    f = (100 + 10 * RNG.random((n, t))).astype(np.float32)
    np.save(plane / "F.npy", f)
    np.save(plane / "Fneu.npy", 0.5 * f)
    iscell = np.zeros((n, 2))
    iscell[:, 0] = [1, 0, 1, 1, 0][:n]
    iscell[:, 1] = 0.9
    np.save(plane / "iscell.npy", iscell)
    if fs is not None:
        np.save(plane / "ops.npy", np.array({"fs": fs, "nplanes": 1}, dtype=object))
    return f


@pytest.mark.parametrize("layout", [".", "suite2p/plane0", "plane0"])
def test_suite2p_folder_layouts(tmp_path: Path, layout: str) -> None:
    rec = tmp_path / "rec1"
    f = _suite2p(rec / layout)
    s = load_session(rec)
    assert (s.kind, s.fps, s.n_neurons) == ("F", 30.0, 3)
    assert s.neuron_ids == ("0", "2", "3")
    np.testing.assert_array_equal(s.traces, f[[0, 2, 3]])
    np.testing.assert_array_equal(s.neuropil, 0.5 * f[[0, 2, 3]])
    assert s.session_id.startswith("rec1")


def test_suite2p_all_rois_and_fps_override(tmp_path: Path) -> None:
    _suite2p(tmp_path / "plane0")
    assert read_suite2p(tmp_path, only_cells=False).n_neurons == 5
    with pytest.warns(CalmDataWarning, match=r"ops\.npy 'fs'"):
        assert read_suite2p(tmp_path, fps=10.0).fps == 10.0


def test_suite2p_without_rate_needs_fps(tmp_path: Path) -> None:
    _suite2p(tmp_path, fs=None)
    with pytest.raises(DataError, match=r"ops\.npy is missing.*pass fps=") as info:
        load_session(tmp_path)
    assert info.value.field == "fps"
    assert load_session(tmp_path, fps=20.0).fps == 20.0


def test_suite2p_bad_files(tmp_path: Path) -> None:
    _suite2p(tmp_path)
    np.save(tmp_path / "Fneu.npy", np.zeros((5, 39), np.float32))
    with pytest.raises(DataError, match=r"differs from F\.npy") as info:
        load_session(tmp_path)
    assert info.value.field == "Fneu"
    assert "Fneu.npy" in str(info.value)
    np.save(tmp_path / "Fneu.npy", np.zeros((5, 40), np.float32))
    np.save(tmp_path / "iscell.npy", np.ones((4, 2)))
    with pytest.raises(DataError, match=r"expected \[5, 2\]") as info:
        load_session(tmp_path)
    assert info.value.field == "iscell"
    (tmp_path / "iscell.npy").unlink()
    with pytest.raises(DataError, match="only_cells=False"):
        load_session(tmp_path)


# ----------------------------------------------------------------------------
# NWB


def _nwb(
    path: Path,
    containers: tuple[str, ...] = ("Fluorescence",),
    *,
    n: int = 3,
    t: int = 50,
    rate: float | None = 30.0,
) -> np.ndarray:
    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.file import Subject
    from pynwb.ophys import DfOverF, Fluorescence, ImageSegmentation, OpticalChannel

    nwb = NWBFile(
        session_description="test",
        identifier="sess-42",
        session_start_time=datetime(2024, 1, 1, tzinfo=timezone.utc),
        subject=Subject(subject_id="mouse-7", species="Mus musculus"),
    )
    device = nwb.create_device(name="scope")
    channel = OpticalChannel(name="green", description="GCaMP", emission_lambda=520.0)
    plane = nwb.create_imaging_plane(
        name="plane",
        optical_channel=channel,
        description="L2/3",
        device=device,
        excitation_lambda=920.0,
        indicator="GCaMP6s",
        location="V1",
        imaging_rate=30.0,
    )
    module = nwb.create_processing_module(name="ophys", description="processed")
    seg = ImageSegmentation()
    module.add(seg)
    ps = seg.create_plane_segmentation(
        name="PlaneSegmentation", description="p", imaging_plane=plane
    )
    for i in range(n):
        mask = np.zeros((8, 8))
        mask[i, i] = 1
        ps.add_roi(image_mask=mask, id=100 + i)
    data = RNG.normal(size=(t, n)).astype(np.float32)  # NWB is [T, N]
    for name in containers:
        box = DfOverF() if name == "DfOverF" else Fluorescence()
        module.add(box)
        timing = {"rate": rate} if rate is not None else {"timestamps": np.arange(t) / 20.0}
        box.create_roi_response_series(
            name="RoiResponseSeries",
            data=data,
            rois=ps.create_roi_table_region(region=list(range(n)), description="all"),
            unit="a.u.",
            **timing,
        )
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return data


def test_nwb_fluorescence(tmp_path: Path) -> None:
    path = tmp_path / "rec.nwb"
    data = _nwb(path)
    s = load_session(path)
    np.testing.assert_array_equal(s.traces, data.T)
    assert (s.kind, s.fps, s.session_id, s.animal_id) == ("F", 30.0, "sess-42", "mouse-7")
    assert s.neuron_ids == ("100", "101", "102")


def test_nwb_dff_with_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "rec.nwb"
    _nwb(path, ("DfOverF",), rate=None)
    s = load_session(path)
    assert s.kind == "dff"
    assert s.fps == pytest.approx(20.0)


def test_nwb_several_series_need_a_name(tmp_path: Path) -> None:
    path = tmp_path / "rec.nwb"
    _nwb(path, ("Fluorescence", "DfOverF"))
    with pytest.raises(
        DataError,
        match=r"2 RoiResponseSeries \['ophys/DfOverF/RoiResponseSeries', 'ophys/Fluorescence/RoiResponseSeries'\]; pass series=",
    ) as info:
        load_session(path)
    assert info.value.field == "series"
    assert read_nwb(path, series="ophys/DfOverF/RoiResponseSeries").kind == "dff"
    assert read_nwb(path, series="ophys/Fluorescence/RoiResponseSeries").kind == "F"
    with pytest.raises(DataError, match="pass the full path"):
        read_nwb(path, series="RoiResponseSeries")
    with pytest.raises(DataError, match="no RoiResponseSeries 'nope'"):
        read_nwb(path, series="nope")


def test_nwb_without_traces(tmp_path: Path) -> None:
    path = tmp_path / "rec.nwb"
    _nwb(path, ())
    with pytest.raises(DataError, match="holds no RoiResponseSeries") as info:
        load_session(path)
    assert str(path) in str(info.value)


def test_nwb_without_pynwb_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynwb", None)  # makes `import pynwb` fail
    with pytest.raises(DataError, match="pip install pynwb"):
        read_nwb(tmp_path / "x.nwb")


# ----------------------------------------------------------------------------
# corpus


def test_corpus_finds_every_format_in_sorted_order(tmp_path: Path) -> None:
    write_npz(tmp_path / "b.npz", Session(traces=_traces(), fps=10.0, session_id="b"))
    write_npz(tmp_path / "a" / "a.npz", Session(traces=_traces(), fps=10.0, session_id="a"))
    (tmp_path / "half.npz.tmp.npz").write_bytes(b"partial write")
    _nwb(tmp_path / "c.nwb")
    _suite2p(tmp_path / "d" / "suite2p" / "plane0")
    _suite2p(tmp_path / "d" / "suite2p" / "combined")
    _region_folder(tmp_path / "e")
    found = find_session_files(tmp_path)
    rel = [str(p.relative_to(tmp_path)) for p in found]
    assert rel == [
        "a/a.npz",
        "b.npz",
        "c.nwb",
        "d/suite2p/plane0",
        "e/timeseries_regions_fish1.npy",
    ]
    with pytest.warns(CalmDataWarning):  # fps=1 differs from the stored rates
        sessions = load_corpus(tmp_path, fps=1.0)
    assert [s.session_id for s in sessions] == [
        "a",
        "b",
        "sess-42",
        "d/plane0",
        "timeseries_regions_fish1",
    ]
    assert all(s.fps == 1.0 for s in sessions)


def test_corpus_from_list_and_single_path(tmp_path: Path) -> None:
    p1 = write_npz(tmp_path / "x1.npz", Session(traces=_traces(), fps=10.0))
    p2 = write_npz(tmp_path / "x2.npz", Session(traces=_traces(), fps=10.0))
    assert [s.source for s in load_corpus([p2, p1])] == [str(p1), str(p2)]
    assert len(load_corpus(p1)) == 1


def test_empty_corpus_says_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"no sessions found.*\*\.npz, \*\.nwb, timeseries\*\.npy"):
        load_corpus(tmp_path)


# ----------------------------------------------------------------------------
# real data


def test_real_zebrafish_regions(shared_data: Path) -> None:
    folder = shared_data / "zebrafish_legare"
    with pytest.raises(DataError, match="pass fps="):
        load_session(folder)
    with pytest.warns(CalmDataWarning, match=r"constant neurons \['RH', 'Pit', 'GG'\]"):
        s = load_session(folder, fps=1.0)
    assert (s.n_neurons, s.n_frames, s.kind, s.animal_id) == (67, 892, "dff", "fish6")
    acronyms = np.load(folder / "region_acronyms.npy")
    keep = np.setdiff1d(np.arange(70), [17, 34, 49])
    assert s.neuron_ids == tuple(str(a) for a in acronyms[keep])
    assert np.isfinite(s.traces).all()
    assert (s.traces.std(axis=1) > 0).all()
    raw = np.load(folder / "timeseries_regions_fish6.npy")
    np.testing.assert_allclose(s.traces, raw[keep], rtol=1e-6)
