"""The live closed-loop view: a dock widget that connects napari to a running calm-rt server.

Threads: the network side is a :class:`~napari_plugin._feed.LiveFeed` (worker
threads, no Qt); this widget pulls from it on a ``QTimer`` on the main
thread, shows the newest frame only and drops the rest. The viewer is touched
only from that timer, from button handlers, and from the two
``ensure_main_thread`` callbacks that finish starting the embedded demo.
Every timer, thread, callback and signal connection is released by
:meth:`LiveView.cleanup` (on close, on removal from its dock, and, for the
threads, when the widget is destroyed with the viewer's window).
"""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QEvent, QSize, Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import ensure_main_thread

from calm_rt.serve.client import Endpoints
from calm_rt.serve.demo import Demo
from napari_plugin._feed import LiveFeed, Snapshot
from napari_plugin._plots import LivePlots
from napari_plugin._status import status_text

if TYPE_CHECKING:
    import napari.viewer

__all__ = ["LiveView", "rois_from_file"]

FRAME, ROIS, SELECTED, TRIGGERS = (
    "calm-rt frame",
    "calm-rt ROIs",
    "calm-rt selected neuron",
    "calm-rt triggers",
)
_ACTIVITY_RANGE = (-1.0, 3.0)  # normalised activity mapped onto the colormap


def _real(obj: Any) -> Any:
    """The napari object behind the viewer proxy napari hands to plugin widgets (for identity checks)."""
    return getattr(obj, "__wrapped__", obj)


def rois_from_file(path: str | Path) -> np.ndarray:
    """A label image (neuron k is label k + 1) from any ROIs ``calm-rt serve --rois`` takes.

    ``[H, W]`` for one plane; ``[K, H, W]`` for a multi-plane folder, its
    labels numbered across the planes as the server numbers the neurons.
    """
    from calm_rt.errors import DataError
    from calm_rt.extract import VolumeRois, load_volume_rois

    rois = load_volume_rois(path)
    if not isinstance(rois, VolumeRois):
        return rois.labels()
    if len({fp.shape for fp in rois.planes}) > 1:
        raise DataError("the planes' ROIs are for frames of different sizes", path=str(path))
    stack = np.stack([fp.labels() for fp in rois.planes])
    for k, offset in enumerate(rois.offsets[:-1]):
        stack[k][stack[k] > 0] += offset
    return stack


class _Runtime:
    """The widget's Qt-free resources (feed threads, embedded demo); closing is idempotent.

    Kept apart from the widget so that it can be closed from the widget's
    ``destroyed`` signal, when the widget itself is already gone.
    """

    def __init__(self) -> None:
        self.feed: LiveFeed | None = None
        self.demo: Demo | None = None
        self.closed = False
        self._lock = threading.Lock()

    def stop(self) -> None:
        with self._lock:
            feed, demo = self.feed, self.demo
            self.feed, self.demo = None, None
        if feed is not None:
            feed.stop()
        if demo is not None:
            demo.stop()

    def close(self, *_: Any) -> None:
        self.closed = True
        self.stop()


class LiveView(QWidget):
    """Connect to ``calm-rt serve`` (or start the embedded demo) and show it live.

    Args:
        napari_viewer: the viewer to draw into.
        rate_hz: display refresh rate; frames arriving faster are dropped.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, rate_hz: float = 20.0) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._runtime = _Runtime()
        # Stops the threads even when the widget dies with the window, without a cleanup() call.
        self._on_destroyed = functools.partial(_Runtime.close, self._runtime)
        self.destroyed.connect(self._on_destroyed)
        self._closed = False
        self._docked = False
        self._labels: np.ndarray | None = None
        self._label_ids = np.zeros(0, np.int32)  # neuron k -> label value
        self._centroids = np.zeros((0, 2))
        self._radii = np.zeros(0)
        self._layers: dict[str, Any] = {}
        self._neuron: int | None = None
        self._version = -1
        self._last_labels_t = 0.0
        self._last_status_t = 0.0
        self._trigger_key: tuple = ()
        self._frames_shown = 0
        self._contrast_set = False
        self._shown_seq: int | None = None  # the frame on screen
        self._roi_shift = (0.0, 0.0)  # how far the ROI layers are drawn from the reference
        self._picked_label = 0
        self._had_rig = False
        self._source = ""
        self._build_ui()
        self._timer = QTimer(self)
        self._timer.setInterval(max(1, int(1000 / rate_hz)))
        self._timer.timeout.connect(self._tick)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.viewer.mouse_drag_callbacks.append(self._on_click)

    # -- UI ---------------------------------------------------------------------------

    def _build_ui(self) -> None:
        self.publish_edit = QLineEdit("tcp://127.0.0.1:5556")
        self.control_edit = QLineEdit("tcp://127.0.0.1:5557")
        self.scope_edit = QLineEdit()
        self.scope_edit.setPlaceholderText("optional: the scope's PUB, for the image")
        self.rois_edit = QLineEdit()
        self.rois_edit.setPlaceholderText("optional: the server's --rois npz")
        self.keys_edit = QLineEdit()
        self.keys_edit.setPlaceholderText("optional: CURVE key folder (calm-rt keys)")
        form = QFormLayout()
        form.addRow("publish", self.publish_edit)
        form.addRow("control", self.control_edit)
        form.addRow("scope", self.scope_edit)
        form.addRow("ROIs", self.rois_edit)
        form.addRow("keys", self.keys_edit)

        self.connect_button = QPushButton("Connect")
        self.disconnect_button = QPushButton("Disconnect")
        self.demo_button = QPushButton("Start demo")
        self.connect_button.clicked.connect(self._on_connect_clicked)
        self.disconnect_button.clicked.connect(self.disconnect)
        self.demo_button.clicked.connect(self._on_demo_clicked)
        buttons = QHBoxLayout()
        for b in (self.connect_button, self.disconnect_button, self.demo_button):
            buttons.addWidget(b)

        self.neuron_spin = QSpinBox()
        self.neuron_spin.setRange(-1, 100_000)
        self.neuron_spin.setSpecialValueText("none")
        self.neuron_spin.setValue(-1)
        self.neuron_spin.valueChanged.connect(self._on_spin)
        self.colour_combo = QComboBox()
        self.colour_combo.addItems(["activity now", "forecast (mean ahead)"])
        view_row = QHBoxLayout()
        view_row.addWidget(QLabel("neuron"))
        view_row.addWidget(self.neuron_spin)
        view_row.addWidget(QLabel("colour ROIs by"))
        view_row.addWidget(self.colour_combo, 1)

        self.status_label = QLabel("not connected")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.status_label.setAlignment(Qt.AlignTop | Qt.AlignLeft)
        self.status_label.setMinimumHeight(6 * self.status_label.fontMetrics().lineSpacing())
        self.plots = LivePlots()
        self.plots.setMinimumSize(300, 360)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addLayout(view_row)
        layout.addWidget(self.status_label)
        layout.addWidget(self.plots, 1)
        self._set_buttons(connected=False)

    def sizeHint(self) -> QSize:
        return QSize(460, 820)

    def _set_buttons(self, connected: bool, starting: bool = False) -> None:
        self.connect_button.setEnabled(not connected and not starting)
        self.demo_button.setEnabled(not connected and not starting)
        self.disconnect_button.setEnabled(connected)

    # -- public API -------------------------------------------------------------------

    @property
    def feed(self) -> LiveFeed | None:
        return self._runtime.feed

    @property
    def demo(self) -> Demo | None:
        return self._runtime.demo

    @property
    def selected_neuron(self) -> int | None:
        return self._neuron

    def layer(self, key: str) -> Any:
        """One of this widget's layers (``FRAME``, ``ROIS``, ``SELECTED``, ``TRIGGERS``) or None."""
        return self._layers.get(key)

    def connect_to(self, endpoints: Endpoints, rois: str | Path | np.ndarray | None = None) -> None:
        """Start receiving from ``endpoints``; ``rois`` (npz path or label image) enables the ROI layer."""
        if self._closed:
            raise RuntimeError("this live view was closed; open a new one")
        self.disconnect()
        if rois is not None:
            self._set_rois(rois if isinstance(rois, np.ndarray) else rois_from_file(rois))
        feed = LiveFeed(endpoints).start()
        self.publish_edit.setText(endpoints.publish)
        self.control_edit.setText(endpoints.control or "")
        self.scope_edit.setText(endpoints.scope or "")
        self.keys_edit.setText(str(endpoints.keys or ""))
        if isinstance(rois, (str, Path)):
            self.rois_edit.setText(str(rois))
        self._runtime.feed = feed
        self._source = endpoints.publish
        self._version, self._frames_shown, self._contrast_set = -1, 0, False
        self._shown_seq = None
        self._had_rig = False
        self._set_buttons(connected=True)
        self.status_label.setText(f"connecting to {endpoints.publish} ...")
        self._timer.start()

    def start_demo(self, demo: Demo | None = None) -> None:
        """Start the embedded demo (mock scope + server) off the GUI thread, then connect to it."""
        if self._closed:
            raise RuntimeError("this live view was closed; open a new one")
        self.disconnect()
        demo = demo or Demo()
        self._runtime.demo = demo
        self._set_buttons(connected=False, starting=True)
        self.status_label.setText(
            f"starting the demo: rendering {demo.neurons} neurons at {demo.size} px, loading the model ..."
        )
        threading.Thread(
            target=self._start_demo, args=(demo,), name="calm-rt-demo-start", daemon=True
        ).start()

    def disconnect(self) -> None:
        """Stop receiving (and stop the embedded demo); the layers stay as they were."""
        self._timer.stop()
        self._runtime.stop()
        if not self._closed:
            self._set_buttons(connected=False)
            if self._source:
                self.status_label.setText(f"disconnected from {self._source}")

    def select_neuron(self, neuron: int | None) -> None:
        """Show ``neuron`` in the plots and ring its ROI."""
        if neuron is not None and neuron < 0:
            neuron = None
        self._neuron = neuron
        self.plots.set_neuron(neuron)
        if self.neuron_spin.value() != (-1 if neuron is None else neuron):
            self.neuron_spin.blockSignals(True)
            self.neuron_spin.setValue(-1 if neuron is None else neuron)
            self.neuron_spin.blockSignals(False)
        self._show_selection()
        self._version = -1  # redraw the plots on the next tick

    def cleanup(self) -> None:
        """Release everything: timer, threads, demo, callbacks, signal connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._timer.stop()
        self._runtime.close()
        try:
            self._timer.timeout.disconnect(self._tick)
        except (TypeError, RuntimeError):
            pass
        self.viewer.layers.events.removed.disconnect(self._on_layer_removed)
        if self._on_click in self.viewer.mouse_drag_callbacks:
            self.viewer.mouse_drag_callbacks.remove(self._on_click)
        labels = self._layers.get(ROIS)
        if labels is not None:
            labels.events.selected_label.disconnect(self._on_selected_label)
        self._layers.clear()

    # -- Qt events --------------------------------------------------------------------

    def closeEvent(self, event: Any) -> None:
        self.cleanup()
        super().closeEvent(event)

    def event(self, event: Any) -> bool:
        # napari removes a dock widget by un-parenting its inner widget: that is our close.
        if event.type() == QEvent.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif self._docked:
                self.cleanup()
        return super().event(event)

    # -- handlers ---------------------------------------------------------------------

    def _on_connect_clicked(self) -> None:
        def text(edit: QLineEdit) -> str | None:
            return edit.text().strip() or None

        try:
            endpoints = Endpoints(
                publish=text(self.publish_edit) or "tcp://127.0.0.1:5556",
                control=text(self.control_edit),
                scope=text(self.scope_edit),
                keys=Path(k) if (k := text(self.keys_edit)) else None,
            )
            self.connect_to(endpoints, rois=text(self.rois_edit))
        except Exception as exc:  # shown to the user, who can fix the field
            self.status_label.setText(f"cannot connect: {exc}")
            self._set_buttons(connected=False)

    def _on_demo_clicked(self) -> None:
        self.start_demo()

    def _start_demo(self, demo: Demo) -> None:
        try:
            demo.start()
        except Exception as exc:
            demo.stop()
            self._demo_failed(f"{type(exc).__name__}: {exc}")
            return
        if self._runtime.closed or self._runtime.demo is not demo:
            demo.stop()  # closed or replaced while starting
            return
        self._demo_ready(demo)

    @ensure_main_thread
    def _demo_ready(self, demo: Demo) -> None:
        if self._closed or self._runtime.demo is not demo:
            demo.stop()
            return
        assert demo.endpoints is not None and demo.movie is not None
        self._runtime.demo = None  # connect_to() disconnects first; keep the demo running
        self.connect_to(demo.endpoints, rois=demo.movie.labels)
        self._runtime.demo = demo
        if self._neuron is None and demo.movie.n_rois:
            self.select_neuron(0)

    @ensure_main_thread
    def _demo_failed(self, reason: str) -> None:
        if self._closed:
            return
        self._runtime.demo = None
        self._set_buttons(connected=False)
        self.status_label.setText(f"the demo could not start: {reason}")

    def _on_spin(self, value: int) -> None:
        self.select_neuron(None if value < 0 else value)

    def _on_click(self, viewer: Any, event: Any) -> None:
        labels = self._layers.get(ROIS)
        if labels is None or event.type != "mouse_press":
            return
        value = labels.get_value(
            event.position,
            view_direction=event.view_direction,
            dims_displayed=event.dims_displayed,
            world=True,
        )
        if value:
            self._select_label(int(value))

    def _on_selected_label(self, event: Any = None) -> None:
        # The layer re-emits this when its colormap is replaced: act on real changes only.
        labels = self._layers.get(ROIS)
        value = int(labels.selected_label) if labels is not None else 0
        if value and value != self._picked_label:
            self._picked_label = value
            self._select_label(value)

    def _select_label(self, value: int) -> None:
        hits = np.flatnonzero(self._label_ids == value)
        if hits.size and hits[0] != self._neuron:
            self.select_neuron(int(hits[0]))

    def _on_layer_removed(self, event: Any) -> None:
        for key, layer in list(self._layers.items()):
            if layer is event.value:
                if key == ROIS:
                    layer.events.selected_label.disconnect(self._on_selected_label)
                del self._layers[key]

    # -- layers -----------------------------------------------------------------------

    def _existing(self, name: str) -> Any:
        return _real(self.viewer.layers[name]) if name in self.viewer.layers else None

    def _set_rois(self, labels: np.ndarray) -> None:
        from scipy import ndimage

        labels = np.asarray(labels, np.int32)
        ids = np.unique(labels[labels > 0])
        self._labels, self._label_ids = labels, ids.astype(np.int32)
        if ids.size:
            self._centroids = np.asarray(ndimage.center_of_mass(labels > 0, labels, ids))
            areas = ndimage.sum_labels(np.ones_like(labels), labels, ids)
            self._radii = np.sqrt(areas / np.pi)
        # The image layer goes in first (with zeros until a frame comes), under the ROIs.
        frame = self._layers.get(FRAME) or self._existing(FRAME)
        if frame is not None and frame.data.ndim != labels.ndim:  # one plane <-> K planes
            self.viewer.layers.remove(frame)
        self._frame_layer(np.zeros(labels.shape, np.uint16))
        layer = self._layers.get(ROIS) or self._existing(ROIS)
        if layer is None:
            layer = _real(self.viewer.add_labels(labels, name=ROIS, opacity=0.75))
        else:
            layer.data = labels
        if self._layers.get(ROIS) is not layer:
            layer.events.selected_label.connect(self._on_selected_label)
        self._layers[ROIS] = layer
        self._color_rois(np.full(ids.size, np.nan, np.float32))
        self._ensure_points()
        for name in (ROIS, SELECTED, TRIGGERS):  # new layers follow the motion too
            self._layers[name].translate = self._translation
        self._show_selection()

    @property
    def _ndim(self) -> int:
        """2, or 3 for a multi-plane stream (plane, y, x)."""
        return 2 if self._labels is None else self._labels.ndim

    def _ensure_points(self) -> None:
        for name in (SELECTED, TRIGGERS):  # points of the wrong dimension go (planes changed)
            layer = self._layers.get(name) or self._existing(name)
            if layer is not None and layer.ndim != self._ndim:
                self.viewer.layers.remove(layer)
        if SELECTED not in self._layers:
            layer = self._existing(SELECTED) or _real(
                self.viewer.add_points(
                    np.zeros((0, self._ndim)),
                    name=SELECTED,
                    face_color="transparent",
                    border_color="#00e5ff",
                    border_width=0.15,
                    border_width_is_relative=True,
                )
            )
            self._layers[SELECTED] = layer
        if TRIGGERS not in self._layers:
            layer = self._existing(TRIGGERS) or _real(
                self.viewer.add_points(
                    np.zeros((0, self._ndim)),
                    name=TRIGGERS,
                    symbol="star",
                    size=9,
                    face_color="#ff3b30",
                    border_color="white",
                    features={"rule": np.zeros(0, dtype=object)},
                    text={
                        "string": "{rule}",
                        "color": "#ff3b30",
                        "size": 10,
                        "anchor": "upper_left",
                    },
                )
            )
            self._layers[TRIGGERS] = layer

    def _show_selection(self) -> None:
        layer = self._layers.get(SELECTED)
        if layer is None:
            return
        k = self._neuron
        if k is None or k >= len(self._centroids):
            layer.data = np.zeros((0, self._ndim))
        else:
            layer.data = self._centroids[k : k + 1]
            layer.size = 2 * self._radii[k] + 4

    def _color_rois(self, values: np.ndarray) -> None:
        """Colour neuron k's ROI by ``values[k]`` (normalised activity; NaN: grey)."""
        from napari.utils.colormaps import DirectLabelColormap, ensure_colormap

        layer = self._layers.get(ROIS)
        if layer is None:
            return
        ids = self._label_ids
        vals = np.full(ids.size, np.nan, np.float32)
        m = min(ids.size, values.size)
        vals[:m] = values[:m]
        lo, hi = _ACTIVITY_RANGE
        rgba = ensure_colormap("inferno").map(
            np.clip((np.nan_to_num(vals, nan=lo) - lo) / (hi - lo), 0, 1)
        )
        rgba[~np.isfinite(vals)] = (0.5, 0.5, 0.5, 1.0)
        colors: dict[int | None, Any] = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
        colors.update({int(i): c for i, c in zip(ids, rgba)})
        layer.colormap = DirectLabelColormap(color_dict=colors)

    def _frame_layer(self, like: np.ndarray) -> Any:
        layer = self._layers.get(FRAME) or self._existing(FRAME)
        if layer is None:
            layer = _real(self.viewer.add_image(like, name=FRAME, colormap="gray"))
            self.viewer.layers.move(self.viewer.layers.index(layer), 0)  # under the ROIs
            self.viewer.reset_view()
        self._layers[FRAME] = layer
        return layer

    def _show_frame(self, seq: int, image: np.ndarray) -> None:
        labels = self._labels
        if labels is not None and labels.ndim == 3 == image.ndim and image.shape[0] < len(labels):
            # The later planes of the first volume are still on their way: show them blank.
            image = np.concatenate([image, np.zeros((len(labels) - len(image), *image.shape[1:]),
                                                    image.dtype)])  # fmt: skip
        layer = self._frame_layer(image)
        layer.data = image
        if not self._contrast_set:  # once per connection, so the image does not flicker
            lo, hi = np.percentile(image, [1, 99.8])
            layer.contrast_limits = (float(lo), float(max(hi, lo + 1)))
            self._contrast_set = True
        self._frames_shown += 1

    def _follow_motion(self, shift: tuple[float, float] | None) -> None:
        """Draw the ROIs where the cells are in the raw frame on screen.

        The ROIs are in the reference frame's coordinates; a cell at reference
        position p is at p + shift in the raw frame (the server's motion
        estimate, sent with each forecast). Moving the layers costs nothing;
        correcting the frame here would redo the server's work on the GUI thread.
        """
        if shift is None or shift == self._roi_shift:
            return
        self._roi_shift = shift
        for name in (ROIS, SELECTED, TRIGGERS):
            layer = self._layers.get(name)
            if layer is not None:
                layer.translate = self._translation

    @property
    def _translation(self) -> tuple[float, ...]:
        """The ROI layers' translation: the shift, and none along the plane axis."""
        return (0.0,) * (self._ndim - 2) + tuple(self._roi_shift)

    @property
    def shown_plane(self) -> int | None:
        """The plane on screen (the viewer's slider) for a multi-plane stream, else None."""
        if self._ndim < 3:
            return None
        return int(self.viewer.dims.current_step[0])

    @property
    def roi_shift(self) -> tuple[float, float]:
        """``(dy, dx)``: how far the ROI layers are drawn from the reference positions."""
        return self._roi_shift

    @property
    def shown_seq(self) -> int | None:
        """The sequence number of the frame on screen (None before the first)."""
        return self._shown_seq

    def _show_triggers(self, snap: Snapshot) -> None:
        layer = self._layers.get(TRIGGERS)
        if layer is None:
            return
        key = tuple((m.rule, m.seq) for m in snap.triggers)
        if key == self._trigger_key:
            return
        self._trigger_key = key
        points, rules = [], []
        for i, mark in enumerate(snap.triggers):
            spots = [self._centroids[k] for k in mark.neurons if k < len(self._centroids)]
            if not spots:  # rule's neurons unknown: list it in the corner
                spots = [np.array([0.0] * (self._ndim - 2) + [4.0 + 6.0 * i, 4.0])]
            for j, spot in enumerate(spots):
                points.append(spot)
                rules.append(f"{mark.rule} {mark.value:+.2f}" if j == 0 else "")
        layer.data = np.array(points).reshape(-1, self._ndim)
        layer.features = {"rule": np.array(rules, dtype=object)}

    # -- the display tick (main thread) -----------------------------------------------

    def _tick(self) -> None:
        feed = self._runtime.feed
        if self._closed or feed is None:
            return
        frame = feed.take_frame()
        if frame is not None:
            self._show_frame(*frame)
            self._shown_seq = frame[0]
        if self._shown_seq is not None:
            # A multi-plane view follows the motion of the plane on screen (each plane
            # is registered on its own; one layer translation serves one plane).
            self._follow_motion(feed.shift_for(self._shown_seq, plane=self.shown_plane))
        snap = feed.snapshot()
        now = time.monotonic()
        if snap.version != self._version:
            self._version = snap.version
            self.plots.update_neuron(snap)
            self.plots.update_behavior(snap)
            # Recolouring rebuilds the labels texture: 4 Hz is plenty for the eye.
            if now - self._last_labels_t >= 0.25 and snap.activity.shape[0]:
                self._last_labels_t = now
                if self.colour_combo.currentIndex() == 0 or snap.forecast is None:
                    values = snap.activity[-1]
                else:
                    values = snap.forecast.mean(axis=1)
                self._color_rois(values)
        self._show_triggers(snap)
        if now - self._last_status_t >= 0.5 or (snap.rig is not None) != self._had_rig:
            self._had_rig = snap.rig is not None
            self._last_status_t = now
            self.status_label.setText(status_text(snap, self._source, self._frames_shown))
