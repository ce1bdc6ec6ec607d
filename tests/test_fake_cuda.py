"""The live path on a fake CUDA device: no CPU tensor may meet a CUDA one.

torch's ``FakeTensorMode`` makes ``cuda`` tensors on this CPU-only build and
raises ``FakeTensorDeviceMismatchError`` where a CPU tensor meets a CUDA one
(the rotary table once did, on every CUDA step). Nothing is computed: these
tests prove device placement, not values (exactness is tests/test_engine.py).

One more piece the CPU build lacks: a device guard for CUDA, which Python
indexing (``x[:, None]``) takes before any dispatch. A 5-line shared library
registers c10's own ``FakeGuardImpl`` for CUDA (built once per session with
the system C++ compiler against torch's headers, seconds).

What the CPU build cannot do even on fake tensors is copy host data to a
fake device, so three seams are replaced here, each by something that checks
what crosses it:

* ``StreamingEngine._to_device`` (a frame's input): returns a fake CUDA tensor;
* ``StreamingEngine._to_host`` (a frame's outputs, one copy): checks every
  output is on CUDA and returns zeros of its shape;
* the KV cache's host-side slot bookkeeping (``advance``/``reset`` read
  ``slot_pos`` with ``bool()``, legitimate on the host, impossible on a fake
  tensor): kept on a real CPU twin; the window mask it returns is staged to
  the device as the engine stages its input.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    FakeTensor,
    FakeTensorDeviceMismatchError,
    FakeTensorMode,
    unset_fake_temporarily,
)

from calm_rt.data import BEHAVIOR_NAMES
from calm_rt.live.engine import EngineConfig, StreamingEngine
from calm_rt.model import PRESETS, CalM, KVCache

CUDA = torch.device("cuda", 0)


def _fake(mode: FakeTensorMode, t: torch.Tensor) -> FakeTensor:
    return FakeTensor(mode, t.detach().to("meta"), CUDA)


def _fake_module(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """Every parameter and buffer of ``module`` replaced, in place, by a fake CUDA tensor."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = nn.Parameter(_fake(mode, p), requires_grad=False)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = _fake(mode, b)
    return module


def _twin_key(tokenizer: nn.Module) -> tuple:
    with warnings.catch_warnings():  # data_ptr() of a fake tensor: 0, with a warning
        warnings.simplefilter("ignore")
        return tuple((p.data_ptr(), p._version) for p in tokenizer.parameters())


def fake_cuda_model(mode: FakeTensorMode, behavior: bool = True) -> CalM:
    """A tiny CalM whose weights (and float64 tokenizer twin) live on a fake CUDA device."""
    torch.manual_seed(0)
    model = CalM(PRESETS["tiny"])
    if behavior:
        model = model.with_behavior(BEHAVIOR_NAMES)
    model.eval()
    # The twin is built from real weights (a fake CPU module cannot move to a
    # fake GPU), then faked alike and keyed as the tokenizer will look it up.
    twin = model.tokenizer._float64_twin()
    _fake_module(model, mode)
    model.tokenizer.__dict__["_twin"] = _fake_module(twin, mode)
    model.tokenizer.__dict__["_twin_key"] = _twin_key(model.tokenizer)
    return model


def _on_cuda(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cuda":
        raise AssertionError(f"{what} is on {t.device}, not on the engine's CUDA device")


class FakeCudaEngine(StreamingEngine):
    """The real engine with the three host-device seams replaced (see the module docstring)."""

    def __init__(self, model: CalM, config: EngineConfig) -> None:
        super().__init__(model, config)
        self.host_copies: list[int] = []  # tensors per device-to-host copy, one copy per frame
        c = self.cache
        with unset_fake_temporarily():
            host = KVCache(1, self.patch, 1, 1, self.context, 2)  # real CPU bookkeeping
        engine = self

        def advance(chain: int, position: int):
            with unset_fake_temporarily():
                slot, keep = host.advance(chain, position)
            return slot, None if keep is None else engine._to_device_mask(keep)

        def reset() -> None:
            c.k.zero_()
            c.v.zero_()
            with unset_fake_temporarily():
                host.reset()

        c.advance, c.reset = advance, reset  # type: ignore[method-assign]

    def _to_device(self, host: np.ndarray) -> torch.Tensor:
        assert isinstance(host, np.ndarray) and host.shape == (self.n,)
        return torch.empty(host.shape, dtype=torch.float32, device=self.device)

    def _to_device_mask(self, keep: torch.Tensor) -> torch.Tensor:
        assert not isinstance(keep, FakeTensor) and keep.dtype == torch.bool
        return torch.empty(keep.shape, dtype=torch.bool, device=self.device)

    def _to_host(self, tensors: list[torch.Tensor]) -> list[np.ndarray]:
        for i, t in enumerate(tensors):
            _on_cuda(t, f"output {i}")
        self.host_copies.append(len(tensors))
        out = []
        for t in tensors:
            dtype = np.float32 if t.is_floating_point() else np.int64
            out.append(np.zeros(tuple(t.shape), dtype))
        return out


_GUARD_CPP = """
#include <c10/core/impl/FakeGuardImpl.h>
namespace {
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
}
"""


@pytest.fixture(scope="module", autouse=True)
def fake_cuda_guard(tmp_path_factory):
    """Register a no-op CUDA device guard in this process (only where torch has none)."""
    if torch.cuda.is_available():
        pytest.skip("a real CUDA build: these tests are for CPU-only machines")
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the fake CUDA device guard")
    root = Path(torch.__file__).parent
    work = tmp_path_factory.mktemp("fake_cuda_guard")
    (work / "guard.cpp").write_text(_GUARD_CPP)
    lib = work / "guard.so"
    subprocess.run(
        [cxx, "-shared", "-fPIC", "-O0", "-std=c++17", f"-I{root / 'include'}",
         str(work / "guard.cpp"), f"-L{root / 'lib'}", "-lc10", f"-Wl,-rpath,{root / 'lib'}",
         "-o", str(lib)],
        check=True, capture_output=True,
    )  # fmt: skip
    ctypes.CDLL(str(lib))  # its static initialiser registers the guard


@pytest.fixture
def mode():
    return FakeTensorMode()


def test_a_mismatch_is_caught(mode):
    """The premise: under the mode, CPU meeting CUDA raises (so a clean run means something)."""
    with mode:
        a = torch.zeros(3, device="cuda")
        with pytest.raises(FakeTensorDeviceMismatchError):
            _ = a + torch.zeros(3)


def test_rotary_tables_follow_the_positions(mode):
    """The bug of issue 17: the rotary table was built on the CPU for CUDA positions."""
    model = fake_cuda_model(mode, behavior=False)
    with mode, torch.no_grad():
        cos, sin = model.dat.rotary(torch.arange(5, device="cuda"))
        _on_cuda(cos, "cos")
        _on_cuda(sin, "sin")


@pytest.mark.parametrize("behavior", [True, False])
def test_engine_steps_on_fake_cuda(mode, behavior):
    """Whole frames: warm-up (window not full, then full), a filled gap, a skipped gap."""
    model = fake_cuda_model(mode, behavior=behavior)
    with mode:
        engine = FakeCudaEngine(model, EngineConfig(n_neurons=16, fps=30.0, device="cuda"))
        assert engine.device.type == "cuda"
        rng = np.random.default_rng(0)
        seqs = [*range(40), 42, 43, 60, 61]  # a gap of 2 (filled) and of 16 (skipped)
        for seq in seqs:
            pred = engine.step((100 + rng.random(16)).astype(np.float32), seq=seq)
            assert pred.forecast.shape == (16, engine.horizon)
            assert (pred.behavior is not None) == behavior
        assert pred.filled == 0 and pred.skipped == 0
        _on_cuda(engine.cache.k, "the KV cache")
        _on_cuda(engine.window, "the token window")
    # One device-to-host copy per computed frame (filled frames are computed too).
    assert len(engine.host_copies) == len(seqs) + 2
    assert set(engine.host_copies) == {4 if behavior else 3}


def test_offline_forward_on_fake_cuda(mode):
    """The offline forward: tokenizer, the dual-axis transformer over whole chains, both heads."""
    model = fake_cuda_model(mode, behavior=False)
    with mode, torch.no_grad():
        out = model.run_offline(torch.empty(8, 60, device="cuda"))
        for name in ("tokens", "hidden", "forecast", "forecast_std", "token_forecast"):
            _on_cuda(getattr(out, name), name)


def test_live_session_loop_on_fake_cuda(mode, monkeypatch):
    """The server's per-frame path in process: a LiveSession built from a CUDA ServiceConfig."""
    import calm_rt.serve.config as config_mod
    import calm_rt.serve.session as session_mod
    from calm_rt.live import TriggerSet
    from calm_rt.serve import ServiceConfig
    from calm_rt.wire import Message

    # The one stand-in for hardware: ServiceConfig checks that a GPU exists.
    # (Patching torch.cuda.is_available instead sends torch down real CUDA paths.)
    monkeypatch.setattr(config_mod, "resolve_device", lambda spec: spec)
    monkeypatch.setattr(session_mod, "StreamingEngine", FakeCudaEngine)
    config = ServiceConfig(device="cuda")
    assert config.device == "cuda"
    model = fake_cuda_model(mode)
    with mode:
        live = session_mod.LiveSession(model, config, 12, None, TriggerSet(), None, False)
        assert live.engine.device.type == "cuda"
        live.warm_up()
        rng = np.random.default_rng(1)
        for seq in range(30):
            traces = (100 + rng.random(12)).astype(np.float32)
            msg = Message("traces", {"seq": seq, "t_arrival": time.time()}, {"traces": traces})
            answer = live.process(msg)
            assert answer.messages  # the forecast (and behaviour) went out
    assert len(live.engine.host_copies) == 2 * model.config.context_frames + 30
