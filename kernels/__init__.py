"""Triton kernels for calm-rt's per-frame hot path.

One op per file, each beside its pure-torch reference (also the CPU path);
``calm_rt`` reaches them only through a dispatcher. This package imports only
torch and triton.
"""
