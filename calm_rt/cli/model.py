"""``calm-rt pretrain``, ``finetune``, ``eval`` and ``analyze``: the offline work."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from calm_rt.cli._registry import arguments, command


def _protocol_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("protocol (POCO defaults)")
    g.add_argument("--context", type=int, default=48, help="context frames (default 48)")
    g.add_argument("--horizon", type=int, default=16, help="forecast frames (default 16)")
    g.add_argument(
        "--block-frames", type=int, default=1000, help="split block length (default 1000)"
    )
    g.add_argument("--stride", type=int, default=16, help="test window stride (default 16)")
    p.add_argument("--fps", type=float, default=None, help="frame rate for formats that lack one")


def _protocol(args: argparse.Namespace):
    from calm_rt.data.splits import Protocol

    return Protocol(args.context, args.horizon, args.block_frames, stride=args.stride)


def _prepare(paths: list[Path], args: argparse.Namespace) -> list:
    from calm_rt.data import load_corpus
    from calm_rt.data.splits import prepare_session

    protocol = _protocol(args)
    sessions = load_corpus(paths, fps=args.fps)
    print(
        f"preparing {len(sessions)} session(s) (the engine's causal dF/F and running z-score)",
        flush=True,
    )
    return [prepare_session(s, protocol) for s in sessions]


def _split_holdout(
    prepared: list, holdout_animals: int, holdout_sessions: int
) -> tuple[list, dict]:
    """Hold out the last animals (sorted ids) and the last sessions of every other animal."""
    animals = sorted({p.session.animal_id for p in prepared})
    held_animals = set(animals[len(animals) - holdout_animals :]) if holdout_animals else set()
    train, held_sessions = [], []
    for animal in animals:
        if animal in held_animals:
            continue
        own = sorted(
            (p for p in prepared if p.session.animal_id == animal),
            key=lambda p: p.session.session_id,
        )
        cut = len(own) - holdout_sessions if holdout_sessions < len(own) else len(own)
        train.extend(own[:cut])
        held_sessions.extend(q.session.session_id for q in own[cut:])
    summary = {
        "animal_ids": sorted({p.session.animal_id for p in train}),
        "session_ids": sorted(p.session.session_id for p in train),
        "heldout_animal_ids": sorted(held_animals),
        "heldout_session_ids": sorted(held_sessions),
        "neurons": int(sum(p.n_neurons for p in train)),
        "frames": int(sum(p.session.n_frames for p in train)),
    }
    return train, summary


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", nargs="+", required=True, type=Path, help="session files or corpus folders"
    )
    p.add_argument(
        "--out", required=True, type=Path, help="checkpoint folder (resumed if it exists)"
    )
    p.add_argument(
        "--preset",
        default="small",
        help="model shape: small (default), tiny, or small-tokens (no continuous path: ablation)",
    )
    p.add_argument(
        "--tokenizer-steps", type=int, default=None, help="tokenizer steps (default 2000)"
    )
    p.add_argument("--dat-steps", type=int, default=None, help="transformer steps (default 3000)")
    p.add_argument(
        "--subset-neurons",
        nargs=2,
        type=int,
        default=None,
        metavar=("MIN", "MAX"),
        help="each transformer batch attends over a random neuron subset of a log-uniform size "
        "in [MIN, MAX] (default: 64 each time, the shipped recipe)",
    )
    p.add_argument(
        "--sequence-budget",
        type=int,
        default=None,
        metavar="S",
        help="with --subset-neurons: windows x neurons per transformer batch stay near S, so a "
        "batch of S neurons is one window (default: 8 windows whatever the size)",
    )
    p.add_argument(
        "--holdout-animals", type=int, default=0, help="keep the last A animals out of training"
    )
    p.add_argument(
        "--holdout-sessions",
        type=int,
        default=0,
        help="keep the last S sessions of each animal out",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a run")
    p.add_argument(
        "--no-neural-attention", action="store_true", help="ablation: temporal attention only"
    )
    p.add_argument(
        "--recording",
        nargs=3,
        action="append",
        default=[],
        metavar=("PATH", "FPS", "BLOCK_FRAMES"),
        help="a real recording to mix in, split with its own frame rate and block length (the "
        "ones `calm-rt eval` scores it with), so that only its training blocks are trained on; "
        "repeat for several",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _protocol_args(p)


def _prepare_recordings(specs: list[list[str]], args: argparse.Namespace) -> tuple[list, list]:
    """``--recording PATH FPS BLOCK_FRAMES`` entries, each split by its own block length."""
    from dataclasses import replace

    from calm_rt.data import load_corpus
    from calm_rt.data.splits import TRAIN, prepare_session
    from calm_rt.errors import ConfigError

    prepared, summary = [], []
    for path, fps_text, block_text in specs:
        try:
            fps, block = float(fps_text), int(block_text)
        except ValueError:
            raise ConfigError(
                f"--recording {path} {fps_text} {block_text}: FPS must be a number and "
                "BLOCK_FRAMES an integer, e.g. --recording ../shared/data/zebrafish_hindbrain 5.8 300"
            ) from None
        protocol = replace(_protocol(args), block_frames=block)
        for session in load_corpus([Path(path)], fps=fps):
            p = prepare_session(session, protocol)
            prepared.append(p)
            summary.append(
                {
                    "session_id": session.session_id,
                    "path": str(path),
                    "fps": fps,
                    "block_frames": block,
                    "train_frames": int((p.labels == TRAIN).sum()),
                }
            )
    return prepared, summary


@command(
    "pretrain",
    "pretrain the NQ tokenizer, then the dual-axis transformer, on a corpus",
    "calm-rt pretrain --data sim/ --out ckpt/ --holdout-sessions 1\n"
    "  torchrun --nproc_per_node 2 -m calm_rt pretrain --data sim/ --out ckpt/   # data-parallel",
)
@arguments(_pretrain_args)
def _cmd_pretrain(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from calm_rt.errors import ConfigError
    from calm_rt.model import PRESETS
    from calm_rt.offline.train import TrainConfig, init_distributed, pretrain

    rank, world = init_distributed()
    if args.preset not in PRESETS:
        raise ConfigError(f"unknown --preset {args.preset!r}; choose one of {sorted(PRESETS)}")
    model_cfg = PRESETS[args.preset]
    if args.no_neural_attention:
        model_cfg = replace(model_cfg, dat=replace(model_cfg.dat, neural_attention=False))
    changes = {"seed": args.seed}
    if args.tokenizer_steps is not None:
        changes["tokenizer_steps"] = args.tokenizer_steps
    if args.dat_steps is not None:
        changes["dat_steps"] = args.dat_steps
    if args.subset_neurons is not None:
        changes["min_neurons"], changes["max_neurons"] = args.subset_neurons
    if args.sequence_budget is not None:
        changes["sequence_budget"] = args.sequence_budget
    train_cfg = replace(TrainConfig(), **changes)
    prepared = _prepare(args.data, args)
    train, summary = _split_holdout(prepared, args.holdout_animals, args.holdout_sessions)
    if args.recording:  # never held out whole: their own validation and test blocks stay out
        recordings, summary["recordings"] = _prepare_recordings(args.recording, args)
        train = train + recordings
        summary["session_ids"] = sorted(
            [*summary["session_ids"], *(r["session_id"] for r in summary["recordings"])]
        )
    if rank == 0:
        print(
            f"pretraining on {len(train)} session(s) of {len(summary['animal_ids'])} animal(s), "
            f"{summary['neurons']} neurons; held out: {len(summary['heldout_animal_ids'])} animal(s), "
            f"{len(summary['heldout_session_ids'])} session(s); {world} process(es)",
            flush=True,
        )
    pretrain(
        train, args.out, model_cfg, train_cfg, resume=not args.no_resume,
        progress=not args.quiet, data_summary=summary,
    )  # fmt: skip
    if rank == 0:
        print(f"checkpoint written to {args.out}/ (config.json, model.safetensors)")
    return 0


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", required=True, type=Path, help="sessions with behaviour")
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="pretrained checkpoint (default: shipped)"
    )
    p.add_argument(
        "--out", required=True, type=Path, help="where to write the fine-tuned checkpoint"
    )
    p.add_argument("--steps", type=int, default=600, help="optimisation steps (default 600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _protocol_args(p)


@command(
    "finetune",
    "fit the behaviour decoding head (attention pooling + MLP) on sessions with behaviour",
    "calm-rt finetune --data sim/ --checkpoint ckpt/ --out ckpt-behaviour/",
)
@arguments(_finetune_args)
def _cmd_finetune(args: argparse.Namespace) -> int:
    from calm_rt.errors import DataError
    from calm_rt.model import load_checkpoint, save_checkpoint
    from calm_rt.offline.finetune import FinetuneConfig, finetune_behavior

    model, meta = load_checkpoint(args.checkpoint)
    prepared = [p for p in _prepare(args.data, args) if p.behavior is not None]
    if not prepared:
        raise DataError("none of the sessions has behaviour to fine-tune on")
    names = prepared[0].session.behavior_names
    model = finetune_behavior(
        model, prepared, names, FinetuneConfig(steps=args.steps, seed=args.seed),
        progress=not args.quiet,
    )  # fmt: skip
    extra = {k: v for k, v in meta.items() if k not in ("format", "version", "config")}
    extra["finetune"] = {"sessions": [p.session.session_id for p in prepared], "steps": args.steps}
    save_checkpoint(model, args.out, extra=extra)
    print(f"fine-tuned checkpoint with a head for {list(names)} written to {args.out}/")
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", nargs="+", required=True, type=Path, help="session files or corpus folders"
    )
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint folder (default: shipped)"
    )
    p.add_argument("--json", type=Path, required=True, help="where to write the results")
    p.add_argument(
        "--poco-steps", type=int, default=1500, help="training steps of the POCO-style baseline"
    )
    p.add_argument(
        "--poco-runs", type=int, default=3,
        help="POCO-style models trained from seeds 0..R-1; its row is their mean score (default 3)",
    )  # fmt: skip
    p.add_argument(
        "--head-steps", type=int, default=2000,
        help="training steps of the calibration's continuous head (0: the ridge alone; default 2000)",
    )  # fmt: skip
    p.add_argument(
        "--no-live", action="store_true",
        help="skip the calm_live row (replaying every session through the streaming engine)",
    )  # fmt: skip
    _device_arg(p)
    _protocol_args(p)


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="where the model runs: auto (a CUDA GPU when torch sees one, default), cpu or cuda",
    )  # fmt: skip


@command(
    "eval",
    "score CalM's forecasts and decoding against copy-last, linear AR, a POCO-style model, ridge and GRU",
    "calm-rt eval --data heldout/ --json eval.json",
)
@arguments(_eval_args)
def _cmd_eval(args: argparse.Namespace) -> int:
    from calm_rt.errors import ConfigError
    from calm_rt.model import load_checkpoint
    from calm_rt.offline.baselines import CopyLast, LinearAR, POCOForecaster
    from calm_rt.offline.evaluate import evaluate

    if args.head_steps < 0:
        raise ConfigError(f"--head-steps must be >= 0 (0: the ridge alone), got {args.head_steps}")
    device = _eval_device(args.device)
    model, meta = load_checkpoint(args.checkpoint)
    prepared = _prepare(args.data, args)
    result = evaluate(
        model, meta, prepared, _protocol(args),
        forecasters=[CopyLast(), LinearAR(), POCOForecaster(steps=args.poco_steps, runs=args.poco_runs)],
        progress=lambda msg: print(msg, flush=True),
        live=not args.no_live,
        head_steps=args.head_steps,
    )  # fmt: skip
    result["checkpoint"] = str(args.checkpoint or "shipped default")
    result["device"] = device
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(
        f"\nforecasting, {result['sessions']} session(s), context {result['context']}, horizon {result['horizon']}:"
    )
    print(f"  {'model':<14}{'score':>8}{'mse':>8}{'mae':>8}{'pearson':>9}   mse at h = 1/4/8/16")
    for name, m in result["forecast"].items():
        by_h = "/".join(f"{v:.3f}" for v in m["mse_by_horizon"].values())
        spread = (
            f"   ({m['runs']:.0f} runs: {m['score_min']:.3f} .. {m['score_max']:.3f})"
            if "runs" in m
            else ""
        )
        print(
            f"  {name:<14}{m['score']:>8.3f}{m['mse']:>8.3f}{m['mae']:>8.3f}{m['pearson']:>9.3f}   {by_h}{spread}"
        )
    cal = result["calibration"]
    print(
        f"calm intervals: {cal['nominal_68']:.1%} inside +-1 s.d. (nominal 68.3%), "
        f"{cal['nominal_90']:.1%} inside +-1.645 s.d. (nominal 90%)"
    )
    if "live_max_abs_diff" in result:
        print(f"calm_live vs calm: max |difference| {result['live_max_abs_diff']:.2e}")
    if "decoding" in result:
        print("behaviour decoding (test blocks, mean R2 over variables):")
        for name, m in result["decoding"].items():
            print(f"  {name:<12}{m['r2']:>8.3f}")
    print(f"written to {args.json}")
    return 0


def _eval_device(spec: str) -> str:
    """The device ``eval`` runs on: the CPU for now (``--device cuda`` is refused clearly).

    The evaluation moves host batches straight into the model, so it runs
    where they are; ``auto`` therefore means the CPU here until it moves
    them (issue 17).
    """
    from calm_rt.errors import NotAvailableError
    from calm_rt.live.device import resolve_device

    device = resolve_device("cpu" if spec == "auto" else spec)  # no GPU: ConfigError
    if device != "cpu":
        raise NotAvailableError(
            "eval on CUDA is not supported yet (the evaluation feeds host batches to the model); "
            "run with --device cpu, or use `calm-rt replay --device cuda` for the live engine"
        )
    return device


def _replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("session", type=Path, help="a session file (npz, NWB, ...)")
    p.add_argument("--out", type=Path, required=True, help="the replayed session file (npz)")
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint folder (default: shipped)"
    )
    p.add_argument("--fps", type=float, default=None, help="frame rate for formats that lack one")
    p.add_argument(
        "--horizon", type=int, default=None, help="frames to forecast (default: the model's)"
    )
    p.add_argument("--realtime", action="store_true", help="pace frames at the session's rate")
    _device_arg(p)


@command(
    "replay",
    "run a recorded session through the streaming engine, frame by frame, and save its outputs",
    "calm-rt replay session.npz --out replayed.npz --device cuda",
)
@arguments(_replay_args)
def _cmd_replay(args: argparse.Namespace) -> int:
    import numpy as np

    from calm_rt.data import load_session
    from calm_rt.live.device import resolve_device
    from calm_rt.model import load_checkpoint
    from calm_rt.offline import replay_session

    device = resolve_device(args.device)  # --device cuda without a GPU: one line, exit 1
    model, _ = load_checkpoint(args.checkpoint)
    session = load_session(args.session, fps=args.fps)
    result = replay_session(
        session, model, out=args.out, realtime=args.realtime, horizon=args.horizon, device=device,
        progress=lambda i, t: print(f"  {i}/{t} frames", flush=True),
    )  # fmt: skip
    step = result["step_ms"]
    print(
        f"replayed {session.n_frames} frames of {session.n_neurons} neurons on {device}: "
        f"step p50 {np.percentile(step, 50):.3f} ms, p99 {np.percentile(step, 99):.3f} ms; "
        f"written to {args.out}"
    )
    return 0


def _analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", nargs="+", required=True, type=Path, help="session files or corpus folders"
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (JSON and figures)")
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint folder (default: shipped)"
    )
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument(
        "--permutations", type=int, default=2000, help="Mantel test permutations (default 2000)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of folds and permutations")
    _protocol_args(p)


@command(
    "analyze",
    "linear probes of what the model learned about neurons, populations and brain regions",
    "calm-rt analyze --data heldout/ --out analysis/\n"
    "  calm-rt analyze --data ../shared/data/zebrafish_legare --fps 1 --block-frames 100 --out fish/",
)
@arguments(_analyze_args)
def _cmd_analyze(args: argparse.Namespace) -> int:
    from calm_rt.errors import ConfigError
    from calm_rt.model import load_checkpoint
    from calm_rt.offline.analysis import AnalysisConfig, run_analysis

    if args.folds < 2 or args.permutations < 1:
        raise ConfigError("--folds must be >= 2 and --permutations >= 1")
    model, _ = load_checkpoint(args.checkpoint)
    prepared = _prepare(args.data, args)
    config = AnalysisConfig(folds=args.folds, permutations=args.permutations, seed=args.seed)
    meta = {
        "checkpoint": str(args.checkpoint or "shipped default"),
        "data": [str(d) for d in args.data],
        "block_frames": args.block_frames,
    }
    result = run_analysis(
        model, prepared, args.out, config, progress=lambda m: print(m, flush=True), meta=meta
    )
    print(
        f"\n{'probe':<24}{'split':<16}{'metric':<10}{'model':>7}{'base':>7}{'both':>7}{'chance':>8}"
    )
    for r in result["probes"]:
        split = r["split"].split(" ")[0]
        print(
            f"{r['name']:<24}{split:<16}{r['metric']:<10}{r['model']:>7.3f}{r['baseline']:>7.3f}"
            f"{r['combined']:>7.3f}{r['chance']:>8.3f}"
        )
    for s in result["skipped"]:
        print(f"skipped {s['probe']}: {s['reason']}")
    if "anatomy" in result:
        a = result["anatomy"]
        for key in ("representation_vs_anatomy", "raw_vs_anatomy", "representation_vs_raw"):
            m = a[key]
            print(f"Mantel {key}: Spearman {m['spearman']:.3f}, p = {m['p']:.4f}")
    print(f"written to {args.out}/ ({', '.join(['analysis.json', *result['figures']])})")
    return 0
