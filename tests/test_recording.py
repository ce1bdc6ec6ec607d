"""The HDF5 recording: what a crash leaves is read up to its last whole chunk, with a warning."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from calm_rt.serve.recording import Recorder, load_recording, read_recording


def _row(i: int, n: int = 4, h: int = 3) -> dict:
    return dict(
        traces=np.full(n, i, np.float32), seq=i, t_acq=i / 30, t_arrival=0.0, t_publish=0.0,
        forecast=np.zeros((n, h), np.float32), forecast_std=np.zeros((n, h), np.float32),
    )  # fmt: skip


def test_a_clean_recording_reads_back_whole_with_events_and_behaviour(tmp_path):
    rec = Recorder(tmp_path / "r.h5", 4, 30.0, 3, chunk_frames=10)
    for i in range(25):
        rec.append(behavior=np.full(2, i, np.float32), **_row(i))
    rec.add_trigger(5, 1.0, "A", 2.0, 1.0, 9)
    rec.close()
    back = load_recording(tmp_path / "r.h5")
    assert back.truncated is None and back.n_frames == 25
    np.testing.assert_array_equal(back.arrays["behavior"][:, 0], np.arange(25))
    assert back.events["rule"].tolist() == [b"A"]


def test_a_killed_writer_leaves_frames_up_to_its_last_whole_chunk(tmp_path):
    path = tmp_path / "crash.h5"
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from calm_rt.serve.recording import Recorder
        rec = Recorder({str(path)!r}, 4, 30.0, 3, chunk_frames=10)
        for i in range(25):
            rec.append(traces=np.full(4, i, np.float32), seq=i, t_acq=i / 30, t_arrival=0.0,
                       t_publish=0.0, forecast=np.zeros((4, 3), np.float32),
                       forecast_std=np.zeros((4, 3), np.float32))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    with pytest.warns(RuntimeWarning, match="not closed.*20 frames up to the last whole chunk"):
        back = load_recording(path)
    assert back.n_frames == 20 and back.truncated
    np.testing.assert_array_equal(back.arrays["traces"][:, 0], np.arange(20))
    assert read_recording(path).n_frames == 20
