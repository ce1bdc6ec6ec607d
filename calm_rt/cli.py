"""The ``calm-rt`` command line (also ``python -m calm_rt``).

Each subcommand is a function ``_cmd_<name>(args) -> int`` registered in
:data:`_COMMANDS` with its parser. Errors that the user can fix are
:class:`~calm_rt.errors.CalmError`: printed as one line, exit status 1.
A feature missing on this install (the GUI without napari, say) raises
:class:`~calm_rt.errors.NotAvailableError`: exit status 69 (EX_UNAVAILABLE),
so scripts can tell it apart.
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
    p.add_argument(
        "--adapt-steps", type=int, default=300,
        help="first fine-tune CalM on the training blocks the baselines use (0: zero-shot only)",
    )  # fmt: skip
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
        adapt_steps=args.adapt_steps,
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
# serve / mock-scope / listen / keys / demo


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ingest",
        default="tcp://127.0.0.1:5555",
        help="the scope's endpoint (default tcp://127.0.0.1:5555)",
    )
    p.add_argument("--ingest-mode", choices=("sub", "pull"), default="sub",
                   help="sub: connect to the scope's PUB (default); pull: bind and let the scope PUSH")  # fmt: skip
    p.add_argument("--publish", default="tcp://127.0.0.1:5556", help="where rigs subscribe (bound)")
    p.add_argument("--control", default="tcp://127.0.0.1:5557", help="JSON control socket (bound)")
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="model checkpoint (default: shipped)"
    )
    p.add_argument(
        "--fps", type=float, default=30.0, help="the scope's frame rate in Hz (default 30)"
    )
    p.add_argument(
        "--kind", choices=("F", "dff"), default="F", help="what traces hold (default raw F)"
    )
    p.add_argument(
        "--horizon", type=int, default=None, help="frames to forecast (default: the model's)"
    )
    p.add_argument(
        "--rois", type=Path, default=None, help="npz with footprints [R,H,W] or labels [H,W]"
    )
    p.add_argument(
        "--record", type=Path, default=None, help="record inputs and outputs to this HDF5 file"
    )
    p.add_argument(
        "--triggers", type=Path, default=None, help="JSON file of closed-loop trigger rules"
    )
    p.add_argument("--keys", type=Path, default=None, help="CURVE key folder (from `calm-rt keys`)")
    p.add_argument(
        "--max-lag-ms", type=float, default=500.0,
        help="when a frame has waited this long, jump to the newest (default 500)",
    )  # fmt: skip
    _threads_arg(p)
    p.add_argument(
        "--seconds", type=float, default=None, help="stop after this long (default: until stopped)"
    )


def _threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch threads for the model (default: all cores but one, kept for I/O and the rig)",
    )  # fmt: skip


@command(
    "serve",
    "serve forecasts and decoded behaviour for a live microscope over ZeroMQ",
    "calm-rt serve --ingest tcp://127.0.0.1:5555 --rois rois.npz --record session.h5",
)
@arguments(_serve_args)
def _cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from calm_rt.security import CurveKeys
    from calm_rt.service import Server, ServiceConfig
    from calm_rt.triggers import load_rules

    rules = tuple(r.to_dict() for r in load_rules(args.triggers)) if args.triggers else ()
    config = ServiceConfig(
        ingest=args.ingest, ingest_mode=args.ingest_mode, publish=args.publish, control=args.control,
        checkpoint=args.checkpoint, fps=args.fps, kind=args.kind, horizon=args.horizon, rois=args.rois,
        record=args.record, triggers=rules, keys=CurveKeys.from_folder(args.keys) if args.keys else None,
        torch_threads=args.threads, max_lag_ms=args.max_lag_ms,
    )  # fmt: skip
    server = Server(config).start()
    stop = lambda signum, frame: server.stop(f"signal {signum}")  # noqa: E731
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(
        f"serving: ingest {args.ingest} ({args.ingest_mode}), publish {args.publish}, control {args.control}",
        flush=True,
    )
    try:
        server.wait(args.seconds)
    finally:
        server.stop("done" if args.seconds else "stopped")
    status = server.status()
    print(json.dumps({"stopped": server.stop_reason, **status}), flush=True)
    return 0


def _mockscope_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint", default="tcp://127.0.0.1:5555", help="bind (pub) or connect (push) here"
    )
    p.add_argument(
        "--mode",
        choices=("pub", "push"),
        default="pub",
        help="PUB like ScanImage (default) or PUSH",
    )
    p.add_argument(
        "--source",
        type=Path,
        default=None,
        help="TIFF/HDF5/npy movie or a session file; default: simulate",
    )
    p.add_argument(
        "--fps", type=float, default=None, help="frame rate (default: the source's, else 30)"
    )
    p.add_argument(
        "--frames", type=int, default=None, help="frames to send (default: the whole source)"
    )
    p.add_argument("--loop", action="store_true", help="loop the source")
    p.add_argument("--neurons", type=int, default=256, help="simulated neurons (default 256)")
    p.add_argument(
        "--size", type=int, default=512, help="simulated frame size in pixels (default 512)"
    )
    p.add_argument(
        "--sim-frames", type=int, default=300, help="simulated movie length (default 300, looped)"
    )
    p.add_argument(
        "--rois-out", type=Path, default=None, help="write the simulated footprints here (npz)"
    )
    p.add_argument(
        "--wait-s", type=float, default=30.0, help="wait this long for a subscriber (pub)"
    )
    p.add_argument(
        "--drop", type=int, nargs="*", default=(), help="sequence numbers to drop (rehearse loss)"
    )
    p.add_argument("--json", type=Path, default=None, help="write what was sent as JSON")


@command(
    "mock-scope",
    "stream a simulated or recorded movie (or session traces) like a microscope",
    "calm-rt mock-scope --fps 30 --frames 900 --rois-out rois.npz",
)
@arguments(_mockscope_args)
def _cmd_mockscope(args: argparse.Namespace) -> int:
    import numpy as np

    from calm_rt.errors import ConfigError
    from calm_rt.mockscope import FrameSource, MockScope, simulated_movie

    if args.source is not None:
        source = FrameSource.from_file(args.source)
    else:
        print(
            f"rendering a simulated {args.size}x{args.size} movie of {args.neurons} neurons...",
            flush=True,
        )
        source = simulated_movie(args.neurons, args.size, args.sim_frames, args.fps or 30.0)
        if args.rois_out:
            args.rois_out.parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.rois_out, footprints=source.footprints)
    fps = args.fps or source.fps or 30.0
    scope = MockScope(args.endpoint, args.mode)
    try:
        if not scope.wait_for_subscriber(args.wait_s):
            raise ConfigError(f"no subscriber connected to {args.endpoint} within {args.wait_s} s")
        frames = (
            args.frames if args.frames is not None else (None if args.loop else source.n_frames)
        )
        print(f"streaming {source.kind} at {fps:g} Hz on {args.endpoint}", flush=True)
        stats = scope.stream(
            source, fps, frames, loop=args.loop or args.source is None, drop=set(args.drop)
        )
    finally:
        scope.close()
    print(json.dumps(stats), flush=True)
    if args.json:
        args.json.write_text(json.dumps(stats))
    return 0


def _listen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--connect", default="tcp://127.0.0.1:5556", help="the server's publish endpoint"
    )
    p.add_argument("--topics", nargs="+", default=["forecast", "behavior", "trigger", "status"])
    p.add_argument(
        "--seconds", type=float, default=None, help="listen this long (default: until Ctrl-C)"
    )
    p.add_argument("--frames", type=int, default=None, help="stop after this many forecasts")
    p.add_argument("--quiet", action="store_true", help="no line per message")
    p.add_argument("--json", type=Path, default=None, help="write latency statistics as JSON")
    p.add_argument(
        "--keys", type=Path, default=None, help="CURVE key folder (client.key_secret, server.key)"
    )


@command(
    "listen",
    "subscribe to a server's forecasts, behaviour, triggers and status; report latency",
    "calm-rt listen --connect tcp://127.0.0.1:5556 --seconds 10 --json latency.json",
)
@arguments(_listen_args)
def _cmd_listen(args: argparse.Namespace) -> int:
    from calm_rt.client import RigClient

    def show(msg) -> None:
        h = msg.header
        if msg.topic == "forecast":
            f = msg.arrays["forecast"]
            print(
                f"forecast seq {h['seq']}: {f.shape[0]} neurons x {f.shape[1]} frames, mean {f.mean():+.3f}"
            )
        elif msg.topic == "behavior":
            vals = ", ".join(
                f"{n}={v:.3g}" for n, v in zip(h.get("names", []), msg.arrays["behavior"])
            )
            print(f"behavior seq {h['seq']}: {vals}")
        elif msg.topic == "trigger":
            print(f"TRIGGER {h['rule']} at seq {h['seq']}: {h['value']:.3f} > {h['threshold']}")
        else:
            print(
                f"status: {h.get('answered')} answered, p99 {h.get('latency_p99_ms')} ms, rejected {h.get('rejected')}"
            )

    callbacks = {} if args.quiet else {t: show for t in args.topics}
    curve = {}
    if args.keys:
        curve = {
            "client_secret": args.keys / "client.key_secret",
            "server_public": args.keys / "server.key",
        }
    with RigClient(args.connect, tuple(args.topics), callbacks, **curve) as rig:
        done = (
            (lambda: rig.stats_by_topic["forecast"].seqs.__len__() >= args.frames)
            if args.frames
            else None
        )
        try:
            rig.run(args.seconds, until=done)
        except KeyboardInterrupt:
            pass
        stats = rig.stats()
        samples = rig.stats(samples=True)
    print(json.dumps(stats), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(samples))
    return 0


def _keys_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for the key files")


@command(
    "keys",
    "generate ZeroMQ CURVE keys for serving beyond this machine",
    "calm-rt keys --out keys/ && calm-rt serve --publish tcp://0.0.0.0:5556 --keys keys/",
)
@arguments(_keys_args)
def _cmd_keys(args: argparse.Namespace) -> int:
    from calm_rt.security import generate_keys

    paths = generate_keys(args.out)
    print(
        f"server keys: {paths['server_secret']} (keep private), {paths['server_public']} (give to rigs)"
    )
    print(
        f"client keys: {paths['client_secret']} (for the rig), authorised in {args.out / 'authorized'}/"
    )
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=20.0, help="how long to stream (default 20)")
    p.add_argument("--json", type=Path, default=None, help="write the summary as JSON")
    p.add_argument("--neurons", type=int, default=256, help="simulated neurons (default 256)")
    p.add_argument("--size", type=int, default=512, help="frame size in pixels (default 512)")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate (default 30)")
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="model checkpoint (default: shipped)"
    )
    p.add_argument("--gui", action="store_true", help="open the live view in napari")
    p.add_argument(
        "--workdir", type=Path, default=Path("demo-out"), help="where the movie and ROIs go"
    )
    _threads_arg(p)


@command(
    "demo",
    "run mock scope, server and rig client on loopback, headless, and report latency",
    "calm-rt demo --seconds 20 --json demo.json",
)
@arguments(_demo_args)
def _cmd_demo(args: argparse.Namespace) -> int:
    from calm_rt.demo import run_demo

    if args.gui:
        # Qt and napari load only here: the runtime never imports them.
        try:
            from napari_plugin._app import run_live_demo
        except ImportError as exc:
            from calm_rt.errors import NotAvailableError

            raise NotAvailableError(
                f"the live view needs napari and Qt ({exc}); install them with "
                "`pip install 'calm-rt[gui]'` or run without --gui"
            ) from exc
        print(
            "opening napari: the demo streams until the window is closed (--seconds and --json "
            "apply to the headless run)",
            flush=True,
        )
        return run_live_demo(
            neurons=args.neurons, size=args.size, fps=args.fps, checkpoint=args.checkpoint
        )
    summary = run_demo(
        seconds=args.seconds, neurons=args.neurons, size=args.size, fps=args.fps,
        checkpoint=args.checkpoint, workdir=args.workdir, log=lambda m: print(m, flush=True),
        threads=args.threads,
    )  # fmt: skip
    summary.pop("latencies_ms", None)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------------------
# analyze


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
    from calm_rt.analysis import AnalysisConfig, run_analysis
    from calm_rt.errors import ConfigError
    from calm_rt.model import load_checkpoint

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
