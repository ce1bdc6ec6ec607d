"""The benchmark's datasheet: a markdown table with DESIGN.md's budgets, and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# (case, condition on the row, budget text, check)
BUDGETS = [
    ("e2e", lambda r, cpu: cpu and r.get("fps") == 30.0 and r.get("neurons") == 256,
     "CPU, 256 neurons, 30 Hz: p99 < 25 ms, 0 dropped",
     lambda r: r["p99_ms"] is not None and r["p99_ms"] < 25.0 and r["dropped"] == 0),
    ("e2e", lambda r, cpu: not cpu and r.get("neurons") == 1024,
     "GPU, 1024 neurons: p99 < 2 ms", lambda r: r["p99_ms"] is not None and r["p99_ms"] < 2.0),
    ("engine step", lambda r, cpu: not cpu and r.get("neurons") == 1024,
     "GPU, 1024 neurons: step p99 < 2 ms", lambda r: r["p99_ms"] < 2.0),
    ("extract", lambda r, cpu: r.get("frame") == 512 and r.get("rois") == 500,
     "512x512, 500 ROIs: p50 <= 5 ms", lambda r: r["p50_ms"] <= 5.0),
]  # fmt: skip


def _budget(row: dict[str, Any], cpu: bool) -> str:
    for case, applies, text, ok in BUDGETS:
        if row.get("case") == case and applies(row, cpu):
            return f"{'met' if ok(row) else 'NOT met'} ({text})"
    return ""


def _fmt(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    return f"{v:.3f}" if isinstance(v, (int, float)) else ""


def markdown_table(result: dict[str, Any]) -> str:
    cpu = result["device"].startswith("cpu")
    lines = [
        f"Device: {result['device']}; torch {result['torch']}; {'quick' if result.get('quick') else 'full'} run.",
        "",
        "| case | p50 ms | p90 ms | p99 ms | max ms | notes | budget |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["cases"]:
        if "skipped" in r:
            lines.append(f"| {r['name']} | | | | | skipped: {r['skipped']} | |")
            continue
        notes = []
        if r.get("case") == "e2e":
            notes.append(f"{r['predictions']}/{r['frames']} answered, {r['dropped']} dropped")
            notes.append(f"server p99 {r['server_p99_ms']:.2f} ms")
        if "dat_p50_ms" in r:
            notes.append(f"DAT p50 {r['dat_p50_ms']:.3f} ms")
        if "compile_s" in r:
            notes.append(
                f"{r['p50_vs_eager']:.2f}x the eager p50; compiled in {r['compile_s']:.1f} s"
            )

        lines.append(
            f"| {r['name']} | {_fmt(r, 'p50_ms')} | {_fmt(r, 'p90_ms')} | {_fmt(r, 'p99_ms')} | {_fmt(r, 'max_ms')} | "
            f"{'; '.join(notes)} | {_budget(r, cpu)} |"
        )
    return "\n".join(lines + breakdown_table(result))


ENGINE_STAGES = ("preprocess", "tokenize", "dat", "heads")


def _compute_p50(result: dict[str, Any], neurons: int) -> float | None:
    """Extraction + engine step p50 (ms) from the isolated cases of this run, as served."""
    rows = result["cases"]
    step = next((r for r in rows if r.get("case") == "engine step" and r.get("server_threads")
                 and r.get("neurons") == neurons), None)  # fmt: skip
    extract = next((r for r in rows if r.get("case") == "extract" and r.get("frame") == 512
                    and r.get("rois") == 256), None)  # fmt: skip
    if step is None or extract is None:
        return None
    return extract["p50_ms"] + step["p50_ms"]


def breakdown_table(result: dict[str, Any]) -> list[str]:
    """Where each end-to-end run's time went: the server's stages (p50 / p99 ms)."""
    from calm_rt.serve.stages import STAGES

    rows = [r for r in result["cases"] if r.get("case") == "e2e" and r.get("stages_ms")]
    if not rows:
        return []
    lines = [
        "",
        "Where a frame's time goes in the server, p50 / p99 ms (`record` runs after the "
        "hand-off and delays only the next frame). *compute*: extract + engine stages p50 "
        "in the server; *isolated*: the extract and served-thread engine-step cases of this run.",
        "",
        "| run | " + " | ".join(STAGES) + " | server | rig e2e | e2e p50 / compute p50 "
        "| e2e p50 / isolated p50 |",
        "|---|" + "---|" * (len(STAGES) + 4),
    ]
    for r in rows:
        st = r["stages_ms"]
        cells = [f"{st[s]['p50']:.2f} / {st[s]['p99']:.2f}" if s in st else "" for s in STAGES]
        compute = sum(st[s]["p50"] for s in ("extract", *ENGINE_STAGES) if s in st)
        isolated = _compute_p50(result, r["neurons"]) if r["neurons"] == 256 else None
        lines.append(
            f"| {r['name']} | " + " | ".join(cells)
            + f" | {r['server_p50_ms']:.2f} / {r['server_p99_ms']:.2f}"
            + f" | {_fmt(r, 'p50_ms')} / {_fmt(r, 'p99_ms')}"
            + (f" | {r['p50_ms'] / compute:.2f}x" if compute and r["p50_ms"] else " | ")
            + (f" | {r['p50_ms'] / isolated:.2f}x |" if isolated and r["p50_ms"] else " | |")
        )  # fmt: skip
    return lines


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """Latency against neuron count, and the end-to-end latency histogram."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional (the plots extra)
        return []
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for case in ("engine step", "tokenizer", "recompute"):
        rows = sorted(
            (r for r in result["cases"] if r.get("case") == case and "neurons" in r),
            key=lambda r: r["neurons"],
        )
        if rows:
            ax.plot(
                [r["neurons"] for r in rows], [r["p50_ms"] for r in rows], "o-", label=f"{case} p50"
            )
            ax.fill_between(
                [r["neurons"] for r in rows],
                [r["p50_ms"] for r in rows],
                [r["p99_ms"] for r in rows],
                alpha=0.2,
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("neurons")
    ax.set_ylabel("latency per frame (ms), band to p99")
    ax.set_title(result["device"][:60], fontsize=8)
    ax.legend()
    fig.tight_layout()
    paths.append(out / "latency_vs_neurons.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    e2e = [r for r in result["cases"] if r.get("case") == "e2e" and r.get("samples_ms")]
    if e2e:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in e2e:
            ax.hist(
                r["samples_ms"],
                bins=60,
                histtype="step",
                label=f"{r['fps']:g} Hz ({r['frames']} frames)",
            )
        ax.axvline(25.0, color="k", ls="--", lw=0.8, label="CPU budget p99 25 ms")
        ax.set_xlabel("frame-in to prediction-out at the rig (ms)")
        ax.set_ylabel("frames")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "e2e_latency_hist.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
