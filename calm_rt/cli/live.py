"""``calm-rt serve``, ``mock-scope``, ``listen``, ``keys`` and ``demo``: the live loop and its tools."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from calm_rt.cli._registry import arguments, command

# The serve flags that a rig file's keys also set (serve.rigfile.OPTIONS, which holds their
# defaults; a test keeps the two in step). Named here so that `calm-rt --help` imports no torch.
SERVE_OPTION_DESTS = (
    "ingest", "ingest_mode", "publish", "control", "checkpoint", "fps", "kind", "horizon", "rois",
    "record", "triggers", "keys", "max_lag_ms", "data_dir", "threads", "device", "priority", "cpus",
    "seconds", "compile", "dtype",
)  # fmt: skip


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=Path, default=None, metavar="RIG.toml",
        help="read every option below from this TOML file; flags given override it "
        "(docs/rig-config.md, docs/rig.example.toml)",
    )  # fmt: skip
    p.add_argument(
        "--print-config", action="store_true",
        help="write the effective configuration as TOML to stdout and exit, binding nothing",
    )  # fmt: skip
    p.add_argument(
        "--ingest",
        help="the scope's endpoint (default tcp://127.0.0.1:5555)",
    )
    p.add_argument("--ingest-mode", choices=("sub", "pull"),
                   help="sub: connect to the scope's PUB (default); pull: bind and let the scope PUSH")  # fmt: skip
    p.add_argument("--publish", help="where rigs subscribe (bound)")
    p.add_argument("--control", help="JSON control socket (bound)")
    p.add_argument("--checkpoint", type=Path, help="model checkpoint (default: shipped)")
    p.add_argument("--fps", type=float, help="the scope's frame rate in Hz (default 30)")
    p.add_argument("--kind", choices=("F", "dff"), help="what traces hold (default raw F)")
    p.add_argument("--horizon", type=int, help="frames to forecast (default: the model's)")
    p.add_argument(
        "--rois", type=Path,
        help="ROIs: a suite2p folder, an npz (labels, footprints or save_rois), ImageJ needs npz; "
        "a folder of plane0, plane1, ... for a multi-plane stream",
    )  # fmt: skip
    p.add_argument("--record", type=Path, help="record inputs and outputs to this HDF5 file")
    p.add_argument("--triggers", type=Path, help="JSON file of closed-loop trigger rules")
    p.add_argument("--keys", type=Path, help="CURVE key folder (from `calm-rt keys`)")
    p.add_argument(
        "--max-lag-ms", type=float,
        help="when a frame has waited this long, jump to the newest (default 500)",
    )  # fmt: skip
    p.add_argument(
        "--data-dir", type=Path,
        help="files a peer names over the control socket must lie here (default: working dir)",
    )  # fmt: skip
    _threads_arg(p)
    p.add_argument(
        "--compile", action="store_true", default=None,
        help="torch.compile the engine step at start-up, before the first frame (CPU only; "
        "seconds; measured a few %% faster: docs/engine.md)",
    )  # fmt: skip
    _device_arg(p)
    _dtype_arg(p)
    _priority_args(p)
    p.add_argument("--seconds", type=float, help="stop after this long (default: until stopped)")
    _exit_with_arg(p)
    # Only flags given explicitly reach the namespace, so that they can override the
    # file; the built-in defaults live with the file's keys (serve.rigfile.OPTIONS).
    # (set_defaults would not do: it puts the SUPPRESS string itself into the namespace.)
    for action in p._actions:
        if action.dest in SERVE_OPTION_DESTS:
            action.default = argparse.SUPPRESS
    p.epilog = (p.epilog or "") + (
        "\n  calm-rt serve --config rig.toml --fps 15   # a rig file; flags given override it\n"
        "  calm-rt serve --config rig.toml --print-config   # the effective configuration\n"
        "rig files: docs/rig-config.md, every key in docs/rig.example.toml"
        "\n\nexit status: 0 when stopped by `shutdown`, SIGINT, SIGTERM or --seconds; 1 a bad\n"
        "option at start; 70 (EX_SOFTWARE) when a service thread died (the traceback is\n"
        "logged, the recording closed, a final status published with the reason)."
    )


def _exit_with_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--exit-with", type=int, default=None, metavar="PID",
        help="stop cleanly when process PID ends (for launchers such as the demo)",
    )  # fmt: skip


def _watch_process(pid: int, on_exit) -> None:
    """Call ``on_exit()`` once process ``pid`` is gone (polled twice a second, on a thread)."""
    import os
    import threading
    import time

    def watch() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                on_exit()
                return
            except PermissionError:
                pass  # alive, someone else's
            time.sleep(0.5)

    threading.Thread(target=watch, name="calm-rt-exit-with", daemon=True).start()


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="where the model runs: auto (a CUDA GPU when torch sees one, default), cpu or cuda",
    )  # fmt: skip


def _dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
        help="the transformer's precision: float32 (default, exact against the offline model), "
        "bfloat16 or float16 (a GPU's tensor cores; tokens stay exact: docs/gpu.md)",
    )  # fmt: skip


def _priority_arg(p: argparse.ArgumentParser, who: str = "the service threads'") -> None:
    p.add_argument(
        "--priority", choices=("normal", "high", "realtime"), default="normal",
        help=f"{who} scheduling: normal (default), high (nice -10) or realtime "
        "(SCHED_FIFO); high and realtime need root or CAP_SYS_NICE (docs/engine.md)",
    )  # fmt: skip


def _claim_cpu(args: argparse.Namespace) -> None:
    """This process's priority (``--priority``); its threads inherit it."""
    from calm_rt.serve.priority import claim_cpu

    claim_cpu(args.priority)


def _priority_args(p: argparse.ArgumentParser) -> None:
    _priority_arg(p)
    p.add_argument(
        "--cpus", type=lambda s: tuple(int(c) for c in s.split(",")), default=(),
        metavar="LIST", help="pin the service threads to these CPUs, e.g. 2,3 (default: any)",
    )  # fmt: skip


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
    """Exit 0 when stopped by ``shutdown``, SIGINT, SIGTERM or ``--seconds``; EXIT_CRASH otherwise."""
    import signal

    from calm_rt.serve import EXIT_CRASH, Server, ServiceConfig
    from calm_rt.serve.rigfile import dump_toml, effective_options, load_rig_file
    from calm_rt.wire import CurveKeys

    flags = {dest: getattr(args, dest) for dest in SERVE_OPTION_DESTS if hasattr(args, dest)}
    opts = effective_options(load_rig_file(args.config) if args.config else {}, flags)
    if args.print_config:
        sys.stdout.write(dump_toml(opts))
        return 0
    config = ServiceConfig(
        ingest=opts["ingest"], ingest_mode=opts["ingest_mode"], publish=opts["publish"],
        control=opts["control"], checkpoint=opts["checkpoint"], fps=opts["fps"], kind=opts["kind"],
        horizon=opts["horizon"], rois=opts["rois"], auto_segment=opts["auto_segment"],
        segment_frames=opts["segment_frames"], max_lag_ms=opts["max_lag_ms"],
        max_backlog=opts["max_backlog"], record=opts["record"], triggers=tuple(opts["rules"]),
        keys=CurveKeys.from_folder(opts["keys"]) if opts["keys"] else None,
        status_every_s=opts["status_every_s"], torch_threads=opts["threads"],
        data_dir=opts["data_dir"], device=opts["device"], priority=opts["priority"],
        cpus=tuple(opts["cpus"]), compile=opts["compile"], dtype=opts["dtype"],
    )  # fmt: skip
    server = Server(config).start()
    stop = lambda signum, frame: server.request_stop(f"signal {signum}")  # noqa: E731
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if args.exit_with is not None:
        _watch_process(
            args.exit_with, lambda: server.request_stop(f"process {args.exit_with} ended")
        )
    print(
        f"serving: ingest {opts['ingest']} ({opts['ingest_mode']}), publish {opts['publish']}, "
        f"control {opts['control']}",
        flush=True,
    )
    try:
        server.wait(opts["seconds"])
    finally:
        server.stop("--seconds elapsed" if opts["seconds"] else "stopped")
    print(json.dumps(server.status(final=True)), flush=True)
    if server.error is not None:
        print(f"calm-rt serve: error: {server.error}", file=sys.stderr)
        return EXIT_CRASH
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
        "--frames", type=int, default=None,
        help="frames to send, volumes with --planes (default: the whole source)",
    )  # fmt: skip
    p.add_argument("--loop", action="store_true", help="loop the source")
    p.add_argument(
        "--neurons", type=int, default=256,
        help="simulated neurons, shared among the planes (default 256)",
    )  # fmt: skip
    p.add_argument(
        "--planes", type=int, default=1,
        help="simulate a multi-plane scope: K planes per volume, --fps volumes a second; "
        "--rois-out is then a folder of plane0.npz .. (default 1)",
    )  # fmt: skip
    p.add_argument(
        "--size", type=int, default=512, help="simulated frame size in pixels (default 512)"
    )
    p.add_argument(
        "--sim-frames", type=int, default=300, help="simulated movie length (default 300, looped)"
    )
    p.add_argument(
        "--behavior", type=Path, default=None,
        help=".npy [T, B] behaviour sent beside each frame of a movie source (looped with it)",
    )  # fmt: skip
    p.add_argument(
        "--rois-out",
        type=Path,
        default=None,
        help="write the simulated footprints here (npz; a folder with --planes)",
    )
    p.add_argument(
        "--wait-s", type=float, default=30.0, help="wait this long for a subscriber (pub)"
    )
    p.add_argument(
        "--drop", type=int, nargs="*", default=(), help="sequence numbers to drop (rehearse loss)"
    )
    p.add_argument("--json", type=Path, default=None, help="write what was sent as JSON")
    _priority_arg(p, "the scope's")
    _exit_with_arg(p)


@command(
    "mock-scope",
    "stream a simulated or recorded movie (or session traces) like a microscope",
    "calm-rt mock-scope --fps 30 --frames 900 --rois-out rois.npz",
)
@arguments(_mockscope_args)
def _cmd_mockscope(args: argparse.Namespace) -> int:
    import threading

    import numpy as np

    from calm_rt.errors import ConfigError
    from calm_rt.extract import Footprints, save_rois, save_volume_rois
    from calm_rt.serve.mockscope import FrameSource, MockScope, simulated_movie, simulated_volume

    _claim_cpu(args)
    if args.planes < 1:
        raise ConfigError(f"--planes must be at least 1, got {args.planes}")
    if args.source is not None:
        if args.planes > 1:
            raise ConfigError(
                "--planes simulates a multi-plane scope; it does not apply to --source"
            )
        source = FrameSource.from_file(args.source)
    else:
        planes = f" in {args.planes} planes" if args.planes > 1 else ""
        print(
            f"rendering a simulated {args.size}x{args.size} movie of {args.neurons} neurons"
            f"{planes}...",
            flush=True,
        )
        if args.planes > 1:
            source = simulated_volume(
                args.neurons, args.planes, args.size, args.sim_frames, args.fps or 30.0
            )
        else:
            source = simulated_movie(args.neurons, args.size, args.sim_frames, args.fps or 30.0)
        if args.rois_out and isinstance(source.footprints, Footprints):
            save_rois(args.rois_out, source.footprints)
        elif args.rois_out and source.footprints is not None:
            if args.rois_out.suffix == ".npz":
                raise ConfigError("with --planes, --rois-out is a folder (plane0.npz, ...)")
            save_volume_rois(args.rois_out, source.footprints)
    if args.behavior is not None:
        source = source.with_behavior(np.load(args.behavior, allow_pickle=False))
    fps = args.fps or source.fps or 30.0
    stop = threading.Event()
    if args.exit_with is not None:
        _watch_process(args.exit_with, stop.set)
    scope = MockScope(args.endpoint, args.mode)
    try:
        if not scope.wait_for_subscriber(args.wait_s):
            raise ConfigError(f"no subscriber connected to {args.endpoint} within {args.wait_s} s")
        frames = (
            args.frames * source.planes
            if args.frames is not None
            else (None if args.loop else source.n_frames)
        )
        print(f"streaming {source.kind} at {fps:g} Hz on {args.endpoint}", flush=True)
        stats = scope.stream(
            source, fps, frames, loop=args.loop or args.source is None, drop=set(args.drop),
            stop=stop,
        )  # fmt: skip
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
    _priority_arg(p, "the listener's")


@command(
    "listen",
    "subscribe to a server's forecasts, behaviour, triggers and status; report latency",
    "calm-rt listen --connect tcp://127.0.0.1:5556 --seconds 10 --json latency.json",
)
@arguments(_listen_args)
def _cmd_listen(args: argparse.Namespace) -> int:
    from calm_rt.serve.client import RigClient

    _claim_cpu(args)

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
            (lambda: rig.stats_by_topic["forecast"].received >= args.frames)
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
    from calm_rt.wire.security import generate_keys

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
    p.add_argument(
        "--record", type=Path, default=None,
        help="the server records the session to this HDF5 file (then: calm-rt export --nwb)",
    )  # fmt: skip
    _threads_arg(p)
    _device_arg(p)
    _dtype_arg(p)


@command(
    "demo",
    "run mock scope, server and rig client on loopback, headless, and report latency",
    "calm-rt demo --seconds 20 --json demo.json",
)
@arguments(_demo_args)
def _cmd_demo(args: argparse.Namespace) -> int:
    from calm_rt.errors import ConfigError
    from calm_rt.live.device import resolve_device
    from calm_rt.serve.demo import run_demo

    device = resolve_device(args.device)  # fails here, before rendering, without a GPU
    if args.dtype != "float32" and device == "cpu":
        raise ConfigError(
            f"--dtype {args.dtype} needs a GPU (--device cuda); on the CPU use float32"
        )

    if args.gui:
        if args.record is not None:
            raise ConfigError("--record applies to the headless demo; drop --gui to record")
        run_live_demo = _gui_entry_point()
        print(
            "opening napari: the demo streams until the window is closed (--seconds and --json "
            "apply to the headless run)",
            flush=True,
        )
        return run_live_demo(
            neurons=args.neurons, size=args.size, fps=args.fps, checkpoint=args.checkpoint,
            device=device, dtype=args.dtype,
        )  # fmt: skip
    summary = run_demo(
        seconds=args.seconds, neurons=args.neurons, size=args.size, fps=args.fps,
        checkpoint=args.checkpoint, workdir=args.workdir, log=lambda m: print(m, flush=True),
        threads=args.threads, device=device, record=args.record, dtype=args.dtype,
    )  # fmt: skip
    summary.pop("latencies_ms", None)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


def _gui_entry_point():
    """The live view's demo, found through the ``calm_rt.gui`` entry point the napari plugin declares.

    The runtime never imports Qt or napari (nor the plugin): a GUI registers
    itself, and without one ``--gui`` says what to install.
    """
    from importlib.metadata import entry_points

    from calm_rt.errors import NotAvailableError

    found = [ep for ep in entry_points(group="calm_rt.gui") if ep.name == "live-demo"]
    if not found:
        raise NotAvailableError(
            "no live view is installed (the napari plugin registers one); install it with "
            "`pip install 'calm-rt[gui]'` or run without --gui"
        )
    try:
        return found[0].load()
    except ImportError as exc:
        raise NotAvailableError(
            f"the live view needs napari and Qt ({exc}); install them with "
            "`pip install 'calm-rt[gui]'` or run without --gui"
        ) from exc
