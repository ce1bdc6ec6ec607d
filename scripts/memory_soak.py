"""Replay a long stream through the streaming engine and watch its memory.

    python scripts/memory_soak.py --frames 100000            # tiny model, 8 neurons
    python scripts/memory_soak.py --frames 100000 --shipped --neurons 256

Prints the process RSS and the count of live Python objects every
``--every`` frames, and exits 1 if RSS grew by more than ``--max-growth-mb``
after the warm-up. ``tests/test_engine.py`` runs the same 100,000-frame
check with the tiny model and asserts on it; this prints as it goes and takes
any length, neuron count or the shipped model.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import numpy as np
import torch

from calm_rt.live.engine import EngineConfig, StreamingEngine
from calm_rt.model import PRESETS, CalM, load_checkpoint


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--neurons", type=int, default=8)
    ap.add_argument("--shipped", action="store_true", help="the shipped checkpoint (default: tiny)")
    ap.add_argument("--warmup", type=int, default=2_000)
    ap.add_argument("--every", type=int, default=10_000)
    ap.add_argument("--max-growth-mb", type=float, default=5.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_checkpoint(None)[0] if args.shipped else CalM(PRESETS["tiny"]).eval()
    engine = StreamingEngine(model, EngineConfig(n_neurons=args.neurons, fps=30.0))
    rng = np.random.default_rng(0)
    frames = (300 + 10 * rng.normal(size=(args.neurons, 1000))).astype(np.float32)
    t0, start = time.perf_counter(), None
    for t in range(args.frames):
        engine.step(frames[:, t % 1000], seq=t)
        if t + 1 == args.warmup:
            gc.collect()
            start = rss_mb()
        if (t + 1) % args.every == 0:
            gc.collect()
            print(
                f"frame {t + 1:>9,}: RSS {rss_mb():8.1f} MB, {len(gc.get_objects()):,} live objects, "
                f"state {engine.state_nbytes / 2**10:.0f} KiB, {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    growth = rss_mb() - (start if start is not None else rss_mb())
    print(
        f"RSS growth after the warm-up: {growth:+.2f} MB over {args.frames - args.warmup:,} frames"
    )
    return 0 if growth <= args.max_growth_mb else 1


if __name__ == "__main__":
    sys.exit(main())
