"""The ``calm-rt`` command line (also ``python -m calm_rt``).

Each subcommand is a function ``_cmd_<name>(args) -> int`` registered in
:data:`_COMMANDS` with its parser. Errors that the user can fix are
:class:`~calm_rt.errors.CalmError`: printed as one line, exit status 1.
Features not built yet raise :class:`~calm_rt.errors.NotAvailableError`:
exit status 69 (EX_UNAVAILABLE), so scripts can tell them apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

from calm_rt import __version__
from calm_rt.errors import CalmError, NotAvailableError

EXIT_ERROR = 1
EXIT_UNAVAILABLE = 69

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help_text: str, example: str) -> Callable:
    """Register ``_cmd_<name>`` with its one-line help and a usage example."""

    def wrap(fn: Callable) -> Callable:
        setup = getattr(fn, "_setup", lambda p: None)
        _COMMANDS[name] = (help_text, example, setup, fn)
        return fn

    return wrap


def arguments(setup: Callable[[argparse.ArgumentParser], None]) -> Callable:
    def wrap(fn: Callable) -> Callable:
        fn._setup = setup  # type: ignore[attr-defined]
        return fn

    return wrap


def _not_available(name: str, issue: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        raise NotAvailableError(
            f"`calm-rt {name}` is not available in this version yet ({issue}); "
            "see the README for what works today"
        )

    return handler


# ---------------------------------------------------------------------------
# simulate


def _simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--animals", type=int, default=2, help="number of animals (default 2)")
    p.add_argument("--sessions", type=int, default=2, help="sessions per animal (default 2)")
    p.add_argument("--neurons", type=int, default=120, help="neurons per session (default 120)")
    p.add_argument("--frames", type=int, default=3000, help="frames per session (default 3000)")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate in Hz (default 30)")
    p.add_argument(
        "--indicator",
        default="mixed",
        help="GCaMP6s, GCaMP6f, GCaMP8m, or mixed (cycle over animals; default)",
    )
    p.add_argument("--movie", action="store_true", help="also render uint16 TIFF movies")
    p.add_argument("--movie-size", type=int, default=256, help="movie width = height in px")
    p.add_argument("--motion-px", type=float, default=1.5, help="s.d. of rigid motion in px")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


@command(
    "simulate",
    "simulate a multi-animal corpus of two-photon sessions with ground truth",
    "calm-rt simulate --out sim --animals 2 --sessions 2 --neurons 120 --frames 3000 --fps 30",
)
@arguments(_simulate_args)
def _cmd_simulate(args: argparse.Namespace) -> int:
    from calm_rt.data import SimConfig, simulate_corpus

    config = SimConfig(
        animals=args.animals,
        sessions=args.sessions,
        neurons=args.neurons,
        frames=args.frames,
        fps=args.fps,
        indicator=args.indicator,
        movie=args.movie,
        movie_size=args.movie_size,
        motion_px=args.motion_px,
        seed=args.seed,
    )
    total = config.animals * config.sessions
    done = 0

    def progress(summary: str) -> None:
        nonlocal done
        done += 1
        print(f"[{done}/{total}] {summary}", flush=True)

    paths = simulate_corpus(config, args.out, progress=progress)
    print(f"wrote {len(paths)} sessions and ground truth to {args.out}/ (see simulation.json)")
    return 0


# ---------------------------------------------------------------------------
# info


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="a session file or folder (npz, NWB, suite2p, npy)")
    p.add_argument("--fps", type=float, default=None, help="frame rate for formats that lack one")
    p.add_argument("--json", type=Path, default=None, help="also write the summary as JSON")


@command(
    "info",
    "summarise session files: neurons, frames, rate, behaviour, missing samples",
    "calm-rt info sim/  |  calm-rt info ../shared/data/zebrafish_legare --fps 1",
)
@arguments(_info_args)
def _cmd_info(args: argparse.Namespace) -> int:
    from calm_rt.data import load_corpus

    sessions = load_corpus(args.path, fps=args.fps)
    rows = []
    for s in sessions:
        print(s.summary())
        rows.append(
            {
                "source": s.source,
                "session_id": s.session_id,
                "animal_id": s.animal_id,
                "neurons": s.n_neurons,
                "frames": s.n_frames,
                "fps": s.fps,
                "kind": s.kind,
                "behavior": list(s.behavior_names),
            }
        )
    print(f"{len(sessions)} session(s), {sum(s.n_neurons for s in sessions)} neurons in all")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"sessions": rows}, indent=2))
    return 0


# ---------------------------------------------------------------------------
# pretrain / finetune / eval


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
    from calm_rt.splits import Protocol

    return Protocol(args.context, args.horizon, args.block_frames, stride=args.stride)


def _prepare(paths: list[Path], args: argparse.Namespace) -> list:
    from calm_rt.data import load_corpus
    from calm_rt.splits import prepare_session

    protocol = _protocol(args)
    sessions = load_corpus(paths, fps=args.fps)
    print(f"preparing {len(sessions)} session(s) (dF/F, z-score on training blocks)", flush=True)
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
    p.add_argument("--preset", default="small", help="model shape: small (default) or tiny")
    p.add_argument(
        "--tokenizer-steps", type=int, default=None, help="tokenizer steps (default 2000)"
    )
    p.add_argument("--dat-steps", type=int, default=None, help="transformer steps (default 3000)")
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
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _protocol_args(p)


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
    from calm_rt.train import TrainConfig, init_distributed, pretrain

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
    train_cfg = replace(TrainConfig(), **changes)
    prepared = _prepare(args.data, args)
    train, summary = _split_holdout(prepared, args.holdout_animals, args.holdout_sessions)
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
    p.add_argument(
        "--unfreeze", action="store_true", help="also train the backbone (not available yet)"
    )
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
    from calm_rt.train import FinetuneConfig, finetune_behavior

    model, meta = load_checkpoint(args.checkpoint)
    prepared = [p for p in _prepare(args.data, args) if p.behavior is not None]
    if not prepared:
        raise DataError("none of the sessions has behaviour to fine-tune on")
    names = prepared[0].session.behavior_names
    model = finetune_behavior(
        model, prepared, names, FinetuneConfig(steps=args.steps, unfreeze=args.unfreeze, seed=args.seed),
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
    _protocol_args(p)


@command(
    "eval",
    "score CalM's forecasts and decoding against copy-last, linear AR, a POCO-style model, ridge and GRU",
    "calm-rt eval --data heldout/ --json eval.json",
)
@arguments(_eval_args)
def _cmd_eval(args: argparse.Namespace) -> int:
    from calm_rt.baselines import CopyLast, LinearAR, POCOForecaster
    from calm_rt.evaluate import evaluate
    from calm_rt.model import load_checkpoint

    model, meta = load_checkpoint(args.checkpoint)
    prepared = _prepare(args.data, args)
    result = evaluate(
        model, meta, prepared, _protocol(args),
        forecasters=[CopyLast(), LinearAR(), POCOForecaster(steps=args.poco_steps)],
        progress=lambda msg: print(msg, flush=True),
    )  # fmt: skip
    result["checkpoint"] = str(args.checkpoint or "shipped default")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(
        f"\nforecasting, {result['sessions']} session(s), context {result['context']}, horizon {result['horizon']}:"
    )
    print(f"  {'model':<12}{'score':>8}{'mse':>8}{'mae':>8}{'pearson':>9}")
    for name, m in result["forecast"].items():
        print(f"  {name:<12}{m['score']:>8.3f}{m['mse']:>8.3f}{m['mae']:>8.3f}{m['pearson']:>9.3f}")
    if "decoding" in result:
        print("behaviour decoding (test blocks, mean R2 over variables):")
        for name, m in result["decoding"].items():
            print(f"  {name:<12}{m['r2']:>8.3f}")
    print(f"written to {args.json}")
    return 0


# ---------------------------------------------------------------------------
# Planned commands: their interface exists, the feature does not yet.

_PLANNED = {
    "demo": (
        "run mock scope, server and rig client on loopback and report latency",
        "calm-rt demo --seconds 20 --json demo.json",
        "the ZeroMQ service issue",
    ),
    "serve": (
        "serve predictions for a live microscope over ZeroMQ",
        "calm-rt serve --ingest tcp://127.0.0.1:5555",
        "the ZeroMQ service issue",
    ),
    "mock-scope": (
        "stream a simulated or recorded movie like a microscope",
        "calm-rt mock-scope --fps 30",
        "the ZeroMQ service issue",
    ),
    "listen": (
        "subscribe to a server's predictions and print latency",
        "calm-rt listen --connect tcp://127.0.0.1:5556",
        "the ZeroMQ service issue",
    ),
    "analyze": (
        "linear probes of what the model learned about neurons",
        "calm-rt analyze --data sim/ --out analysis/",
        "the representation analysis issue",
    ),
}


def _planned_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calm-rt",
        description="Run the CalM calcium-imaging foundation model live at the microscope.",
        epilog="Run `calm-rt COMMAND --help` for a command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"calm-rt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, example, setup, handler) in sorted(_COMMANDS.items()):
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=textwrap.dedent(f"example:\n  {example}"),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        setup(p)
        p.set_defaults(handler=handler)
    return parser


for _name, (_help, _example, _issue) in _PLANNED.items():
    if _name not in _COMMANDS:
        _COMMANDS[_name] = (
            f"{_help} [not available yet]",
            _example,
            _planned_args,
            _not_available(_name, _issue),
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except NotAvailableError as exc:
        print(f"calm-rt {args.command}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except CalmError as exc:
        print(f"calm-rt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"calm-rt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
