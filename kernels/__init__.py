"""Triton kernels for calm-rt's per-frame hot path.

One op per file, each beside its pure-torch reference (also the CPU path);
``calm_rt`` reaches them only through a dispatcher. This package imports only
torch and triton.

* ``codebook.codebook_lookup_triton(x [M, D], codebook [K, D])`` -> ids, codes, margin
* ``temporal_attention.temporal_attention_step_triton(q, k, v, cos, sin, k_cache, v_cache,
  slot, keep)`` -> ``[N, H, d]`` (rotary + cache append + attention, fused)
* ``neural_attention.neural_attention_triton(q, k, v [H, N, d])`` -> ``[H, N, d]``
* ``reference``: the torch version of each (``*_ref``)

Autotuning is pruned for Hopper GPUs; under ``TRITON_INTERPRET=1`` (tests on
CPU) each kernel runs one fixed config.
"""
