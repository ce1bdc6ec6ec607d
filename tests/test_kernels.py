"""Triton kernels against their torch references, and the dispatcher that picks them.

Without a GPU these run in Triton's CPU interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` before any kernel is imported); on a GPU the same tests
run the compiled kernels. Shapes are small so the file stays well under a
minute on 2 cores, but every masking path is hit: sizes that are not powers
of two, a cache filled with 1 slot and with all of them, several head dims.

float16 inputs are compared with the reference evaluated in float32 on the
same float16 values, because that is the kernels' arithmetic (float16 loads,
float32 accumulation); float16 arithmetic in the reference would be the less
accurate of the two.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from calm_rt.errors import ConfigError
from calm_rt.model import ops
from kernels import _tuning
from kernels import codebook as codebook_mod
from kernels.codebook import codebook_lookup_triton
from kernels.neural_attention import neural_attention_triton
from kernels.reference import (
    codebook_lookup_ref,
    neural_attention_ref,
    temporal_attention_step_ref,
)
from kernels.temporal_attention import temporal_attention_step_triton

pytestmark = pytest.mark.kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (dtype, atol, rtol) of kernel outputs against the reference. No bfloat16:
# the interpreter computes it wrongly.
TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
]


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str
) -> None:
    """allclose that says how many elements differ, by how much, and where the first is."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    if actual.shape != expected.shape:
        pytest.fail(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        worst = (actual - expected).abs().nan_to_num(float("inf")).max().item()
        pytest.fail(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ beyond atol={atol}, "
            f"rtol={rtol} (max abs diff {worst:.3g}); first at {first}: "
            f"{actual[first].item():.6g} vs expected {expected[first].item():.6g}"
        )


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def _rotary(d: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[1, d/2]`` float64, as ``calm_rt.model.rotary_cos_sin`` makes them."""
    inv_freq = 1000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = float(position) * inv_freq[None, :]
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


# ---------------------------------------------------------------------------
# codebook lookup


@pytest.mark.parametrize(
    "m, k, d",
    [(256, 128, 16), (77, 100, 8), (130, 37, 24), (1, 2, 3), (200, 300, 64)],
)
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_codebook_lookup_matches_reference(m, k, d, dtype, atol, rtol):
    x = _randn(m, d, dtype=dtype, seed=m + k)
    codebook = _randn(k, d, dtype=dtype, seed=d)
    ids, codes, margin = codebook_lookup_triton(x, codebook)
    ref_ids, _, ref_margin = codebook_lookup_ref(x.float(), codebook.float())

    assert ids.dtype == torch.int64 and codes.dtype == dtype and margin.dtype == dtype
    if dtype == torch.float32:
        # Exact agreement: float32 rounding never flips an argmin on these inputs.
        mismatched = int((ids != ref_ids).sum())
        assert mismatched == 0, f"{mismatched} of {m} ids differ from the reference"
    else:
        # float16: only where the two nearest codes are clearly apart (a rounding
        # difference can flip a near-tie); almost every row must qualify.
        clear = ref_margin > 1e-3 * (1.0 + ref_margin.abs().max())
        assert int(clear.sum()) >= 0.95 * m
        mismatched = int((ids != ref_ids)[clear].sum())
        assert mismatched == 0, f"{mismatched} of {int(clear.sum())} clear ids differ"
    assert torch.equal(codes, codebook[ids]), "codes must be the chosen codebook rows, bit for bit"
    # A margin is a difference of distances: its rounding scales with theirs.
    scale = (x.float().norm(dim=1).max() + codebook.float().norm(dim=1).max()).item() ** 2
    assert_close(margin, ref_margin, atol=atol * scale, rtol=rtol, what="margin")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_codebook_ties_go_to_the_lowest_index_across_tiles(dtype):
    """Small integers make every distance exact, so ties are real ties (also
    across the kernel's 64-entry tiles); duplicated codes force them."""
    g = torch.Generator().manual_seed(3)
    codebook = torch.randint(-2, 3, (150, 16), generator=g).to(dtype)
    codebook[100] = codebook[10]
    codebook[140] = codebook[10]
    x = torch.randint(-2, 3, (97, 16), generator=g).to(dtype)
    x[:5] = codebook[10]
    x, codebook = x.to(DEVICE), codebook.to(DEVICE)
    ids, codes, margin = codebook_lookup_triton(x, codebook)
    ref_ids, ref_codes, ref_margin = codebook_lookup_ref(x.float(), codebook.float())
    assert (ids[:5] == 10).all() and (margin[:5] == 0).all()
    assert torch.equal(ids, ref_ids)
    assert torch.equal(margin.float(), ref_margin)
    assert torch.equal(codes.float(), ref_codes)


def test_codebook_lookup_rejects_bad_input():
    x = torch.zeros(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="D=8"):
        codebook_lookup_triton(x, torch.zeros(16, 6, device=DEVICE))
    with pytest.raises(ValueError, match="at least 2"):
        codebook_lookup_triton(x, torch.zeros(1, 8, device=DEVICE))
    with pytest.raises(ValueError, match="share one of"):
        codebook_lookup_triton(x, torch.zeros(16, 8, device=DEVICE, dtype=torch.float16))


# ---------------------------------------------------------------------------
# temporal attention step


def _temporal_inputs(n, h, c, d, dtype, seed):
    qkv = _randn(n, 3, h, d, dtype=dtype, seed=seed)
    q, k, v = qkv.unbind(1)  # strided views, as the model's fused projection gives them
    k_cache = _randn(n, h, c, d, dtype=dtype, seed=seed + 1)
    v_cache = _randn(n, h, c, d, dtype=dtype, seed=seed + 2)
    return q, k, v, k_cache, v_cache


def _temporal_ref(q, k, v, cos, sin, k_cache, v_cache, slot, keep):
    """The reference on float32 copies; returns (output, k_cache, v_cache)."""
    kc, vc = k_cache.float().clone(), v_cache.float().clone()
    out = temporal_attention_step_ref(q.float(), k.float(), v.float(), cos, sin, kc, vc, slot, keep)
    return out, kc, vc


@pytest.mark.parametrize(
    "n, h, c, d",
    [(24, 2, 12, 16), (100, 4, 12, 16), (37, 3, 40, 32), (5, 2, 7, 64), (70, 2, 12, 8)],
)
@pytest.mark.parametrize("fill", ["one", "some", "full", "none-mask"])
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_temporal_attention_step_matches_reference(n, h, c, d, fill, dtype, atol, rtol):
    q, k, v, k_cache, v_cache = _temporal_inputs(n, h, c, d, dtype, seed=n + c)
    slot = (n * 7) % c
    cos, sin = _rotary(d, position=1000 + n)
    keep = None
    if fill != "none-mask":
        keep = torch.zeros(c, dtype=torch.bool)
        keep[slot] = True
        if fill == "full":
            keep[:] = True
        elif fill == "some":
            keep[torch.randperm(c, generator=torch.Generator().manual_seed(c))[: c // 2]] = True
        keep = keep.to(DEVICE)
    out_ref, kc_ref, vc_ref = _temporal_ref(q, k, v, cos, sin, k_cache, v_cache, slot, keep)

    out = temporal_attention_step_triton(q, k, v, cos, sin, k_cache, v_cache, slot, keep)
    assert out.shape == (n, h, d) and out.dtype == dtype
    assert_close(out, out_ref, atol, rtol, "attention output")
    assert_close(k_cache, kc_ref, atol, rtol, "k_cache after the append")
    assert_close(v_cache, vc_ref, atol, rtol, "v_cache after the append")


def test_temporal_attention_follows_the_engines_ring_window():
    """The engine's ring: slot = pos mod C, keep = slots whose position is in
    the last C; the cache fills from 1 slot to C, then slides."""
    n, h, c, d, steps = 20, 2, 5, 16, 12
    k_cache = torch.zeros(n, h, c, d, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    slot_pos = torch.full((c,), -c - 1)
    for pos in range(steps):
        q, k, v, _, _ = _temporal_inputs(n, h, 1, d, torch.float32, seed=100 + pos)
        slot = pos % c
        slot_pos[slot] = pos
        keep = (slot_pos > pos - c).to(DEVICE)
        assert int(keep.sum()) == min(pos + 1, c)
        cos, sin = _rotary(d, position=pos)
        out = temporal_attention_step_triton(q, k, v, cos, sin, k_cache, v_cache, slot, keep)
        ref = temporal_attention_step_ref(q, k, v, cos, sin, kc_ref, vc_ref, slot, keep)
        assert_close(out, ref, 1e-5, 1e-5, f"output at chain position {pos}")
    assert_close(k_cache, kc_ref, 1e-6, 1e-6, "k_cache after the ring wrapped")


def test_temporal_attention_step_rejects_bad_input():
    q, k, v, k_cache, v_cache = _temporal_inputs(4, 2, 6, 16, torch.float32, seed=0)
    cos, sin = _rotary(16, 3)
    with pytest.raises(ValueError, match="slot"):
        temporal_attention_step_triton(q, k, v, cos, sin, k_cache, v_cache, 6, None)
    with pytest.raises(ValueError, match="keep"):
        keep = torch.ones(5, dtype=torch.bool, device=DEVICE)
        temporal_attention_step_triton(q, k, v, cos, sin, k_cache, v_cache, 0, keep)
    with pytest.raises(ValueError, match="k_cache"):
        temporal_attention_step_triton(q, k, v, cos, sin, k_cache[:3], v_cache[:3], 0, None)


# ---------------------------------------------------------------------------
# neural attention


@pytest.mark.parametrize(
    "h, n, d",
    [(4, 256, 16), (2, 77, 16), (2, 130, 32), (1, 1, 64), (3, 200, 64), (1, 1000, 16)],
)
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_neural_attention_matches_reference(h, n, d, dtype, atol, rtol):
    # Strided [H, N, d] views of one [N, 3, H, d] projection, as the model passes them.
    qkv = _randn(n, 3, h, d, dtype=dtype, seed=n + d).permute(1, 2, 0, 3)
    q, k, v = qkv.unbind(0)
    out = neural_attention_triton(q, k, v)
    assert out.shape == (h, n, d) and out.dtype == dtype
    assert_close(
        out, neural_attention_ref(q.float(), k.float(), v.float()), atol, rtol, "attention"
    )


def test_neural_attention_rejects_bad_input():
    q = torch.zeros(2, 10, 16, device=DEVICE)
    with pytest.raises(ValueError, match="alike"):
        neural_attention_triton(q, q, q[:, :5])
    with pytest.raises(ValueError, match="last dimension"):
        neural_attention_triton(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2))


# ---------------------------------------------------------------------------
# dispatcher and engine


def test_dispatcher_forced_to_triton_runs_the_kernels(monkeypatch):
    monkeypatch.setenv("CALM_RT_KERNELS", "triton")
    calls = []
    real = codebook_mod.codebook_lookup_triton

    def spy(*args):
        calls.append("codebook")
        return real(*args)

    monkeypatch.setattr(codebook_mod, "codebook_lookup_triton", spy)
    x, codebook = (
        _randn(50, 8, dtype=torch.float32, seed=1),
        _randn(70, 8, dtype=torch.float32, seed=2),
    )
    ids, codes, margin = ops.codebook_lookup(x, codebook, with_margin=True)
    ref_ids, ref_codes, ref_margin = codebook_lookup_ref(x, codebook)
    assert calls == ["codebook"]
    assert torch.equal(ids, ref_ids) and torch.equal(codes, ref_codes)
    assert_close(margin, ref_margin, 1e-4, 1e-5, "margin")
    assert len(ops.codebook_lookup(x, codebook)) == 2

    q, k, v, k_cache, v_cache = _temporal_inputs(30, 2, 12, 16, torch.float32, seed=4)
    cos, sin = _rotary(16, 17)
    keep = torch.ones(12, dtype=torch.bool, device=DEVICE)
    out_ref, kc_ref, _ = _temporal_ref(q, k, v, cos, sin, k_cache, v_cache, 5, keep)
    out = ops.temporal_attention_step(q, k, v, cos, sin, k_cache, v_cache, 5, keep)
    assert_close(out, out_ref, 1e-5, 1e-5, "temporal attention via ops")
    assert_close(k_cache, kc_ref, 1e-6, 1e-6, "k_cache via ops")

    q, k, v = _randn(3, 2, 90, 16, dtype=torch.float32, seed=5).unbind(0)
    assert_close(
        ops.neural_attention(q, k, v), neural_attention_ref(q, k, v), 1e-5, 1e-5, "neural via ops"
    )


def test_dispatcher_modes(monkeypatch):
    x, codebook = torch.randn(6, 4), torch.randn(9, 4)
    calls = []
    monkeypatch.setattr(codebook_mod, "codebook_lookup_triton", lambda *a: calls.append(a))
    for mode in ("reference", "auto"):  # CPU tensors: auto means the reference
        monkeypatch.setenv("CALM_RT_KERNELS", mode)
        assert torch.equal(ops.codebook_lookup(x, codebook)[0], codebook_lookup_ref(x, codebook)[0])
    monkeypatch.setenv(
        "CALM_RT_KERNELS", "triton"
    )  # float64 is the exact path: always the reference
    ops.codebook_lookup(x.double(), codebook.double())
    assert calls == []

    monkeypatch.setattr(_tuning, "INTERPRET", False)  # as if TRITON_INTERPRET were unset
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        ops.codebook_lookup(x, codebook)
    monkeypatch.setenv("CALM_RT_KERNELS", "fast")
    with pytest.raises(ConfigError, match="auto, triton or reference"):
        ops.codebook_lookup(x, codebook)


def test_engine_with_kernels_forced_equals_the_reference_path(monkeypatch):
    """A few frames of the streaming engine (tiny model, 6 neurons) through the
    kernels give the reference path's tokens and forecasts."""
    from calm_rt.live.engine import EngineConfig, StreamingEngine
    from calm_rt.model import PRESETS, CalM

    torch.manual_seed(0)
    model = CalM(PRESETS["tiny"]).eval()
    frames = (300 + 20 * np.random.default_rng(0).standard_normal((6, 9))).astype(np.float32)

    def run(mode: str):
        monkeypatch.setenv("CALM_RT_KERNELS", mode)
        engine = StreamingEngine(model, EngineConfig(n_neurons=6, fps=30.0, device=DEVICE))
        return [engine.step(frames[:, t], seq=t) for t in range(frames.shape[1])]

    import kernels.neural_attention as neural_mod
    import kernels.temporal_attention as temporal_mod

    calls: list[str] = []
    for mod, name in [(codebook_mod, "codebook_lookup_triton"), (temporal_mod, "temporal_attention_step_triton"),
                      (neural_mod, "neural_attention_triton")]:  # fmt: skip
        real = getattr(mod, name)
        monkeypatch.setattr(
            mod, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a)
        )

    reference = run("reference")
    assert calls == []
    kernels = run("triton")
    # Per frame: the tokenizer's lookup, then per layer (2) temporal and neural attention.
    assert len(calls) == 5 * frames.shape[1] and len(set(calls)) == 3
    for ref, ker in zip(reference, kernels):
        np.testing.assert_array_equal(ker.tokens, ref.tokens)
        np.testing.assert_allclose(ker.forecast, ref.forecast, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(ker.forecast_std, ref.forecast_std, atol=2e-5, rtol=1e-4)


def test_temporal_tuning_key_does_not_change_when_the_window_fills(monkeypatch):
    """The autotuner keys on every argument's dtype: ``keep`` present or not must not change them.

    (It once passed the float64 ``cos`` for a missing mask and a uint8 view
    otherwise, so a GPU tuned all over again, on a live frame, at frame 48.)
    """
    import kernels.temporal_attention as tmod

    seen = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(
                tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
            )

    monkeypatch.setattr(tmod, "_temporal_attention_step_kernel", Recorder())
    n, h, c, d = 8, 2, 12, 16
    q, k, v = torch.zeros(3, n, h, d).unbind(0)
    k_cache, v_cache = torch.zeros(2, n, h, c, d).unbind(0)
    cos = sin = torch.zeros(1, d // 2, dtype=torch.float64)
    for keep in (torch.ones(c, dtype=torch.bool), None):
        tmod.temporal_attention_step_triton(q, k, v, cos, sin, k_cache, v_cache, 3, keep)
    assert len(seen) == 2 and seen[0] == seen[1]
