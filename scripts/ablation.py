"""The ablation table of docs/model.md: what neural-axis attention and pretraining buy.

All variants share the shipped checkpoint's tokenizer (same tokens), so only
the dual-axis transformer differs:

- ``calm``: the shipped checkpoint;
- ``no_neural_attention``: a DAT with temporal attention only, pretrained
  exactly like the shipped one (same corpus, training sessions, steps, seed);
- ``no_pretraining``: a randomly initialised DAT.

Each is scored on the held-out animals zero-shot (``calm_zeroshot``) and with
the closed-form forecast calibration fitted on those sessions' training
blocks (what ``calm-rt eval`` reports as ``calm``), against copy-last. (The
table in docs/model.md was measured with the earlier protocol: 300 next-token
adaptation steps instead of the calibration.)

    python scripts/ablation.py --corpus runs/corpus --heldout runs/heldout \\
        --out docs/results/ablation.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from calm_rt.data import load_corpus
from calm_rt.data.splits import Protocol, prepare_session
from calm_rt.model import CalM, load_checkpoint
from calm_rt.offline.baselines import CopyLast
from calm_rt.offline.evaluate import evaluate
from calm_rt.offline.train import TrainConfig, pretrain_dat


def _with_tokenizer_of(source: CalM, neural_attention: bool, seed: int) -> CalM:
    """A fresh CalM (random DAT) that reuses ``source``'s trained tokenizer."""
    config = replace(
        source.config, dat=replace(source.config.dat, neural_attention=neural_attention)
    )
    torch.manual_seed(seed)
    model = CalM(config)
    model.tokenizer.load_state_dict(source.tokenizer.state_dict())
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--corpus", type=Path, required=True, help="the pretraining corpus (make checkpoint)"
    )
    ap.add_argument("--heldout", type=Path, required=True, help="sessions of held-out animals")
    ap.add_argument("--out", type=Path, default=Path("docs/results/ablation.json"))
    args = ap.parse_args()

    shipped, meta = load_checkpoint(None)
    pre = meta["pretraining"]
    seen = set(pre["data"]["session_ids"])  # exactly the shipped model's training sessions
    train = [prepare_session(s) for s in load_corpus(args.corpus) if s.session_id in seen]
    held = [prepare_session(s) for s in load_corpus(args.heldout)]
    if len(train) != len(seen):
        raise SystemExit(
            f"{args.corpus} lacks some of the checkpoint's {len(seen)} training sessions"
        )

    no_neural = _with_tokenizer_of(
        shipped, neural_attention=False, seed=pre["train_config"]["seed"]
    )
    t0 = time.perf_counter()
    pretrain_dat(no_neural, train, TrainConfig(**pre["train_config"]))
    no_neural_s = time.perf_counter() - t0
    variants = {
        "calm": shipped,
        "no_neural_attention": no_neural,
        "no_pretraining": _with_tokenizer_of(shipped, neural_attention=True, seed=1),
    }
    rows = {}
    for name, model in variants.items():
        result = evaluate(
            model, meta, held, Protocol(), forecasters=[CopyLast()],
            decoders=[], live=False,
        )  # fmt: skip
        rows[name] = {
            "zero_shot_score": result["forecast"]["calm_zeroshot"]["score"],
            "calibrated_score": result["forecast"]["calm"]["score"],
            "calibrated_pearson": result["forecast"]["calm"]["pearson"],
        }
        print(name, json.dumps(rows[name]), flush=True)
    out = {
        "heldout": str(args.heldout),
        "sessions": len(held),
        "no_neural_attention_pretrain_s": no_neural_s,
        "variants": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
