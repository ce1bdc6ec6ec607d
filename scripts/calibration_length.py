"""How long must the live behaviour calibration be? Reported R2 against R2 on the next minute.

Streams a simulated session through the streaming engine with the shipped
checkpoint, calibrates the ridge readout for each length, then scores the
readout on the following 60 s it never saw. Prints one JSON line per length.

    python scripts/calibration_length.py [--neurons 64] [--seconds 8 30 60 120]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from calm_rt.data import SimConfig, make_animal, simulate_session
from calm_rt.live import r2_score
from calm_rt.live.engine import EngineConfig, StreamingEngine
from calm_rt.model import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neurons", type=int, default=64)
    ap.add_argument("--seconds", type=float, nargs="+", default=[8.0, 30.0, 60.0, 120.0])
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, _ = load_checkpoint(None)
    after = int(60 * args.fps)
    frames = int(max(args.seconds) * args.fps) + after
    cfg = SimConfig(
        animals=1, sessions=1, neurons=args.neurons, frames=frames, fps=args.fps, seed=args.seed
    )
    s, _ = simulate_session(cfg, make_animal(cfg, 0), 0)
    for seconds in args.seconds:
        engine = StreamingEngine(model, EngineConfig(n_neurons=args.neurons, fps=args.fps))
        cal = engine.start_calibration(seconds, tuple(s.behavior_names))
        pred, truth = [], []
        for t in range(cal.target_frames + after):
            neuropil = None if s.neuropil is None else s.neuropil[:, t]
            out = engine.step(s.traces[:, t], seq=t, neuropil=neuropil, behavior=s.behavior[t])
            if t >= cal.target_frames:
                pred.append(out.behavior)
                truth.append(s.behavior[t])
        next_minute = r2_score(np.array(pred), np.array(truth))
        print(
            json.dumps(
                {
                    "calibration_s": seconds,
                    "names": list(s.behavior_names),
                    "reported_r2": [None if v is None else round(v, 3) for v in cal.r2 or []],
                    "next_minute_r2": [round(float(v), 3) for v in next_minute],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
