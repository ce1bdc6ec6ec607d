"""``calm-rt export --nwb``: a live recording read back from NWB equals what was recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse

pynwb = pytest.importorskip("pynwb")
nwbinspector = pytest.importorskip("nwbinspector")

from calm_rt.cli import main  # noqa: E402
from calm_rt.data import load_session  # noqa: E402
from calm_rt.extract import Footprints  # noqa: E402
from calm_rt.serve.recording import Recorder, load_recording  # noqa: E402

N, H, T, FPS = 5, 4, 90, 30.0
DROPPED = 40  # the server dropped this frame: no row, a gap in the times
T0 = 1.767e9  # the scope's clock, Unix s
META = ["--subject-id", "m12", "--species", "Mus musculus", "--sex", "F", "--age", "P90D",
        "--session-description", "closed-loop test session", "--experimenter", "Doe, Jane",
        "--institution", "Test Institute", "--location", "VISp", "--indicator", "GCaMP6s"]  # fmt: skip


def _footprints() -> Footprints:
    shape = (8, 10)
    w = np.zeros((N, shape[0] * shape[1]), np.float32)
    for i in range(N):
        w[i, [i * 10 + 1, i * 10 + 2, i * 10 + 11]] = [1.0, 0.5, 0.25]
    ref = np.arange(80, dtype=np.float32).reshape(shape)
    return Footprints(sparse.csr_matrix(w), shape, tuple(f"roi{i}" for i in range(N)), ref)


def _record(path: Path, *, footprints: bool, close: bool = True, frames: int = T + 1) -> Recorder:
    """A realistic recording: jittered acquisition times, a dropped frame, triggers."""
    rng = np.random.default_rng(0)
    rec = Recorder(
        path, N, FPS, H, "F", n_behavior=2, with_neuropil=True, chunk_frames=30,
        footprints=_footprints() if footprints else None, behavior_pred_names=("speed", "lick"),
    )  # fmt: skip
    for seq in range(frames):
        if seq == DROPPED:
            continue
        t_acq = T0 + seq / FPS + rng.normal(0, 1e-4)
        row = dict(
            traces=(100 + 10 * rng.random(N)).astype(np.float32),
            neuropil=(20 + rng.random(N)).astype(np.float32),
            activity=rng.normal(size=N).astype(np.float32), seq=seq, t_acq=t_acq,
            t_arrival=t_acq + 0.002, t_publish=t_acq + 0.004,
            forecast=rng.normal(size=(N, H)).astype(np.float32),
            forecast_std=rng.random((N, H)).astype(np.float32) + 0.1,
            behavior_pred=rng.normal(size=2).astype(np.float32),
        )  # fmt: skip
        if footprints:
            row["shift"] = rng.normal(size=2).astype(np.float32)
        rec.append(behavior=rng.normal(size=3).astype(np.float32), **row)
        if seq in (10, 70):
            rec.add_trigger(seq, t_acq + 0.004, "roi0>2", 2.5, 2.0, 3)
    if close:
        rec.close()
    return rec


def _read(path: Path):
    io = pynwb.NWBHDF5IO(str(path), "r")
    return io, io.read()


def _serious(path: Path) -> list[str]:
    from nwbinspector import Importance, inspect_nwbfile

    return [
        f"{m.importance.name} {m.check_function_name} {m.object_name}: {m.message}"
        for m in inspect_nwbfile(nwbfile_path=str(path))
        if m.importance in (Importance.CRITICAL, Importance.BEST_PRACTICE_VIOLATION,
                            Importance.ERROR)
    ]  # fmt: skip


@pytest.mark.parametrize("footprints", [True, False], ids=["rois", "traces-only"])
def test_export_reads_back_equal_with_gaps_and_passes_nwbinspector(tmp_path, footprints, capsys):
    src, out = tmp_path / "rec.h5", tmp_path / "rec.nwb"
    _record(src, footprints=footprints)
    assert main(["export", "--nwb", str(src), str(out), *META]) == 0
    assert "wrote" in capsys.readouterr().out
    rec = load_recording(src)
    io, nwb = _read(out)
    with io:
        ophys = nwb.processing["ophys"]
        raw = ophys["Fluorescence"]["RoiResponseSeries"]
        np.testing.assert_array_equal(raw.data[:], rec.arrays["traces"])
        np.testing.assert_array_equal(ophys["Fluorescence"]["Neuropil"].data[:],
                                      rec.arrays["neuropil"])  # fmt: skip
        np.testing.assert_array_equal(ophys["DfOverF"]["NormalizedDfOverF"].data[:],
                                      rec.arrays["activity"])  # fmt: skip
        ts = raw.timestamps[:]
        np.testing.assert_allclose(ts, rec.arrays["t_acq"] - rec.arrays["t_acq"][0], atol=1e-6)
        step = np.diff(ts)
        assert step.max() > 1.9 / FPS  # the dropped frame is a gap, not filled in
        assert len(ts) == T  # T + 1 frames sent, one dropped
        assert nwb.session_start_time.timestamp() == pytest.approx(rec.arrays["t_acq"][0])
        calm = nwb.processing["calm_rt"]
        np.testing.assert_array_equal(calm["forecast"].data[:], rec.arrays["forecast"])
        np.testing.assert_array_equal(calm["forecast_std"].data[:], rec.arrays["forecast_std"])
        np.testing.assert_array_equal(calm["forecast"].timestamps[:], ts)
        assert json.loads(calm["forecast"].comments)["horizon_frames"] == H
        np.testing.assert_array_equal(calm["decoded_behavior"].data[:],
                                      rec.arrays["behavior_pred"])  # fmt: skip
        assert "speed" in calm["decoded_behavior"].description
        events = calm["trigger_events"].to_dataframe()
        assert events["seq"].tolist() == [10, 70] and events["rule"].tolist() == ["roi0>2"] * 2
        np.testing.assert_allclose(events["frame_time"], ts[[10, 69]], atol=1e-9)
        measured = nwb.processing["behavior"]["BehavioralTimeSeries"]["measured_behavior"]
        np.testing.assert_array_equal(measured.data[:], rec.arrays["behavior"])
        seg = ophys["ImageSegmentation"]["PlaneSegmentation"]
        assert len(seg) == N and raw.rois.table is seg
        if footprints:
            assert list(seg["roi_name"][:]) == [f"roi{i}" for i in range(N)]
            mask = np.asarray(seg["pixel_mask"][1].tolist())
            # ROI 1 at flat pixels 11, 12, 21 of a 10-px-wide frame: (x, y, weight)
            np.testing.assert_array_equal(mask, [[1, 1, 1.0], [2, 1, 0.5], [1, 2, 0.25]])
            np.testing.assert_array_equal(ophys["MotionShift"].data[:], rec.arrays["shift"])
        else:
            assert "no ROI masks" in seg.description
        assert nwb.subject.subject_id == "m12" and nwb.subject.species == "Mus musculus"
    assert _serious(out) == []
    # calm-rt's own reader opens it: the raw traces by default, with their neuropil.
    session = load_session(out, drop_bad=False)
    np.testing.assert_allclose(session.traces, rec.arrays["traces"].T)
    np.testing.assert_allclose(session.neuropil, rec.arrays["neuropil"].T)
    assert session.kind == "F" and session.animal_id == "m12"
    assert session.fps == pytest.approx(FPS, rel=0.01)
    assert main(["info", str(out)]) == 0
    assert f"{N} neurons x {T} frames" in capsys.readouterr().out


def test_a_crashed_recording_exports_up_to_its_last_chunk_with_a_warning(tmp_path, capsys):
    src, out = tmp_path / "crash.h5", tmp_path / "crash.nwb"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_nwb_export import _record
        _record(Path({str(src)!r}), footprints=False, close=False, frames=75)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert main(["export", "--nwb", str(src), str(out), *META]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "not closed" in err and "60 frames" in err
    io, nwb = _read(out)
    with io:
        raw = nwb.processing["ophys"]["Fluorescence"]["RoiResponseSeries"]
        assert raw.data.shape == (
            60,
            N,
        )  # two whole chunks of 30; the 14 frames after them were lost
        assert nwb.processing["calm_rt"]["trigger_events"].to_dataframe()["seq"].tolist() == [10]


def test_metadata_file_with_flags_overriding_and_unknown_keys_refused(tmp_path, capsys):
    src = tmp_path / "rec.h5"
    _record(src, footprints=False)
    meta = tmp_path / "meta.toml"
    meta.write_text('subject_id = "from-file"\nspecies = "Mus musculus"\nage = "P60D"\n'
                    'session_start_time = 2025-12-29T09:00:00Z\nkeywords = ["calcium"]\n')  # fmt: skip
    out = tmp_path / "a.nwb"
    assert main(["export", "--nwb", str(src), str(out), "--metadata", str(meta),
                 "--subject-id", "from-flag"]) == 0  # fmt: skip
    io, nwb = _read(out)
    with io:
        assert nwb.subject.subject_id == "from-flag" and nwb.subject.age == "P60D"
        assert nwb.session_start_time.isoformat().startswith("2025-12-29T09:00:00")
        assert list(nwb.keywords[:]) == ["calcium"]
        raw = nwb.processing["ophys"]["Fluorescence"]["RoiResponseSeries"]
        offset = load_recording(src).arrays["t_acq"][0] - nwb.session_start_time.timestamp()
        assert raw.timestamps[0] == pytest.approx(offset)  # relative to the given start
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"subject_id": "x", "speceis": "Mus musculus"}))
    assert main(["export", "--nwb", str(src), str(tmp_path / "b.nwb"), "--metadata", str(bad)]) == 1
    assert "unknown metadata key 'speceis'" in capsys.readouterr().err
    assert not (tmp_path / "b.nwb").exists()
    for flags, said in (
        (["--sex", "female"], "'sex' must be M, F, O or U"),
        (["--age", "90 days"], "not an ISO 8601 duration"),
        (["--subject-id", "cage3/m12"], "must not hold '/'"),
    ):
        assert main(["export", "--nwb", str(src), str(tmp_path / "e.nwb"), *flags]) == 1
        assert said in capsys.readouterr().err
    bad.write_text(json.dumps({"species": 12}))
    assert main(["export", "--nwb", str(src), str(tmp_path / "f.nwb"), "--metadata", str(bad)]) == 1
    assert "'species' must be a string" in capsys.readouterr().err
    late = ["--session-start-time", "2027-01-01T00:00:00+00:00"]
    assert main(["export", "--nwb", str(src), str(tmp_path / "c.nwb"), *late]) == 1
    assert "after the first frame" in capsys.readouterr().err
    assert main(["export", "--nwb", str(src), str(tmp_path / "d.nwb"),
                 "--session-start-time", "yesterday"]) == 1  # fmt: skip
    assert "not ISO 8601" in capsys.readouterr().err


def test_refuses_what_is_not_a_recording_and_an_existing_out(tmp_path, capsys):
    src, out = tmp_path / "rec.h5", tmp_path / "rec.nwb"
    _record(src, footprints=False)
    assert main(["export", "--nwb", str(src), str(out)]) == 0
    before = out.stat().st_mtime_ns
    assert main(["export", "--nwb", str(src), str(out)]) == 1
    assert "exists already; pass --overwrite" in capsys.readouterr().err
    assert out.stat().st_mtime_ns == before
    assert main(["export", "--nwb", str(src), str(out), "--overwrite"]) == 0
    not_rec = tmp_path / "other.h5"
    import h5py

    with h5py.File(not_rec, "w") as f:
        f["x"] = np.zeros(3)
    assert main(["export", "--nwb", str(not_rec), str(tmp_path / "x.nwb")]) == 1
    assert "is not a calm-rt recording" in capsys.readouterr().err
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert main(["export", "--nwb", str(text), str(tmp_path / "y.nwb")]) == 1
    assert "cannot open as HDF5" in capsys.readouterr().err
    assert main(["export", "--nwb", str(tmp_path / "missing.h5"), str(tmp_path / "z.nwb")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(src), str(tmp_path / "w.nwb")]) == 1
    assert "--nwb" in capsys.readouterr().err


def test_regular_frames_are_written_with_a_rate_and_no_metadata_is_reported(tmp_path, capsys):
    src, out = tmp_path / "rec.h5", tmp_path / "rec.nwb"
    rec = Recorder(src, N, FPS, H, chunk_frames=10)
    for seq in range(40):  # no drop, exact times: a rate, as NWB asks, not timestamps
        rec.append(traces=np.full(N, seq, np.float32), seq=seq, t_acq=T0 + seq / 32,
                   t_arrival=T0, t_publish=T0, forecast=np.zeros((N, H), np.float32),
                   forecast_std=np.ones((N, H), np.float32))  # fmt: skip
    rec.close()
    assert main(["export", "--nwb", str(src), str(out)]) == 0
    assert "missing for an NWB archive" in capsys.readouterr().out
    io, nwb = _read(out)
    with io:
        raw = nwb.processing["ophys"]["Fluorescence"]["RoiResponseSeries"]
        assert raw.timestamps is None and raw.rate == pytest.approx(32.0)
        assert "DfOverF" not in nwb.processing["ophys"].data_interfaces  # no engine ran: all NaN
        assert "behavior" not in nwb.processing and nwb.subject is None
    assert any("check_subject_exists" in m for m in _serious(out))  # the inspector is awake
    assert load_session(out, drop_bad=False).fps == pytest.approx(32.0)


def test_a_real_server_recording_exports_clean(tmp_path):
    """A tiny model behind a real server records 39 frames (seq 20 never sent); NWB holds them."""
    import socket
    import time

    import torch
    import zmq

    from calm_rt.data import SimConfig, make_animal, simulate_session
    from calm_rt.model import PRESETS, CalM
    from calm_rt.serve import Server, ServiceConfig
    from calm_rt.wire.protocol import encode

    def free() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"tcp://127.0.0.1:{s.getsockname()[1]}"

    torch.manual_seed(0)
    cfg = SimConfig(neurons=8, frames=60, seed=2)
    session = simulate_session(cfg, make_animal(cfg, 0), 0)[0]
    src = tmp_path / "live.h5"
    server = Server(
        ServiceConfig(ingest=free(), ingest_mode="pull", publish=free(), control=free(),
                      max_lag_ms=60_000.0, data_dir=tmp_path, fps=30.0, record=src),
        model=CalM(PRESETS["tiny"]).eval(),
    ).start()  # fmt: skip
    sent = [t for t in range(40) if t != 20]
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(server.config.ingest)
    try:
        for t in sent:
            head = {"seq": t, "t_acq": T0 + t / 30.0}
            bufs = {"traces": session.traces[:, t], "neuropil": session.neuropil[:, t]}
            push.send_multipart(encode("traces", head, bufs))
        # Wait on the condition (a hang is pytest-timeout's to catch), or on the server's death.
        while server.status()["stages_ms"].get("record", {}).get("n", 0) < len(sent):
            assert server.error is None, server.error
            time.sleep(0.05)
    finally:
        push.close(0)
        ctx.term()
        server.stop()
    out = tmp_path / "live.nwb"
    assert main(["export", "--nwb", str(src), str(out), *META]) == 0
    io, nwb = _read(out)
    with io:
        raw = nwb.processing["ophys"]["Fluorescence"]["RoiResponseSeries"]
        np.testing.assert_array_equal(raw.data[:], session.traces[:, sent].T)
        np.testing.assert_allclose(raw.timestamps[:], (np.array(sent) - sent[0]) / 30.0, atol=1e-6)
        forecast = nwb.processing["calm_rt"]["forecast"]
        assert forecast.data.shape[:2] == (len(sent), 8) and np.isfinite(forecast.data[:]).all()
    assert _serious(out) == []


def test_a_dff_session_goes_to_dfoverf_and_reads_back_as_dff(tmp_path):
    src, out = tmp_path / "dff.h5", tmp_path / "dff.nwb"
    rec = Recorder(src, N, FPS, H, kind="dff", chunk_frames=10)
    rng = np.random.default_rng(1)
    for seq in (0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12):
        rec.append(traces=rng.normal(size=N).astype(np.float32), seq=seq, t_acq=T0 + seq / FPS,
                   activity=rng.normal(size=N).astype(np.float32), t_arrival=T0, t_publish=T0,
                   forecast=np.zeros((N, H), np.float32), forecast_std=np.ones((N, H), np.float32))  # fmt: skip
    rec.close()
    assert main(["export", "--nwb", str(src), str(out), *META]) == 0
    io, nwb = _read(out)
    with io:
        dff = nwb.processing["ophys"]["DfOverF"]
        assert set(dff.roi_response_series) == {"RoiResponseSeries", "NormalizedDfOverF"}
        assert "Fluorescence" not in nwb.processing["ophys"].data_interfaces
    session = load_session(out, drop_bad=False)
    assert session.kind == "dff"
    np.testing.assert_array_equal(session.traces, load_recording(src).arrays["traces"].T)
    assert _serious(out) == []


@pytest.mark.slow
def test_a_demo_recording_of_raw_frames_exports_with_its_rois(tmp_path, capsys):
    """`calm-rt demo --record` (scope, server extracting raw frames, rig) -> `export --nwb`."""
    import torch

    from calm_rt.model import PRESETS, CalM, save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(CalM(PRESETS["tiny"]).eval(), tmp_path / "ckpt")
    rec, out, summary = tmp_path / "demo.h5", tmp_path / "demo.nwb", tmp_path / "demo.json"
    assert main(["demo", "--seconds", "2", "--neurons", "10", "--size", "64", "--checkpoint",
                 str(ckpt), "--workdir", str(tmp_path / "work"), "--threads", "1",
                 "--record", str(rec), "--json", str(summary)]) == 0  # fmt: skip
    ran = json.loads(summary.read_text())
    assert ran["recording"] == str(rec.resolve())
    capsys.readouterr()
    assert main(["export", "--nwb", str(rec), str(out), *META]) == 0
    recorded = load_recording(rec)
    io, nwb = _read(out)
    with io:
        ophys = nwb.processing["ophys"]
        raw = ophys["Fluorescence"]["RoiResponseSeries"]
        # Every frame the server answered is a row (the demo's server records each one).
        assert raw.data.shape == (ran["server"]["answered"], 10)
        np.testing.assert_array_equal(raw.data[:], recorded.arrays["traces"])
        seg = ophys["ImageSegmentation"]["PlaneSegmentation"]
        assert len(seg) == 10
        # The ROIs are the demo's cells: real masks, each on its own pixels.
        masks = [np.asarray(seg["pixel_mask"][i].tolist()) for i in range(10)]
        assert all(m.shape[0] > 5 and (m[:, 2] > 0).all() for m in masks)
        np.testing.assert_array_equal(ophys["MotionShift"].data[:], recorded.arrays["shift"])
        assert np.abs(recorded.arrays["shift"]).max() > 0.5  # the simulated scene moved
    assert _serious(out) == []
