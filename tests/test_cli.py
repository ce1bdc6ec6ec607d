"""The `calm-rt` command line as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

from calm_rt.cli._registry import COMMANDS as _COMMANDS
from calm_rt.data import load_corpus

DESIGN_COMMANDS = {
    "demo",
    "serve",
    "mock-scope",
    "listen",
    "simulate",
    "pretrain",
    "finetune",
    "eval",
    "analyze",
}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "calm_rt", *args], capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"calm-rt {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def test_every_design_command_exists_with_an_example():
    assert DESIGN_COMMANDS <= set(_COMMANDS)
    for name in DESIGN_COMMANDS:
        out = run(name, "--help").stdout
        assert "example:" in out and f"calm-rt {name}" in out


def test_simulate_writes_four_sessions_with_behaviour(tmp_path):
    out = tmp_path / "sim"
    proc = run(
        "simulate",
        "--out",
        str(out),
        "--animals",
        "2",
        "--sessions",
        "2",
        "--neurons",
        "120",
        "--frames",
        "3000",
        "--fps",
        "30",
    )
    assert "[4/4]" in proc.stdout  # progress per session
    sessions = load_corpus(out)
    assert len(sessions) == 4
    assert len({s.animal_id for s in sessions}) == 2
    for s in sessions:
        assert (s.n_neurons, s.n_frames, s.fps) == (120, 3000, 30.0)
        assert s.behavior is not None and s.behavior.shape == (3000, 3)


def test_info_reads_real_data_and_writes_json(shared_data, tmp_path):
    proc = run(
        "info",
        str(shared_data / "zebrafish_legare"),
        "--fps",
        "1",
        "--json",
        str(tmp_path / "i.json"),
    )
    assert "67 neurons" in proc.stdout
    assert "dropped 3 of 70" in proc.stderr  # the warning reaches the user
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["sessions"][0]["neurons"] == 67


def test_user_errors_are_one_clear_line(tmp_path):
    proc = run("info", str(tmp_path / "missing.npz"), check=False)
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("info", str(tmp_path), check=False)  # an empty folder
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
