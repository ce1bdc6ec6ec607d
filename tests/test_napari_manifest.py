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


def _manifest():
    return npe2.PluginManifest.from_file(
        Path(__file__).resolve().parents[1] / "napari_plugin" / "napari.yaml"
    )


def test_manifest_contributes_the_live_view_a_reader_and_sample_data():
    c = _manifest().contributions
    commands = {cmd.id: cmd.python_name for cmd in c.commands}
    assert [w.display_name for w in c.widgets] == ["Live view"]
    assert commands[c.widgets[0].command] == "napari_plugin._widget:LiveView"
    (reader,) = c.readers
    assert {"*.npz", "*.h5"} <= set(reader.filename_patterns)
    assert commands[reader.command] == "napari_plugin._reader:get_reader"
    assert [s.key for s in c.sample_data] == ["simulated_movie"]


def test_manifest_commands_import():
    pytest.importorskip("qtpy", reason="the widget needs Qt (gui extra)")
    _manifest().validate_imports()  # raises if any python_name does not resolve
