"""Open napari with the live view on the embedded demo (``calm-rt demo --gui``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from calm_rt.serve.demo import Demo
from napari_plugin._widget import LiveView

__all__ = ["open_live_demo", "pump", "run_live_demo"]


def open_live_demo(viewer: Any = None, demo: Demo | None = None, **demo_kwargs: Any) -> LiveView:
    """Dock a :class:`LiveView` in ``viewer`` (a new one when None) and start the demo in it."""
    import napari

    if viewer is None:
        viewer = napari.Viewer(title="calm-rt live view")
    view = LiveView(viewer)
    viewer.window.add_dock_widget(view, name="calm-rt live view", area="right")
    view.start_demo(demo or Demo(**demo_kwargs))
    return view


def pump(seconds: float, until: Any = None) -> bool:
    """Run the Qt event loop for ``seconds`` or until ``until()`` is true; returns ``until()``'s last value."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        if until is not None and until():
            return True
        time.sleep(0.01)
    return bool(until()) if until is not None else False


def run_live_demo(
    neurons: int = 256,
    size: int = 512,
    fps: float = 30.0,
    checkpoint: Path | None = None,
    device: str = "auto",
    dtype: str = "float32",
) -> int:
    """Open napari on the embedded demo and block until its window is closed.

    ``device``: where the demo server's model runs (``auto``, ``cpu`` or ``cuda``);
    ``dtype``: its transformer precision (``calm-rt serve --dtype``).
    """
    import napari

    view = open_live_demo(
        neurons=neurons, size=size, fps=fps, checkpoint=checkpoint, device=device, dtype=dtype
    )
    try:
        napari.run()
    finally:
        view.cleanup()
    return 0
