"""The napari plugin is discoverable: its npe2 manifest validates and is registered."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest

npe2 = pytest.importorskip("npe2", reason="napari (npe2) is part of the gui extra")


def test_manifest_validates():
    path = Path(__file__).resolve().parents[1] / "napari_plugin" / "napari.yaml"
    manifest = npe2.PluginManifest.from_file(path)
    assert manifest.name == "calm-rt"


def test_manifest_entry_point_is_registered():
    eps = entry_points(group="napari.manifest")
    assert any(ep.name == "calm-rt" and ep.value == "napari_plugin:napari.yaml" for ep in eps)
