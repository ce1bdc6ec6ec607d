"""Every Triton kernel compiles ahead of time to a cubin for H100/H200 (sm_90) and A100 (sm_80).

No GPU needed: Triton compiles for a target it is told about. sm_90 float32
takes every autotune config the autotuner may pick at the engine's shapes;
sm_80 and float16 take the first of them (the whole grid would cost minutes
on 2 cores; a config that compiles for one target and dtype but not another
is the rarer failure). Run in a subprocess because the kernel tests set
``TRITON_INTERPRET=1``, under which there is nothing to compile. About 40 s
in all on the 2-core dev machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "aot_compile.py"
KERNELS = ("temporal_attention", "neural_attention", "codebook")

pytestmark = pytest.mark.slow


def _compile(tmp_path: Path, *args: str) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache"),
           "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    errors = [r for r in rows if "error" in r]
    assert proc.returncode == 0 and not errors, errors or proc.stderr[-3000:]
    return rows


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_config_compiles_for_sm90_fp32(kernel, tmp_path):
    rows = _compile(tmp_path, kernel, "--arch", "90", "--dtype", "fp32")
    assert len(rows) == rows[0]["of"] >= 1  # every config that survives the pruning
    for r in rows:
        assert "cubin" in r["stages"] and "ptx" in r["stages"], r
        assert r["cubin_bytes"] > 0, r
    assert len({json.dumps(r["config"], sort_keys=True) for r in rows}) == len(rows)


def test_every_kernel_compiles_for_sm80_and_fp16(tmp_path):
    rows = _compile(tmp_path, *KERNELS, "--arch", "80", "90", "--dtype", "fp32", "fp16",
                    "--first-only")  # fmt: skip
    assert {(r["kernel"], r["arch"], r["dtype"]) for r in rows} == {
        (k, a, d) for k in KERNELS for a in (80, 90) for d in ("fp32", "fp16")
    }
    assert all(r["cubin_bytes"] > 0 for r in rows), rows
