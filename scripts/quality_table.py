"""Print the README's model-quality tables from `calm-rt eval` JSON files.

    python scripts/quality_table.py docs/results/eval_heldout_animals.json \
        docs/results/eval_zebrafish_hindbrain.json ...

Each file is one column: forecasting score (1 - MSE/MSE(copy last)) per
model, MSE at h = 1 and 16 (for a baseline trained several times, the range
of its runs' scores), interval coverage of `calm` and `calm_zeroshot` per
horizon (where the files have it), and
behaviour decoding R2 where the data has behaviour.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MODELS = (
    "calm", "calm_live", "calm_zeroshot", "calm_tokens", "linear_ar", "poco_mlp", "copy_last",
)  # fmt: skip
DECODERS = ("calm_ridge", "ridge", "gru")


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__)
        return 2
    results = {Path(p).stem.removeprefix("eval_"): json.loads(Path(p).read_text()) for p in paths}
    names = list(results)
    print("| forecasting score (MSE at h=1 / h=16) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for m in MODELS:
        cells = []
        for r in results.values():
            f = r["forecast"].get(m)
            if f is None:
                cells.append("-")
                continue
            by_h = f.get("mse_by_horizon", {})
            runs = (
                f", {f['runs']:.0f} runs {f['score_min']:.3f} .. {f['score_max']:.3f}"
                if "runs" in f
                else ""
            )
            cells.append(f"{f['score']:.3f} ({by_h.get('1', float('nan')):.3f} / "
                         f"{by_h.get('16', float('nan')):.3f}{runs})")  # fmt: skip
        print(f"| `{m}` | " + " | ".join(cells) + " |")
    for key, who in (("calibration", "calm"), ("calibration_zeroshot", "calm_zeroshot")):
        if all(key in r for r in results.values()):
            _coverage_table(results, key, who)
    with_dec = {n: r for n, r in results.items() if "decoding" in r}
    if with_dec:
        print()
        print("| decoding R2 (test blocks) | " + " | ".join(with_dec) + " |")
        print("|---|" + "---|" * len(with_dec))
        for d in DECODERS:
            cells = [
                f"{r['decoding'][d]['r2']:.3f}" if d in r["decoding"] else "-"
                for r in with_dec.values()
            ]
            print(f"| `{d}` | " + " | ".join(cells) + " |")
    return 0


def _coverage_table(results: dict[str, dict], key: str, who: str) -> None:
    names = list(results)
    print()
    print(
        f"| `{who}` interval coverage, +-1 s.d. / +-1.645 s.d. (s.d./RMSE) | "
        + " | ".join(names)
        + " |"
    )
    print("|---|" + "---|" * len(names))
    for h in next(iter(results.values()))[key]["by_horizon"]:
        cells = []
        for r in results.values():
            c = r[key]["by_horizon"].get(h)
            cells.append(
                "-" if c is None
                else f"{c['nominal_68']:.1%} / {c['nominal_90']:.1%} ({c['sd_over_rmse']:.2f})"
            )  # fmt: skip
        print(f"| h = {h} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
