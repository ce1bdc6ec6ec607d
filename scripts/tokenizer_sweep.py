"""Measure tokenizer reconstruction and codebook use for patch length P,
codebook size K and code dimension D; writes the table of docs/model.md.

    python scripts/tokenizer_sweep.py --train runs/corpus --heldout runs/heldout
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from calm_rt.data import load_corpus
from calm_rt.data.splits import prepare_session
from calm_rt.model import PRESETS
from calm_rt.offline.evaluate import tokenizer_report
from calm_rt.offline.train import TrainConfig, pretrain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--out", default="runs/tokenizer_sweep.json")
    ap.add_argument(
        "--grid", default="4:256:16,4:128:16,4:512:16,4:256:8,2:256:16,8:256:16,8:512:16"
    )
    args = ap.parse_args()
    train = [prepare_session(s) for s in load_corpus(args.train)]
    held = [prepare_session(s) for s in load_corpus(args.heldout)]
    rows = []
    for spec in args.grid.split(","):
        p, k, d = (int(x) for x in spec.split(":"))
        base = PRESETS["small"]
        cfg = replace(base, tokenizer=replace(base.tokenizer, patch=p, codebook_size=k, code_dim=d))
        t0 = time.perf_counter()
        model = pretrain(
            train,
            f"runs/tok_sweep/{p}_{k}_{d}",
            cfg,
            TrainConfig(tokenizer_steps=args.steps, dat_steps=0),
            resume=False,
            progress=False,
        )
        report = tokenizer_report(model, held)
        row = {
            "patch": p,
            "codebook_size": k,
            "code_dim": d,
            "train_s": time.perf_counter() - t0,
            **report,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
