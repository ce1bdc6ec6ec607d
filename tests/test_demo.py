"""`calm-rt demo`: the whole loop (scope process -> server -> rig process) on loopback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_cli_runs_headless_and_writes_the_contract_json(tmp_path):
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "calm_rt", "demo", "--seconds", "3", "--neurons", "24", "--size", "96",
            "--json", str(out), "--workdir", str(tmp_path / "work"),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert {"frames_sent", "predictions", "dropped", "p50_ms", "p99_ms", "neurons", "fps"} <= set(
        summary
    )
    # neurons: the server's session, from the ROIs of the rendered movie (not our argument).
    assert summary["frames_sent"] == 90 and summary["neurons"] == 24 and summary["fps"] == 30.0
    # The rig's count (from the sequence numbers it heard) against the server's own counters:
    # every answer reached the rig, and every frame the rig missed the server counted.
    server = summary["server"]
    assert summary["in_order"] and server["rejected"] == 0
    assert summary["predictions"] == server["answered"]
    assert summary["dropped"] == server["skipped"] + (summary["frames_sent"] - server["received"])
    assert summary["p50_ms"] <= summary["p99_ms"]
