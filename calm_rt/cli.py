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
    "pretrain": (
        "pretrain the tokenizer and the dual-axis transformer on a corpus",
        "calm-rt pretrain --data sim/ --out ckpt/",
        "the CalM model issue",
    ),
    "finetune": (
        "fine-tune the behaviour decoding head",
        "calm-rt finetune --data sim/ --checkpoint ckpt/",
        "the CalM model issue",
    ),
    "eval": (
        "evaluate forecasting and decoding against baselines",
        "calm-rt eval --data sim/ --json eval.json",
        "the CalM model issue",
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
