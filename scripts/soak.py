"""Soak the whole service: mock scope process -> server process -> rig process, for hours of frames.

    python scripts/soak.py --frames 100000 --fps 100 --neurons 64     # about 17 min
    python scripts/soak.py --frames 20000 --fps 60 --neurons 256

A simulated session's traces are streamed by ``calm-rt mock-scope`` (looped)
into ``calm-rt serve`` and heard by ``calm-rt listen``, each a separate
process on loopback. Every ``--every-s`` seconds the resident memory (RSS) of
each process is printed; at the end, whether every frame was answered, in
order (frames a server behind skipped, by design, are counted apart), and
how much each process grew after the warm-up. Exits 1 when a process grew
by more than ``--max-growth-mb`` after the warm-up or a frame was neither
answered nor skipped; 0 otherwise. A command, not a test: it takes as long as it takes.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from calm_rt.data import SimConfig, make_animal, simulate_session, write_npz
from calm_rt.errors import CalmError
from calm_rt.serve.client import control_request

CALM_RT = [sys.executable, "-m", "calm_rt"]


def _endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            resident = int(f.read().split()[1]) * 4096 / 2**20
    except OSError:
        return None
    return resident or None  # an ended process not yet reaped reads 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--fps", type=float, default=100.0, help="stream rate (default 100)")
    ap.add_argument("--neurons", type=int, default=64)
    ap.add_argument("--every-s", type=float, default=30.0, help="print RSS this often")
    ap.add_argument("--warmup-frames", type=int, default=5000, help="growth is counted after these")
    ap.add_argument("--max-growth-mb", type=float, default=20.0)
    ap.add_argument("--json", type=Path, default=None, help="write the RSS series and result here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="calm-rt-soak-"))
    cfg = SimConfig(neurons=args.neurons, frames=3000, fps=args.fps, seed=0)
    write_npz(work / "session.npz", simulate_session(cfg, make_animal(cfg, 0), 0)[0])
    scope_ep, pub_ep, ctl_ep = _endpoint(), _endpoint(), _endpoint()
    logs = {name: open(work / f"{name}.log", "wb") for name in ("server", "scope", "rig")}
    server = subprocess.Popen(
        [*CALM_RT, "serve", "--ingest", scope_ep, "--publish", pub_ep, "--control", ctl_ep,
         "--fps", str(args.fps)], stdout=logs["server"], stderr=subprocess.STDOUT,
    )  # fmt: skip
    rig = subprocess.Popen(
        [*CALM_RT, "listen", "--connect", pub_ep, "--topics", "forecast", "--quiet",
         "--frames", str(args.frames), "--json", str(work / "rig.json")],
        stdout=logs["rig"], stderr=subprocess.STDOUT,
    )  # fmt: skip
    time.sleep(5.0)  # the server loads and binds; the scope waits for it to subscribe anyway
    scope = subprocess.Popen(
        [*CALM_RT, "mock-scope", "--endpoint", scope_ep, "--source", str(work / "session.npz"),
         "--fps", str(args.fps), "--frames", str(args.frames), "--loop", "--wait-s", "120",
         "--json", str(work / "scope.json")], stdout=logs["scope"], stderr=subprocess.STDOUT,
    )  # fmt: skip
    procs = {"scope": scope, "server": server, "rig": rig}
    series: list[dict] = []
    t0 = time.monotonic()
    print(
        f"soak: {args.frames} frames of {args.neurons} neurons at {args.fps:g} Hz; logs in {work}"
    )
    print(f"{'t (s)':>8} {'frames':>8} " + " ".join(f"{n + ' MB':>10}" for n in procs), flush=True)
    status: dict = {}
    try:
        while scope.poll() is None or rig.poll() is None:
            streaming = scope.poll() is None
            time.sleep(args.every_s if series and streaming else min(args.every_s, 2.0))
            try:
                status = control_request(ctl_ep, {"cmd": "status"}, timeout_s=10.0)
            except CalmError:
                pass
            frames = status.get("answered", 0)
            if not streaming and rig.poll() is None and _settled(status, args.frames):
                # Every frame the scope sent was answered or skipped (a server behind
                # skips by design): nothing more will come, so the rig can report.
                time.sleep(1.0)
                rig.send_signal(signal.SIGINT)
                rig.wait(timeout=30)
            row = {"t_s": round(time.monotonic() - t0, 1), "frames": frames,
                   **{n: rss_mb(p.pid) for n, p in procs.items()}}  # fmt: skip
            series.append(row)
            print(f"{row['t_s']:>8} {frames:>8} "
                  + " ".join(f"{row[n] or 0:>10.1f}" for n in procs), flush=True)  # fmt: skip
            if server.poll() is not None:
                print("soak: the server exited early; see server.log", file=sys.stderr)
                return 1
            # A loaded machine streams slower than --fps (the scope paces each frame); give
            # it twice the nominal time before calling the run stuck.
            if time.monotonic() - t0 > 2 * args.frames / args.fps + 600:
                print(f"soak: did not finish in time ({frames} of {args.frames} frames answered)",
                      file=sys.stderr)  # fmt: skip
                return 1
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
    heard = json.loads((work / "rig.json").read_text()).get("forecast", {})
    warm = [r for r in series if r["frames"] >= args.warmup_frames]
    growth: dict[str, float | None] = {}
    for n in procs:  # rows after a process ended have no RSS for it
        alive = [r[n] for r in warm if r[n] is not None]
        growth[n] = max(alive) - alive[0] if alive else None
    answered, skipped = int(heard.get("received", 0)), int(status.get("skipped", 0))
    # Skipped: the server was behind and answered a newer frame (counted, by design).
    # Lost: neither answered nor skipped - that would be a bug.
    lost = args.frames - answered - skipped
    result = {"frames": args.frames, "answered": answered, "skipped": skipped, "lost": lost,
              "gaps": heard.get("gaps"), "in_order": heard.get("in_order"),
              "growth_mb": growth, "series": series}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"soak: {answered}/{args.frames} answered, {skipped} skipped by a server behind, "
          f"{lost} lost, rig gaps {heard.get('gaps')}; growth after {args.warmup_frames} frames "
          "(MB): " + ", ".join(f"{n} {g:.1f}" for n, g in growth.items() if g is not None))  # fmt: skip
    grew = [n for n, g in growth.items() if g is not None and g > args.max_growth_mb]
    problems = (
        (["grew: " + ", ".join(grew)] if grew else [])
        + ([f"{lost} frames lost"] if lost else [])
        + (
            []
            if heard.get("in_order") and heard.get("gaps") == skipped
            else ["rig's gaps != skipped"]
        )
    )
    if problems:
        print(f"soak: FAILED ({'; '.join(problems)})", file=sys.stderr)
        return 1
    return 0


def _settled(status: dict, frames: int) -> bool:
    """The server received every frame and answered or skipped each."""
    received = status.get("received", 0)
    return received >= frames and status.get("answered", 0) + status.get("skipped", 0) >= received


if __name__ == "__main__":
    sys.exit(main())
