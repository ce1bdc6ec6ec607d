"""The hot-path ops: Triton kernels on CUDA, torch references elsewhere.

Each op is a PyTorch operator, ``torch.ops.calm_rt.<name>``, with a schema
(the temporal step declares the two caches it writes), a CPU and a CUDA
kernel and a fake kernel (shapes, dtypes and devices without data). So
``torch.compile`` traces through them without a graph break, ``FakeTensorMode``
checks device placement through them, and ``torch.library.opcheck`` tests them
(tests/test_torch_ops.py). The low-level ``torch.library.Library`` API is used
rather than ``torch.library.custom_op``: measured on the CPU (Xeon, 1 thread,
256 neurons), ``custom_op``'s Python wrapper cost about 80 us per temporal
step against the dispatcher's 15-20 us.

The public functions below call the operators, with two exceptions:

* CPU eager inference under ``auto`` calls the torch reference directly:
  the dispatcher would add about 5-20 us per call, 5 calls per frame, for
  the same answer (tracing, fake tensors and forced modes take the op);
* ``neural_attention`` with gradients needed calls the differentiable
  reference (the kernel has no backward); on CUDA that is PyTorch's flash
  attention, so training on a GPU gets gradients through neural attention.

``CALM_RT_KERNELS`` forces a choice, read at every call:

* ``auto`` (the default): the Triton kernel when the tensors are on CUDA
  (where a failed kernel import is a :class:`ConfigError` saying what to
  install, never a silent fall-back), the torch reference otherwise;
* ``triton``: always the kernel; fails with :class:`ConfigError` when it
  cannot run (Triton missing, or CPU tensors without ``TRITON_INTERPRET=1``,
  which runs the kernels in Triton's CPU interpreter - slow, for tests);
* ``reference``: always the torch reference.

Fake tensors (``FakeTensorMode``, ``torch.compile``'s tracing) take the
fake kernels, which check that every input is on one device. float64 inputs
always take the reference: the kernels accumulate in float32, and float64 is
what calm-rt uses when it must be exact (near-tie tokenisation). This module is the only place calm_rt reaches ``kernels``.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from calm_rt.errors import ConfigError
from kernels.reference import (
    codebook_lookup_ref,
    neural_attention_ref,
    temporal_attention_step_ref,
)

__all__ = ["codebook_lookup", "kernel_mode", "neural_attention", "temporal_attention_step"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_mode() -> str:
    """``CALM_RT_KERNELS``: ``auto``, ``triton`` or ``reference``."""
    mode = os.environ.get("CALM_RT_KERNELS", "auto").lower()
    if mode not in ("auto", "triton", "reference"):
        raise ConfigError(f"CALM_RT_KERNELS must be auto, triton or reference, got {mode!r}")
    return mode


# The Triton range the kernels are written for (pyproject's ``gpu`` extra says the same).
TRITON_SPEC = "triton>=3.4,<3.10"


@functools.cache
def _import_kernels() -> tuple[ModuleType | None, str | None]:
    """The kernel modules, imported on first use, or None and why not."""
    try:
        import kernels.codebook
        import kernels.neural_attention
        import kernels.temporal_attention
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return kernels, None


def _kernels() -> ModuleType | None:
    """The kernel modules (None when Triton is unavailable or too old)."""
    return _import_kernels()[0]


def _kernels_or_raise() -> ModuleType:
    """The kernel modules for CUDA tensors: never a silent fall-back to the references."""
    mod, why = _import_kernels()
    if mod is None:
        raise ConfigError(
            f"the Triton kernels cannot be imported on this CUDA machine ({why}); install "
            f"`pip install '{TRITON_SPEC}'` (or `pip install 'calm-rt[gpu]'`), or set "
            "CALM_RT_KERNELS=reference to run the torch references on the GPU"
        )
    return mod


def _use_triton(x: torch.Tensor) -> bool:
    """Whether this call goes to the Triton kernel (``x`` is its first input)."""
    if not x.is_cuda and os.environ.get("CALM_RT_KERNELS", "auto") == "auto":
        return False  # CPU tensors under auto (a compiled step): no validation needed
    mode = kernel_mode()
    if mode == "reference" or x.dtype not in _KERNEL_DTYPES:
        return False
    if mode == "auto":
        return x.is_cuda and _kernels_or_raise() is not None
    mod = _kernels()
    if mod is None:
        raise ConfigError(
            f"CALM_RT_KERNELS=triton but the kernels cannot be imported ({_import_kernels()[1]}): "
            f"install `pip install '{TRITON_SPEC}'` or set CALM_RT_KERNELS=auto"
        )
    # The kernels decided between compiling and interpreting when imported.
    if not x.is_cuda and not mod._tuning.INTERPRET:
        raise ConfigError(
            f"CALM_RT_KERNELS=triton but the tensors are on {x.device}: the kernels need a CUDA "
            "GPU, or TRITON_INTERPRET=1 set from the start (Triton reads it when the kernels are "
            "first imported) to run them in Triton's CPU interpreter; or set CALM_RT_KERNELS=auto"
        )
    return True


# ---------------------------------------------------------------------------
# The operators: schemas, device kernels, fake kernels

_LIB = torch.library.Library("calm_rt", "DEF")  # the low-level API, on purpose (see above)
_LIB.define("codebook_lookup(Tensor x, Tensor codebook) -> (Tensor, Tensor, Tensor)")
_LIB.define(
    "temporal_attention_step(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, "
    "Tensor(a!) k_cache, Tensor(b!) v_cache, SymInt slot, Tensor? keep) -> Tensor"
)
_LIB.define("neural_attention(Tensor q, Tensor k, Tensor v) -> Tensor")


def _codebook_lookup_impl(
    x: torch.Tensor, codebook: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_triton(x):
        return _kernels().codebook.codebook_lookup_triton(x, codebook)
    return codebook_lookup_ref(x, codebook)


def _temporal_attention_step_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: int,
    keep: torch.Tensor | None,
) -> torch.Tensor:
    if _use_triton(q):
        fn = _kernels().temporal_attention.temporal_attention_step_triton
    else:
        fn = temporal_attention_step_ref
    return fn(q, k, v, cos, sin, k_cache, v_cache, slot, keep)


def _neural_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if _use_triton(q):
        lead = q.shape[:-2]
        flat = [t.reshape(-1, *t.shape[-2:]) for t in (q, k, v)]  # [G*H, N, d]
        return _kernels().neural_attention.neural_attention_triton(*flat).view(*lead, *q.shape[-2:])
    return neural_attention_ref(q, k, v)


for _key in ("CPU", "CUDA"):
    _LIB.impl("codebook_lookup", _codebook_lookup_impl, _key)
    _LIB.impl("temporal_attention_step", _temporal_attention_step_impl, _key)
    _LIB.impl("neural_attention", _neural_attention_impl, _key)


def _same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """The fake kernels' device check: what a real launch would need (and a
    mixed CPU/CUDA call on a GPU would fail on, mid-experiment)."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise RuntimeError(f"calm_rt::{op}: every tensor must be on one device, got {where}")


@torch.library.register_fake("calm_rt::codebook_lookup", lib=_LIB)
def _codebook_lookup_fake(
    x: torch.Tensor, codebook: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _same_device("codebook_lookup", x=x, codebook=codebook)
    if x.ndim != 2 or codebook.ndim != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"codebook_lookup: x [M, D] and codebook [K, D], got {tuple(x.shape)} "
            f"and {tuple(codebook.shape)}"
        )
    m = x.shape[0]
    return x.new_empty(m, dtype=torch.int64), x.new_empty(m, x.shape[1]), x.new_empty(m)


@torch.library.register_fake("calm_rt::temporal_attention_step", lib=_LIB)
def _temporal_attention_step_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: int,
    keep: torch.Tensor | None,
) -> torch.Tensor:
    _same_device(
        "temporal_attention_step",
        q=q, k=k, v=v, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache, keep=keep,
    )  # fmt: skip
    if q.shape != k.shape or q.shape != v.shape or k_cache.shape != v_cache.shape:
        raise ValueError(
            "temporal_attention_step: q, k, v must be alike and so must the caches, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(k_cache.shape)}, "
            f"{tuple(v_cache.shape)}"
        )
    return torch.empty_like(q)


@torch.library.register_fake("calm_rt::neural_attention", lib=_LIB)
def _neural_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    _same_device("neural_attention", q=q, k=k, v=v)
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"neural_attention: q, k, v must be alike, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------
# The public functions


def _eager_cpu(x: torch.Tensor) -> bool:
    """CPU eager inference under ``auto``: the op would only add dispatch to the reference."""
    return (
        type(x) is torch.Tensor  # not a FakeTensor or another subclass
        and not x.is_cuda
        and os.environ.get("CALM_RT_KERNELS", "auto") == "auto"
        and not torch.compiler.is_compiling()
    )


def codebook_lookup(x: torch.Tensor, codebook: torch.Tensor, with_margin: bool = False):
    """Nearest code per row: ``x [M, D]``, ``codebook [K, D]`` to ids ``[M]`` and codes ``[M, D]``.

    With ``with_margin`` also the gap ``[M]`` between the two nearest
    distances (ties and near-ties have a gap near 0). Ties go to the lowest id.
    Not differentiable (tokenisation is under ``no_grad``).
    """
    if _eager_cpu(x):
        ids, codes, margin = codebook_lookup_ref(x, codebook)
    else:
        ids, codes, margin = torch.ops.calm_rt.codebook_lookup(x, codebook)
    return (ids, codes, margin) if with_margin else (ids, codes)


def temporal_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: int,
    keep: torch.Tensor | None,
) -> torch.Tensor:
    """One new token per neuron against its temporal KV cache (inference only).

    ``q, k, v [N, H, d]`` (q and k not yet rotated), rotary ``cos, sin
    [1, d/2]`` of the token's position, caches ``[N, H, C, d]`` whose slot
    ``slot`` is overwritten in place with the rotated key and the value,
    ``keep [C]`` bool (the slots in the window; ``None``: all). Returns the
    attention output ``[N, H, d]``.
    """
    if _eager_cpu(q):
        return temporal_attention_step_ref(q, k, v, cos, sin, k_cache, v_cache, slot, keep)
    return torch.ops.calm_rt.temporal_attention_step(
        q, k, v, cos, sin, k_cache, v_cache, slot, keep
    )


def neural_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention across neurons: ``q, k, v [..., H, N, d]`` to the same shape.

    Leading dimensions are independent groups (time steps of a batch), as heads are.
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad or _eager_cpu(q):
        return neural_attention_ref(q, k, v)
    return torch.ops.calm_rt.neural_attention(q, k, v)
