"""napari plugin for calm-rt: the live closed-loop view, a session reader and sample data.

Contributions are declared in the npe2 manifest ``napari.yaml`` (registered
through the ``napari.manifest`` entry point): the *Live view* dock widget
(:class:`napari_plugin._widget.LiveView`), a reader for session files and
recordings (:mod:`napari_plugin._reader`) and a simulated movie with ROI
labels (:mod:`napari_plugin._sample`). See docs/napari.md.

Importing this package is cheap: napari, Qt and torch load only when a
contribution is used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Demo", "Endpoints", "LiveFeed", "LiveView", "get_reader"]


def __getattr__(name: str) -> Any:
    if name == "LiveView":
        from napari_plugin._widget import LiveView

        return LiveView
    if name == "get_reader":
        from napari_plugin._reader import get_reader

        return get_reader
    if name == "LiveFeed":
        from napari_plugin._feed import LiveFeed

        return LiveFeed
    if name == "Endpoints":
        from calm_rt.serve.client import Endpoints

        return Endpoints
    if name == "Demo":  # the embedded demo: a mock scope and a server on loopback
        from calm_rt.serve.demo import Demo

        return Demo
    raise AttributeError(f"module 'napari_plugin' has no attribute {name!r}")
