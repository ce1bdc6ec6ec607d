"""Profile the engine step as the server runs it: torch ops and Python time.

    python scripts/profile_step.py --neurons 256 --threads 1

Prints the torch operators by self time (torch.profiler) and the Python
functions by cumulative time (cProfile) over ``--steps`` steady-state steps
of the shipped checkpoint on CPU. What it showed is in docs/engine.md
("Where a frame's time goes").
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from calm_rt.live.engine import EngineConfig, StreamingEngine
from calm_rt.model import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neurons", type=int, default=256)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (the server uses 1 on 2 cores)"
    )
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(None)
    engine = StreamingEngine(model.eval(), EngineConfig(n_neurons=args.neurons, fps=30.0))
    frames = (300 + 20 * np.random.default_rng(0).standard_normal((args.neurons, 256))).astype(
        np.float32
    )

    def steps(n: int) -> None:
        for _ in range(n):
            engine.step(frames[:, engine.frame % 256], seq=engine.frame)

    steps(4 * model.config.context_frames)  # past the window: the steady state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps(args.steps)
    print(f"torch ops, {args.steps} steps of {args.neurons} neurons, {args.threads} thread(s):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    py = cProfile.Profile()
    py.enable()
    steps(args.steps)
    py.disable()
    out = io.StringIO()
    pstats.Stats(py, stream=out).sort_stats("cumulative").print_stats(25)
    print(out.getvalue())


if __name__ == "__main__":
    main()
