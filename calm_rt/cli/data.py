"""``calm-rt simulate``, ``calm-rt info`` and ``calm-rt export``: corpora and session files."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from calm_rt.cli._registry import arguments, command


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
    p.add_argument(
        "--varied",
        action="store_true",
        help="each animal draws its own frame rate (1-30 Hz), neuron count (50 to --neurons), "
        "indicator, latent dynamics (rnn, oscillator, switching, assemblies), time constants, "
        "firing rates, photons and neuropil (--fps and --indicator are then ignored): a "
        "pretraining corpus that transfers",
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
        varied=args.varied,
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
# export

# Metadata flags: --subject-id sets "subject_id" and so on; they override --metadata FILE.
_META_FLAGS = (
    "subject_id", "species", "sex", "age", "session_description", "session_start_time",
    "experimenter", "institution", "lab", "indicator", "location",
)  # fmt: skip


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recording", type=Path, help="a recording the server wrote (.h5)")
    p.add_argument("out", type=Path, help="the file to write")
    p.add_argument("--nwb", action="store_true", help="write NWB (the one format so far)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--metadata", type=Path, default=None,
        help="JSON or TOML file of metadata keys (see docs/data.md); flags override it",
    )  # fmt: skip
    for key in _META_FLAGS:  # their meanings: docs/data.md (not imported here: keeps --help fast)
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, default=None, metavar="TEXT",
                       help=f"metadata {key!r}")  # fmt: skip


@command(
    "export",
    "export a live recording to NWB (traces, ROIs, behaviour, forecasts, trigger events)",
    "calm-rt export --nwb rec.h5 rec.nwb --subject-id m12 --species 'Mus musculus' --age P90D",
)
@arguments(_export_args)
def _cmd_export(args: argparse.Namespace) -> int:
    from calm_rt.errors import ConfigError
    from calm_rt.serve.nwb_export import export_nwb, read_metadata

    if not args.nwb:
        raise ConfigError("say which format to write: --nwb (the only one so far)")
    meta = read_metadata(args.metadata) if args.metadata else {}
    meta.update({k: getattr(args, k) for k in _META_FLAGS if getattr(args, k) is not None})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        out, notes = export_nwb(args.recording, args.out, meta, overwrite=args.overwrite)
    for w in caught:
        if issubclass(w.category, RuntimeWarning):
            print(f"calm-rt export: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    for note in notes:
        if not note.startswith("truncated:"):  # said above as a warning
            print(f"note: {note}")
    print(f"wrote {out}")
    return 0
