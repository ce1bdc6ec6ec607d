"""`python -m bench` runs a tiny configuration and writes the contract's JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_quick_tiny_writes_the_schema(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick", "--cases", "extract", "engine", "recompute", "kernels", "e2e",
            "--e2e-neurons", "32", "--e2e-size", "96", "--e2e-seconds", "3", "--json", str(out), "--out", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert isinstance(result["device"], str) and isinstance(result["torch"], str)
    names = [c["name"] for c in result["cases"]]
    assert "e2e" in names
    for case in result["cases"]:
        if "skipped" not in case:
            assert case["p50_ms"] <= case["p99_ms"]
    e2e = next(c for c in result["cases"] if c["name"] == "e2e")
    assert {"p50_ms", "p99_ms", "dropped", "neurons", "fps", "frames"} <= set(e2e)
    assert e2e["neurons"] == 32 and e2e["frames"] == 90
    # What the rig heard (sequence numbers) against what the server says it did.
    assert e2e["predictions"] == e2e["server_answered"]
    assert e2e["dropped"] == e2e["server_skipped"] + (e2e["frames"] - e2e["server_received"])
    # Where the time went: every stage of the server's path, and the step as the server runs it.
    assert {"decode", "queue", "extract", "dat", "handoff", "send"} <= set(e2e["stages_ms"])
    assert any(c.get("server_threads") for c in result["cases"])
    assert "Where a frame's time goes" in proc.stdout
    assert "| e2e |" in proc.stdout and (tmp_path / "bench.md").exists()
    assert (tmp_path / "latency_vs_neurons.png").exists()
