"""Multi-plane (volumetric) streams: planes extracted as they arrive, one engine step per volume.

The end-to-end test runs the real ``calm-rt mock-scope --planes 3`` in a
subprocess, PUSHing to a server on loopback, with one middle plane and one
last plane dropped: every volume is answered, the lost planes are missing
neurons, and the recording equals the per-plane extraction and the engine
run offline on the same frames.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calm_rt.errors import DataError, ProtocolError
from calm_rt.extract import (
    RoiExtractor,
    VolumeRois,
    load_rois,
    load_volume_rois,
    save_volume_rois,
)
from calm_rt.live import EngineConfig, StreamingEngine
from calm_rt.model import PRESETS, CalM
from calm_rt.serve import Server, ServiceConfig
from calm_rt.serve.client import RigClient, control_request
from calm_rt.serve.demo import free_endpoint
from calm_rt.serve.mockscope import simulated_volume
from calm_rt.serve.recording import load_recording
from calm_rt.serve.volumes import VolumeAssembler
from calm_rt.wire import decode, encode

K = 3  # planes
IMAGES = ("good", "small", "nan")


@pytest.fixture(scope="module")
def model() -> CalM:
    torch.manual_seed(0)
    return CalM(PRESETS["tiny"]).eval()


@pytest.fixture(scope="module")
def volume():
    return simulated_volume(neurons=20, planes=K, size=64, volumes=12, fps=10.0, seed=3)


def plane_msg(source, volume: int, plane: int, image=None):
    """Plane ``plane`` of volume ``volume``, as the server's ingest hands it on."""
    seq = volume * K + plane
    image = source.get(seq % source.n_frames)["image"] if image is None else image
    head = {"seq": seq, "t_acq": time.time(), "plane": plane, "volume": volume}
    msg = decode(encode("frame", head, {"image": image}))
    msg.header["t_arrival"] = time.time()
    return msg


def offline_planes(source, volumes: int) -> np.ndarray:
    """``[N, volumes]`` traces: each plane through a fresh extractor, in order."""
    rois = source.footprints
    out = []
    for k, fp in enumerate(rois.planes):
        ex = RoiExtractor(fp, motion=True)
        out.append(
            np.stack([ex.extract(source.get(v * K + k)["image"])[0] for v in range(volumes)], 1)
        )
    return np.concatenate(out, axis=0)


# -- ROIs of a volume -------------------------------------------------------------


def test_simulated_volume_shares_its_neurons_among_the_planes(volume):
    rois = volume.footprints
    assert isinstance(rois, VolumeRois) and rois.n_planes == K
    assert [fp.n_rois for fp in rois.planes] == [7, 7, 6] and rois.n_rois == 20
    assert rois.offsets == (0, 7, 14, 20)
    assert rois.names[7] == "plane1/cell_0"
    assert volume.planes == K and volume.n_frames == 12 * K


def test_volume_rois_round_trip_and_a_multiplane_folder_is_never_read_as_one_plane(
    volume, tmp_path
):
    folder = save_volume_rois(tmp_path / "rois", volume.footprints)
    back = load_volume_rois(folder)
    assert isinstance(back, VolumeRois) and back.n_planes == K
    for a, b in zip(back.planes, volume.footprints.planes):
        assert (a.weights != b.weights).nnz == 0 and a.shape == b.shape
    with pytest.raises(DataError, match=r"3 imaging planes.*load_volume_rois"):
        load_rois(folder)  # plane 0 alone would silently drop two thirds of the cells
    (folder / "plane1.npz").unlink()
    with pytest.raises(DataError, match=r"numbered \[0, 2\]"):
        load_volume_rois(folder)


def test_a_suite2p_multiplane_run_is_read_plane_by_plane(shared_data, tmp_path):
    """suite2p's own layout: suite2p/plane0 .. planeK-1 (here the real plane folder twice)."""
    plane = shared_data / "suite2p_hippocampus" / "plane0"
    shape = (512, 512)  # this folder has no ops.npy: the frame size is given
    for k in range(2):
        shutil.copytree(plane, tmp_path / "suite2p" / f"plane{k}")
    rois = load_volume_rois(tmp_path, shape)
    one = load_rois(plane, shape)
    assert isinstance(rois, VolumeRois) and rois.n_planes == 2
    assert rois.n_rois == 2 * one.n_rois
    assert load_volume_rois(shared_data / "suite2p_hippocampus", shape).n_rois == one.n_rois


# -- assembling volumes -----------------------------------------------------------


def test_a_complete_volume_is_every_plane_extracted_in_order(volume):
    asm = VolumeAssembler(volume.footprints)
    done = []
    for v in range(4):
        for k in range(K):
            out = asm.add(plane_msg(volume, v, k))
            assert len(out) == (1 if k == K - 1 else 0)  # the last plane completes its volume
            done += out
    traces = np.stack([d.traces for d in done], 1)
    np.testing.assert_array_equal(traces, offline_planes(volume, 4))
    assert [d.volume for d in done] == [0, 1, 2, 3]
    assert all(d.missing_planes == () and len(d.shifts) == K for d in done)


def test_a_lost_plane_is_missing_neurons_and_a_lost_last_plane_never_stalls(volume):
    asm = VolumeAssembler(volume.footprints)
    lo, hi = volume.footprints.offsets[1], volume.footprints.offsets[2]
    assert asm.add(plane_msg(volume, 0, 0)) == []
    (v0,) = asm.add(plane_msg(volume, 0, 2))  # plane 1 lost: the last plane still closes it
    assert v0.missing_planes == (1,) and v0.shifts[1] is None
    assert (
        np.isnan(v0.traces[lo:hi]).all() and np.isfinite(np.delete(v0.traces, range(lo, hi))).all()
    )
    asm.add(plane_msg(volume, 1, 0))
    asm.add(plane_msg(volume, 1, 1))
    (v1,) = asm.add(plane_msg(volume, 2, 0))  # plane 2 of volume 1 lost: volume 2 began
    assert v1.volume == 1 and v1.missing_planes == (2,)
    assert v1.last.header["plane"] == 1  # the volume's times are its last plane's
    # Volume 3's last plane, with volume 2 still open: it closes both, oldest first.
    v2, v3 = asm.add(plane_msg(volume, 3, 2))
    assert v2.volume == 2 and v2.missing_planes == (1, 2)
    assert v3.volume == 3 and v3.missing_planes == (0, 1)


def test_bad_planes_are_refused_and_change_nothing(volume):
    asm = VolumeAssembler(volume.footprints)
    asm.add(plane_msg(volume, 0, 0))
    with pytest.raises(ProtocolError, match="arrived twice"):
        asm.add(plane_msg(volume, 0, 0))
    with pytest.raises(ProtocolError, match="out of range"):
        asm.add(plane_msg(volume, 0, 5, image=volume.get(0)["image"]))
    with pytest.raises(DataError, match="plane 1"):
        asm.add(plane_msg(volume, 0, 1, image=np.zeros((32, 32), np.uint16)))
    without = decode(encode("frame", {"seq": 1}, {"image": volume.get(1)["image"]}))
    with pytest.raises(ProtocolError, match="'plane' and 'volume'"):
        asm.add(without)
    asm.add(plane_msg(volume, 0, 1))
    (v0,) = asm.add(plane_msg(volume, 0, 2))
    with pytest.raises(ProtocolError, match="after volume 0 was answered"):
        asm.add(plane_msg(volume, 0, 1))
    # Nothing refused left a trace: the volume is the clean run's.
    np.testing.assert_array_equal(v0.traces, offline_planes(volume, 1)[:, 0])


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(st.integers(0, K + 1), st.integers(0, 6), st.sampled_from(IMAGES)),
        max_size=14,
    )
)
def test_hostile_plane_sequences_are_refused_or_assembled_and_volumes_only_move_on(volume, ops):
    """Any order of planes, repeats, jumps, bad images: only ProtocolError or DataError, every
    volume handed out once, in increasing order, whole; and the stream recovers at once."""
    asm = VolumeAssembler(volume.footprints)
    done, offsets = [], volume.footprints.offsets
    for plane, vol, kind in ops:
        image = volume.get(plane % K)["image"]
        if kind == "small":
            image = image[:10]
        elif kind == "nan":
            image = np.full(image.shape, np.nan, np.float32)
        try:
            done += asm.add(plane_msg(volume, vol, plane, image=image))
        except (ProtocolError, DataError):
            pass
    after = max((v for _, v, _ in ops), default=-1) + 1
    for k in range(K):
        done += asm.add(plane_msg(volume, after, k))
    numbers = [d.volume for d in done]
    assert numbers == sorted(set(numbers)) and numbers[-1] == after
    assert done[-1].missing_planes == () and np.isfinite(done[-1].traces).all()
    for d in done:
        assert d.traces.shape == (volume.footprints.n_rois,)
        for k in d.missing_planes:
            assert np.isnan(d.traces[offsets[k] : offsets[k + 1]]).all()


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"plane": 0}, "both 'plane' and 'volume'"),
        ({"volume": 0}, "both 'plane' and 'volume'"),
        ({"plane": True, "volume": 0}, "'plane' must be an integer"),
        ({"plane": -1, "volume": 0}, "'plane' must be an integer"),
        ({"plane": 0, "volume": 1.5}, "'volume' must be a non-negative integer"),
    ],
)
def test_plane_header_fields_are_checked_at_the_boundary(extra, match):
    with pytest.raises(ProtocolError, match=match):
        decode(encode("frame", {"seq": 0, **extra}, {"image": np.zeros((4, 4), np.uint16)}))


# -- the service, end to end ------------------------------------------------------


def _mock_scope(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "calm_rt", "mock-scope", "--planes", str(K), "--neurons", "20",
         "--size", "64", "--sim-frames", "40", "--fps", "10", "--mode", "push", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_a_three_plane_scope_streams_through_the_server_with_every_volume_answered(model, tmp_path):
    rois = tmp_path / "rois"
    made = _mock_scope("--frames", "0", "--rois-out", str(rois))  # the scope's ROIs, per plane
    assert made.wait(120) == 0, made.stdout.read()
    ingest, pub_ep, ctl_ep = free_endpoint(), free_endpoint(), free_endpoint()
    record = tmp_path / "volumes.h5"
    server = Server(
        ServiceConfig(
            ingest=ingest, ingest_mode="pull", publish=pub_ep, control=ctl_ep, rois=rois,
            fps=10.0, max_lag_ms=1e9, max_backlog=10_000, record=record,
        ),
        model=model,
    ).start()  # fmt: skip
    headers: list[dict] = []
    volumes, lost_mid, lost_last = 40, 10 * K + 1, 20 * K + 2  # plane 1 of v10, plane 2 of v20
    try:
        with RigClient(
            pub_ep, ("forecast",), {"forecast": lambda m: headers.append(m.header)}
        ) as rig:
            while server.subscriptions < 1:  # the rig's subscription reached the server
                time.sleep(0.02)
            scope = _mock_scope(
                "--endpoint", ingest, "--frames", str(volumes),
                "--drop", str(lost_mid), str(lost_last),
            )  # fmt: skip
            rig.run(  # a deadline only for a hung run; a crashed server ends it at once
                seconds=300,
                until=lambda: (
                    server.error is not None
                    or (bool(headers) and headers[-1]["seq"] >= volumes - 1)
                ),
            )
            assert server.error is None, server.error
            assert scope.wait(60) == 0, scope.stdout.read()
        status = control_request(ctl_ep, {"cmd": "status"})
    finally:
        server.stop()
    # Every volume answered once, in order, with the frame rate the volume rate.
    assert [h["seq"] for h in headers] == list(range(volumes))
    assert all(h["volume"] == h["seq"] and h["planes"] == K and h["fps"] == 10.0 for h in headers)
    assert status["received"] == volumes * K - 2 and status["answered"] == volumes
    assert status["lost"] == 2 and status["rejected"] == 0 and status["neurons"] == 20
    missing = {h["seq"]: h["planes_missing"] for h in headers if h["planes_missing"]}
    assert missing == {10: [1], 20: [2]}
    by_seq = {h["seq"]: h for h in headers}
    assert by_seq[10]["missing"] == 7 and by_seq[20]["missing"] == 6
    assert by_seq[10]["shifts"][1] is None and len(by_seq[11]["shifts"]) == K

    # Online equals offline: the recorded traces are the per-plane extraction of the
    # same frames (lost planes NaN), and its forecasts the engine's on those traces.
    rec = load_recording(record).arrays
    source = simulated_volume(neurons=20, planes=K, size=64, volumes=40, fps=10.0)
    live = _extract_with_losses(source, volumes, {lost_mid, lost_last})
    np.testing.assert_array_equal(rec["traces"].T, live)
    assert np.isnan(live[7:14, 10]).all() and np.isnan(live[14:, 20]).all()
    assert np.isnan(live).sum() == 7 + 6
    engine = StreamingEngine(model, EngineConfig(n_neurons=20, fps=10.0, kind="F"))
    for t in range(volumes):
        pred = engine.step(live[:, t], seq=t, neuropil=rec["neuropil"][t])
        np.testing.assert_array_equal(rec["forecast"][t], pred.forecast)

    # ...and it archives: NWB holds the lost planes as missing samples, not filled in.
    import pynwb

    from calm_rt.cli import main

    out = tmp_path / "volumes.nwb"
    assert main(["export", "--nwb", str(record), str(out), "--subject-id", "m1",
                 "--species", "Mus musculus"]) == 0  # fmt: skip
    with pynwb.NWBHDF5IO(str(out), "r") as io:
        raw = io.read().processing["ophys"]["Fluorescence"]["RoiResponseSeries"].data[:]
    np.testing.assert_array_equal(raw.T, live)


def _extract_with_losses(source, volumes: int, lost: set[int]) -> np.ndarray:
    """What the server should have extracted: each plane's frames minus the lost ones."""
    rois = source.footprints
    out = np.full((rois.n_rois, volumes), np.nan, np.float32)
    for k, fp in enumerate(rois.planes):
        ex = RoiExtractor(fp, motion=True)
        lo, hi = rois.offsets[k], rois.offsets[k + 1]
        for v in range(volumes):
            if v * K + k not in lost:
                out[lo:hi, v] = ex.extract(source.get(v * K + k)["image"])[0]
    return out


def test_a_single_plane_session_refuses_frames_of_other_planes(model, volume, tmp_path):
    from calm_rt.extract import save_rois
    from calm_rt.live import TriggerSet
    from calm_rt.serve.session import SessionSetup

    save_rois(tmp_path / "one.npz", volume.footprints.planes[0])
    cfg = ServiceConfig(rois=tmp_path / "one.npz", fps=10.0)
    live = SessionSetup.from_config(model, cfg, TriggerSet()).build_now()
    assert live is not None
    assert live.process(plane_msg(volume, 0, 0)).answered == 1  # plane 0 of one plane: a frame
    with pytest.raises(DataError, match="ROIs for one plane"):
        live.process(plane_msg(volume, 1, 1))


def test_mock_scope_planes_needs_a_folder_for_its_rois(tmp_path):
    run = _mock_scope("--frames", "0", "--rois-out", str(tmp_path / "rois.npz"))
    assert run.wait(120) == 1
    assert "--rois-out is a folder" in run.stdout.read()
