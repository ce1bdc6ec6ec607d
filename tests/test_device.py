"""Choosing the device: ``--device {auto,cpu,cuda}`` end to end, and clear failures without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from calm_rt.errors import ConfigError
from calm_rt.live.device import resolve_device
from calm_rt.live.engine import EngineConfig
from calm_rt.model import ops

NO_GPU = not torch.cuda.is_available()


def test_auto_is_cpu_without_a_gpu():
    assert resolve_device("auto") == ("cpu" if NO_GPU else "cuda")
    assert resolve_device("cpu") == "cpu"
    assert EngineConfig(n_neurons=4, fps=30.0, device="auto").device == resolve_device("auto")


@pytest.mark.parametrize("bad", ["gpu", "cpu:1", "tpu"])
def test_unknown_devices_are_refused(bad):
    with pytest.raises(ConfigError, match="auto, cpu or cuda"):
        resolve_device(bad)
    with pytest.raises(ConfigError):
        EngineConfig(n_neurons=4, fps=30.0, device=bad)


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_says_so():
    with pytest.raises(ConfigError, match=r"no CUDA GPU is usable here.*--device cpu"):
        resolve_device("cuda")
    from calm_rt.serve import ServiceConfig

    with pytest.raises(ConfigError, match="no CUDA GPU"):
        ServiceConfig(device="cuda")


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "calm_rt", "serve", "--device", "cuda", "--seconds", "1"],
        ["-m", "calm_rt", "demo", "--device", "cuda"],
        ["-m", "calm_rt", "replay", "x.npz", "--out", "y.npz", "--device", "cuda"],
        ["-m", "calm_rt", "eval", "--data", "x", "--json", "y.json", "--device", "cuda"],
        ["-m", "bench", "--quick", "--device", "cuda"],
    ],
    ids=["serve", "demo", "replay", "eval", "bench"],
)
def test_cli_device_cuda_without_a_gpu_exits_nonzero_with_one_line(argv, tmp_path):
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)  # fmt: skip
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU is usable here" in lines[0], proc.stderr


def test_a_failing_bench_case_keeps_the_others(monkeypatch):
    from bench import cases

    def broken(cfg, log):
        """A case that fails."""
        raise RuntimeError("CUDA error: an illegal memory access")

    def fine(cfg, log):
        """A case that works."""
        return [{"name": "fine", "case": "fine", "p50_ms": 1.0}]

    monkeypatch.setitem(cases.CASES, "broken", broken)
    monkeypatch.setitem(cases.CASES, "fine", fine)
    rows = cases.run_cases(["broken", "fine"], cases.BenchConfig(), log=lambda m: None)
    assert [r["name"] for r in rows] == ["broken", "fine"]
    assert "illegal memory access" in rows[0]["error"]
    json.dumps(rows)  # still one JSON
    from bench.report import markdown_table

    table = markdown_table({"device": "cpu: test", "torch": torch.__version__, "cases": rows})
    assert "failed: RuntimeError" in table


def test_a_kernel_import_failure_on_cuda_says_what_to_install(monkeypatch):
    monkeypatch.setattr(ops, "_import_kernels", lambda: (None, "ImportError: cannot import knobs"))
    with pytest.raises(ConfigError, match=r"triton>=3\.4,<3\.10.*CALM_RT_KERNELS=reference"):
        ops._kernels_or_raise()


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a CUDA GPU")
def test_gpu_check_without_a_gpu_says_why_in_one_line(tmp_path):
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script), "--json", str(tmp_path / "g.json")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA GPU is usable here")
    assert not (tmp_path / "g.json").exists()


def test_replay_command_runs_the_engine_on_the_chosen_device(tmp_path):
    from calm_rt.data import SimConfig, make_animal, read_npz, simulate_session, write_npz

    cfg = SimConfig(neurons=12, frames=120, seed=3)
    path = write_npz(tmp_path / "s.npz", simulate_session(cfg, make_animal(cfg, 0), 0)[0])
    out = tmp_path / "replayed.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "calm_rt", "replay", str(path), "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "replayed 120 frames of 12 neurons on cpu" in proc.stdout
    assert read_npz(out).n_frames == 120


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_half_precision_on_the_cpu_is_refused_in_one_line(command, tmp_path):
    # The engine can run float16 on the CPU (the tests do), but it is slower there than
    # float32: a rig asking for it has made a mistake, and is told before anything binds.
    from calm_rt.serve import ServiceConfig

    with pytest.raises(ConfigError, match="--dtype float16 is for a GPU"):
        ServiceConfig(device="cpu", dtype="float16")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        ServiceConfig(device="cpu", dtype="half")
    proc = subprocess.run(
        [sys.executable, "-m", "calm_rt", command, "--device", "cpu", "--dtype", "bfloat16",
         "--seconds", "1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bfloat16" in lines[0] and "float32" in lines[0], proc.stderr
