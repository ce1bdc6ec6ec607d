"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Before anything imports the Triton kernels: with no GPU they run (and are
# tested) in Triton's CPU interpreter. Triton reads this when a kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The small real recordings of ../shared/data (see its SOURCES.md), resolved
# from the repository root so the tests run from any working directory.
SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; skips the test when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (see shared/data/SOURCES.md)")
    return SHARED_DATA
