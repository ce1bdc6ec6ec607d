"""``python -m bench``: what latency a rig gets, measured on this machine.

    python -m bench --quick --json bench.json      # under a minute
    python -m bench --out bench-out                # the full run: table, JSON, plots

Every case warms up untimed, then times enough iterations for stable
percentiles. Budgets from DESIGN.md are printed beside the figures as met or
not met; the benchmark reports, it never fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.cases import CASES, BenchConfig, run_cases
from bench.report import markdown_table, write_plots
from bench.timing import environment


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Latency benchmarks of calm-rt: extraction, tokenizer, engine step, "
        "whole-window recompute baseline, kernels (GPU), and end to end over loopback ZeroMQ.",
        epilog="example:\n  python -m bench --quick --json bench.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick", action="store_true", help="a reduced run (under 60 s on 2 CPU cores)"
    )
    ap.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    ap.add_argument(
        "--out", type=Path, default=None, help="folder for bench.json, bench.md and PNG plots"
    )
    ap.add_argument(
        "--cases", nargs="+", choices=sorted(CASES), default=None, help="run only these cases"
    )
    ap.add_argument(
        "--checkpoint", type=Path, default=None, help="model checkpoint (default: shipped)"
    )
    ap.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="auto (cuda when a GPU is usable, default), cpu or cuda",
    )  # fmt: skip
    ap.add_argument(
        "--e2e-neurons", type=int, default=256, help="neurons in the end-to-end case (default 256)"
    )
    ap.add_argument(
        "--e2e-size", type=int, default=512, help="frame size of the end-to-end case (default 512)"
    )
    ap.add_argument(
        "--e2e-seconds", type=float, default=None, help="override each end-to-end run's length"
    )
    ap.add_argument(
        "--neighbour", action="store_true",
        help="also run the 30 Hz end-to-end case beside one CPU-bound process",
    )  # fmt: skip
    args = ap.parse_args(argv)
    from calm_rt.errors import ConfigError
    from calm_rt.live.device import resolve_device

    try:
        device = resolve_device(args.device)
    except ConfigError as exc:  # --device cuda without a GPU: one line, non-zero
        print(f"python -m bench: error: {exc}", file=sys.stderr)
        return 2
    env = environment(device)
    print(
        f"device: {env['device']} | torch {env['torch']} | {'quick' if args.quick else 'full'} run",
        flush=True,
    )
    cfg = BenchConfig(
        quick=args.quick, checkpoint=args.checkpoint, device=env["device_kind"],
        e2e_neurons=args.e2e_neurons, e2e_size=args.e2e_size, e2e_seconds=args.e2e_seconds,
        neighbour=args.neighbour,
    )  # fmt: skip
    cases = run_cases(args.cases, cfg, log=lambda m: print(m, flush=True))
    result = {
        "device": env["device"],
        "torch": env["torch"],
        "quick": args.quick,
        **env["extra"],
        "cases": cases,
    }
    table = markdown_table(result)
    print("\n" + table)
    for path in filter(None, [args.json, args.out and args.out / "bench.json"]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
    if args.out:
        (args.out / "bench.md").write_text(table + "\n")
        for png in write_plots(result, args.out):
            print(f"plot: {png}")
    failed = [r["name"] for r in cases if "error" in r]
    if failed:  # the JSON above still holds every case that ran
        print(
            f"python -m bench: {len(failed)} case(s) failed: {', '.join(failed)}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
