"""Pure-torch references of every kernel: the ground truth of the kernel tests
and the CPU path of the dispatcher. Shapes are in the docstrings.
"""

from __future__ import annotations

import torch

__all__ = ["codebook_lookup_ref"]


def codebook_lookup_ref(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest codebook entry by squared Euclidean distance.

    Args:
        x: ``[M, D]`` vectors.
        codebook: ``[K, D]`` entries (K >= 2).

    Returns:
        ``ids`` int64 ``[M]``, the chosen entries ``[M, D]``, and ``margin``
        ``[M]``: the second-smallest minus the smallest distance (how close
        the choice was). Ties go to the lowest index.
    """
    # ||x||^2 is the same for every entry of a row, so it cannot change the
    # argmin; leaving it out saves a reduction and some rounding.
    dist = (codebook * codebook).sum(-1)[None, :] - 2.0 * (x @ codebook.T)  # [M, K]
    best = dist.topk(2, dim=-1, largest=False, sorted=True)
    ids = dist.argmin(dim=-1)  # first minimum: the lowest index among ties
    return ids, codebook[ids], best.values[:, 1] - best.values[:, 0]
