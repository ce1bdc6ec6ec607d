"""Score a checkpoint on the README's quality sets in minutes: the rows that move with the model.

    python scripts/quick_quality.py --checkpoint runs/ckpt_v2 --sets s57 hindbrain

For comparing checkpoints while developing one. Per set it runs `calm-rt
eval`'s own :func:`calm_rt.offline.evaluate.evaluate` with the baselines that
cost nothing to fit (copy-last, linear AR, the ridge decoder) and without the
live replay, the POCO-style runs and the GRU, and prints one line of scores:
``calm``, ``calm_zeroshot``, ``calm_tokens`` (models with a continuous head),
``linear_ar``, ``calm`` MSE at h = 1, pooled interval coverage, and decoding
R2 where the set has behaviour. The numbers equal the full `calm-rt eval`'s
rows of the same name (same code, same thread count). The simulated sets are
made by the README's `calm-rt simulate` commands; the real ones are read from
``../shared/data``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SETS = {  # name: (path, fps for files that lack one, block frames)
    "s83": ("runs/heldout_s83", None, 1000),
    "s57": ("runs/heldout_s57", None, 1000),
    "s31": ("runs/heldout_s31", None, 1000),
    "hindbrain": ("../shared/data/zebrafish_hindbrain", 5.8, 300),
    "suite2p": ("../shared/data/suite2p_hippocampus", 30.0, 1000),
    "legare": ("../shared/data/zebrafish_legare", 1.0, 150),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped one")
    ap.add_argument("--sets", nargs="+", choices=sorted(SETS), default=list(SETS))
    ap.add_argument("--head-steps", type=int, default=2000, help="as calm-rt eval --head-steps")
    ap.add_argument("--json", type=Path, default=None, help="also write the scores here")
    args = ap.parse_args(argv)

    from calm_rt.data import load_corpus
    from calm_rt.data.splits import Protocol, prepare_session
    from calm_rt.model import load_checkpoint
    from calm_rt.offline.baselines import CopyLast, LinearAR, RidgeDecoder
    from calm_rt.offline.evaluate import evaluate

    model, meta = load_checkpoint(args.checkpoint)
    scores = {}
    for name in args.sets:
        path, fps, block = SETS[name]
        if not Path(path).exists():
            print(f"{name}: {path} is missing (see the README's commands)", file=sys.stderr)
            return 1
        t0 = time.perf_counter()
        protocol = Protocol(48, 16, block, stride=16)
        prepared = [prepare_session(s, protocol) for s in load_corpus([Path(path)], fps=fps)]
        result = evaluate(
            model, meta, prepared, protocol, forecasters=[CopyLast(), LinearAR()],
            decoders=[RidgeDecoder()], live=False, head_steps=args.head_steps,
        )  # fmt: skip
        forecast = result["forecast"]
        row = {k: round(v["score"], 4) for k, v in forecast.items() if k != "copy_last"}
        row["calm_mse_h1"] = round(forecast["calm"]["mse_by_horizon"]["1"], 4)
        for key in ("calibration", "calibration_zeroshot"):
            row[f"{key}_68_90"] = [round(result[key][n], 3) for n in ("nominal_68", "nominal_90")]
        for decoder, value in result.get("decoding", {}).items():
            row[f"decoding_{decoder}"] = round(value["r2"], 4)
        row["seconds"] = round(time.perf_counter() - t0)
        scores[name] = row
        print(name, json.dumps(row), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(scores, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
