"""The hot-path ops as PyTorch operators (``torch.ops.calm_rt.*``).

``torch.library.opcheck`` checks each schema against what the kernels do
(the temporal step writes its two caches and nothing else), the fake
kernels against the real ones, and that AOT autograd traces them. Then:
``torch.compile(fullgraph=True)`` runs through them with no graph break and
the same answer, the fake kernels refuse tensors on two devices, and
training through the Triton neural attention keeps its gradients.

Under ``CALM_RT_KERNELS=triton`` the ops run the kernels in Triton's CPU
interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from calm_rt.model import ops

MODES = ["reference", pytest.param("triton", marks=pytest.mark.kernels)]


def _temporal_args(seed: int = 0, n: int = 7, heads: int = 2, slots: int = 5, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, n, heads, d, generator=g).unbind(0)
    angle = torch.rand(1, d // 2, generator=g) * 6.0
    k_cache = torch.randn(n, heads, slots, d, generator=g)
    v_cache = torch.randn(n, heads, slots, d, generator=g)
    keep = torch.tensor([True, False, True, True, False])[:slots]
    return [q, k, v, angle.cos(), angle.sin(), k_cache, v_cache, 2, keep]


def _neural_args(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return list(torch.randn(3, 3, 2, 11, 8, generator=g).unbind(0))  # [G, H, N, d] each


def _codebook_args(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(9, 6, generator=g), torch.randn(13, 6, generator=g)]


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode, monkeypatch):
    monkeypatch.setenv("CALM_RT_KERNELS", mode)
    torch.library.opcheck(torch.ops.calm_rt.codebook_lookup.default, _codebook_args())
    torch.library.opcheck(torch.ops.calm_rt.neural_attention.default, _neural_args())
    torch.library.opcheck(torch.ops.calm_rt.temporal_attention_step.default, _temporal_args())
    no_keep = _temporal_args(seed=3)
    no_keep[-1] = None
    torch.library.opcheck(torch.ops.calm_rt.temporal_attention_step.default, no_keep)


def test_the_cpu_shortcut_equals_the_operator():
    """CPU eager inference skips the dispatcher (it calls the references); the
    operator, whose CPU kernel is the same reference, gives the same answer."""
    args = _temporal_args()
    op_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    out = ops.temporal_attention_step(*args)
    op_out = torch.ops.calm_rt.temporal_attention_step(*op_args)
    assert torch.equal(out, op_out)
    assert torch.equal(args[5], op_args[5]) and torch.equal(args[6], op_args[6])
    assert not torch.equal(args[5], _temporal_args()[5])  # the slot was written

    assert torch.equal(
        ops.neural_attention(*_neural_args()), torch.ops.calm_rt.neural_attention(*_neural_args())
    )
    for a, b in zip(ops.codebook_lookup(*_codebook_args(), with_margin=True),
                    torch.ops.calm_rt.codebook_lookup(*_codebook_args())):  # fmt: skip
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_compile_traces_through_the_ops_without_a_graph_break(mode, monkeypatch):
    """One temporal step, neural attention on its output and a lookup, compiled
    with ``fullgraph=True`` (a graph break is an error): the eager answer, and
    the caches written as in eager."""
    monkeypatch.setenv("CALM_RT_KERNELS", mode)
    codebook = torch.randn(13, 16, generator=torch.Generator().manual_seed(5))

    def step(q, k, v, cos, sin, k_cache, v_cache, slot: int, keep):
        att = ops.temporal_attention_step(
            q, k, v, cos, sin, k_cache, v_cache, slot, keep
        )  # [N, H, d]
        mixed = ops.neural_attention(*(att.transpose(0, 1)[None] for _ in range(3)))  # [1, H, N, d]
        ids, codes = ops.codebook_lookup(
            mixed[0].transpose(0, 1).reshape(att.shape[0], -1), codebook
        )
        return mixed, ids, codes

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_args, compiled_args = _temporal_args(), _temporal_args()
    with torch.inference_mode():
        expected = step(*eager_args)
        got = compiled(*compiled_args)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_args[5], eager_args[5])
    torch.testing.assert_close(compiled_args[6], eager_args[6])


def _fake(mode: FakeTensorMode, t: torch.Tensor, device: str) -> FakeTensor:
    return FakeTensor(
        mode, t.to("meta"), torch.device(device, 0) if device == "cuda" else torch.device(device)
    )


def test_fake_kernels_refuse_two_devices():
    """Under FakeTensorMode (fake CUDA tensors on this CPU build) the ops check
    placement: a CPU rotary table beside CUDA caches is refused, as a launch
    on a GPU would be."""
    mode = FakeTensorMode()
    args = _temporal_args()
    on_cuda = [_fake(mode, a, "cuda") if isinstance(a, torch.Tensor) else a for a in args]
    cos_on_cpu = _fake(mode, args[3], "cpu")
    # (No indexing of fake CUDA tensors: that needs a CUDA device guard, which
    # tests/test_fake_cuda.py builds; the ops need none.)
    x, codebook = (_fake(mode, a, "cuda") for a in _codebook_args())
    with mode:
        out = torch.ops.calm_rt.temporal_attention_step(*on_cuda)
        assert out.device == torch.device("cuda", 0) and out.shape == args[0].shape
        mixed = list(on_cuda)
        mixed[3] = cos_on_cpu  # the rotary table on the CPU
        with pytest.raises(RuntimeError, match=r"one device.*cos on cpu"):
            torch.ops.calm_rt.temporal_attention_step(*mixed)
        ids, codes, _ = torch.ops.calm_rt.codebook_lookup(x, codebook)
        assert ids.dtype == torch.int64 and ids.shape == (9,) and codes.shape == (9, 6)
        assert codes.device == torch.device("cuda", 0)
        with pytest.raises(ValueError, match="alike"):
            torch.ops.calm_rt.neural_attention(on_cuda[0], on_cuda[1], on_cuda[5])


@pytest.mark.kernels
def test_training_through_the_triton_neural_attention_keeps_gradients(monkeypatch):
    """The kernel has no backward: with gradients needed, neural attention takes
    the differentiable reference (it once took the kernel on CUDA, whose output
    has no grad_fn, so the attention's qkv weights silently never trained)."""
    from calm_rt.model import PRESETS
    from calm_rt.model.dat import NeuralAttention

    torch.manual_seed(0)
    layer = NeuralAttention(PRESETS["tiny"].dat)
    x = torch.randn(2, 9, 3, PRESETS["tiny"].dat.width)

    def grads(mode: str) -> list[torch.Tensor]:
        monkeypatch.setenv("CALM_RT_KERNELS", mode)
        layer.zero_grad()
        layer(x).square().mean().backward()
        missing = [name for name, p in layer.named_parameters() if p.grad is None]
        assert not missing, f"CALM_RT_KERNELS={mode}: no gradient reached {missing}"
        return [p.grad.clone() for p in layer.parameters()]

    reference, forced = grads("reference"), grads("triton")
    for r, f in zip(reference, forced):
        assert f.abs().sum() > 0
        torch.testing.assert_close(f, r)
