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
    assert summary["frames_sent"] == 90 and summary["neurons"] == 24 and summary["fps"] == 30.0
    assert summary["predictions"] + summary["dropped"] == summary["frames_sent"]
    assert summary["predictions"] >= 0.98 * summary["frames_sent"]
    assert summary["p50_ms"] <= summary["p99_ms"]
