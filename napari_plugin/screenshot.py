"""Render the README screenshot of the live view on the embedded demo.

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1000x24" \\
        python -m napari_plugin.screenshot --out docs/images/live_view.png

Starts napari, docks the live view, runs the embedded demo (mock scope +
server with the shipped checkpoint, or ``--checkpoint``) until forecasts,
decoded behaviour and a trigger have arrived, selects the most active
neuron, grabs the whole window and writes an indexed-colour PNG.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "save_png"]


def save_png(image: np.ndarray, path: str | Path, max_kb: int = 300) -> Path:
    """Write an RGB(A) screenshot as a palette PNG, fewer colours until it is under ``max_kb``."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    for colors in (256, 128, 64):
        rgb.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        if path.stat().st_size <= max_kb * 1024:
            break
    return path


def _most_active(view: Any) -> int | None:
    feed = view.feed
    if feed is None:
        return None
    act = feed.snapshot().activity
    if act.shape[0] < 2:
        return None
    return int(np.nanargmax(np.nanstd(act, axis=0)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m napari_plugin.screenshot",
        description="Render a screenshot of the napari live view on the embedded demo.",
        epilog="example:\n  QT_QPA_PLATFORM=xcb xvfb-run -a -s '-screen 0 1600x1000x24' "
        "python -m napari_plugin.screenshot --out docs/images/live_view.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("docs/images/live_view.png"))
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped one")
    parser.add_argument(
        "--calibrate", type=float, default=30.0, help="seconds of behaviour for the readout"
    )
    parser.add_argument(
        "--seconds", type=float, default=12.0, help="streaming after the calibration, then the grab"
    )
    parser.add_argument("--neurons", type=int, default=48)
    parser.add_argument("--size", type=int, default=192, help="frame size in pixels")
    parser.add_argument("--width", type=int, default=1500)
    parser.add_argument("--height", type=int, default=880)
    args = parser.parse_args(argv)

    # Fresh default settings (not the user's), with no notification toasts over the picture.
    tmp = tempfile.TemporaryDirectory(prefix="calm-rt-screenshot-")
    os.environ["NAPARI_CONFIG"] = str(Path(tmp.name) / "settings.yaml")
    import napari
    from napari.settings import get_settings

    get_settings().application.gui_notification_level = "none"

    from calm_rt.serve.demo import Demo
    from napari_plugin._app import open_live_demo, pump

    viewer = napari.Viewer(title="calm-rt live view", show=True)
    viewer.window.resize(args.width, args.height)
    demo = Demo(
        neurons=args.neurons, size=args.size, checkpoint=args.checkpoint, calibrate_s=args.calibrate
    )
    view = open_live_demo(viewer, demo)
    try:
        started = pump(
            300.0, until=lambda: view.feed is not None or "could not" in view.status_label.text()
        )
        if not started or view.feed is None:
            print(view.status_label.text(), file=sys.stderr)
            return 1
        # Decoded behaviour appears once the server has calibrated its readout.
        pump(args.calibrate * 2 + 60, until=lambda: bool(view.plots.behavior_curves))
        t0 = time.monotonic()
        pump(args.seconds / 2)
        view.select_neuron(_most_active(view))
        # Wait for a trigger to be on screen (they stay 1.5 s), up to the time asked for.
        pump(
            max(1.0, args.seconds - (time.monotonic() - t0)),
            until=lambda: (
                time.monotonic() - t0 > args.seconds / 2 + 2
                and bool(view.feed and view.feed.snapshot().triggers)
            ),
        )
        image = viewer.screenshot(canvas_only=False, flash=False)
    finally:
        view.cleanup()
        viewer.close()
        tmp.cleanup()
    path = save_png(image, args.out)
    print(f"wrote {path} ({image.shape[1]}x{image.shape[0]}, {path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
