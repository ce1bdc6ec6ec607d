"""pyqtgraph plots beside the canvas: one neuron's recent activity with the forecast ahead of
"now" (mean ± s.d. band), and decoded behaviour over time. Time is in seconds, 0 = now."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QVBoxLayout, QWidget

from napari_plugin._feed import Snapshot

__all__ = ["LivePlots"]

_BG, _FG = "#262930", "#d0d4dc"  # napari's dark theme
_ACTIVITY, _FORECAST = "#e6e6e6", "#ff9f1c"
_BEHAVIOR = ("#4cc9f0", "#f72585", "#b5e48c", "#ffd166", "#9d4edd", "#06d6a0")
# Legends on a translucent patch of the background, so traces under them stay readable.
_LEGEND = dict(offset=(5, 5), labelTextColor=_FG, labelTextSize="8pt", brush=(38, 41, 48, 210))


class LivePlots(QWidget):
    """Two stacked plots fed from a :class:`~napari_plugin._feed.Snapshot`."""

    def __init__(self, parent: QWidget | None = None, window_s: float = 5.0) -> None:
        super().__init__(parent)
        self.window_s = window_s  # seconds of history shown left of "now"
        self._x_range: tuple[float, float] | None = None
        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setBackground(_BG)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.graphics)

        self.neuron_plot = self.graphics.addPlot(row=0, col=0)
        self.neuron_plot.setLabel("left", "activity (z)")
        self.neuron_plot.showGrid(x=True, y=True, alpha=0.15)
        self.neuron_plot.addLegend(**_LEGEND)
        self.history = self.neuron_plot.plot(
            pen=pg.mkPen(_ACTIVITY, width=1.5), name="activity", antialias=True, connect="finite"
        )
        self._upper = pg.PlotDataItem(pen=pg.mkPen(None))
        self._lower = pg.PlotDataItem(pen=pg.mkPen(None))
        self.band = pg.FillBetweenItem(self._upper, self._lower, brush=pg.mkBrush(255, 159, 28, 70))
        self.neuron_plot.addItem(self.band)
        self.forecast = self.neuron_plot.plot(
            pen=pg.mkPen(_FORECAST, width=2.5), name="forecast ± s.d.", antialias=True
        )
        self.now = pg.InfiniteLine(pos=0.0, angle=90, pen=pg.mkPen(_FG, width=1, style=Qt.DashLine))
        self.neuron_plot.addItem(self.now, ignoreBounds=True)

        self.behavior_plot = self.graphics.addPlot(row=1, col=0)
        self.behavior_plot.setLabel("left", "behaviour (z)")
        self.behavior_plot.setLabel("bottom", "time from now (s)")
        self.behavior_plot.showGrid(x=True, y=True, alpha=0.15)
        self.behavior_plot.setXLink(self.neuron_plot)
        for plot in (self.neuron_plot, self.behavior_plot):
            for side in ("left", "bottom"):
                plot.getAxis(side).enableAutoSIPrefix(False)
        self.behavior_legend = self.behavior_plot.addLegend(**_LEGEND)
        self.behavior_curves: dict[str, pg.PlotDataItem] = {}
        self.measured_curves: dict[str, pg.PlotDataItem] = {}
        self._behavior_title("decoded behaviour: none yet (fine-tune a head, or calibrate)")
        self.neuron: int | None = None
        self.set_neuron(None)

    def _behavior_title(self, text: str) -> None:
        self.behavior_plot.setTitle(text, color=_FG, size="10pt")

    def set_neuron(self, neuron: int | None) -> None:
        self.neuron = neuron
        title = "select a neuron (click its ROI)" if neuron is None else f"neuron {neuron}"
        self.neuron_plot.setTitle(title, color=_FG, size="10pt")

    def update_neuron(self, snap: Snapshot) -> None:
        """Redraw the selected neuron's history and forecast."""
        k = self.neuron
        if k is None or snap.seqs.size == 0 or k >= snap.activity.shape[1]:
            for item in (self.history, self.forecast, self._upper, self._lower):
                item.setData([], [])
            return
        fps = snap.fps or 30.0
        now = snap.seqs[-1]
        recent = snap.seqs > now - self.window_s * fps
        self.history.setData((snap.seqs[recent] - now) / fps, snap.activity[recent, k])
        if snap.forecast is not None and snap.forecast_std is not None:
            mean, sd = snap.forecast[k], snap.forecast_std[k]
            # Joined to "now" so the forecast reads as the continuation of the trace.
            last = snap.activity[-1, k]
            x = np.arange(0, mean.size + 1) / fps
            x_range = (-self.window_s, float(x[-1]) + 2.0 / fps)
            if x_range != self._x_range:  # fixed: "now" stays put and the forecast keeps its width
                self._x_range = x_range
                self.neuron_plot.setXRange(*x_range, padding=0)
            y0 = last if np.isfinite(last) else mean[0]
            self.forecast.setData(x, np.r_[y0, mean])
            self._upper.setData(x, np.r_[y0, mean + sd])
            self._lower.setData(x, np.r_[y0, mean - sd])

    def update_behavior(self, snap: Snapshot) -> None:
        """Redraw decoded (solid) and, when the scope sends it, measured (dashed) behaviour."""
        if snap.behavior_seqs.size == 0 or snap.seqs.size == 0:
            return
        fps, now = snap.fps or 30.0, snap.seqs[-1]
        names = snap.behavior_names or tuple(f"b{i}" for i in range(snap.behavior.shape[1]))
        have_measured = snap.measured.shape[0] > 1 and snap.measured.shape[1] == len(names)
        self._behavior_title(
            "decoded behaviour (solid)" + (" and measured (dashed)" if have_measured else "")
        )
        ref = snap.measured if have_measured else snap.behavior
        mu, sd = np.nanmean(ref, axis=0), np.nanstd(ref, axis=0) + 1e-6
        for i, name in enumerate(names):
            color = _BEHAVIOR[i % len(_BEHAVIOR)]
            curve = self.behavior_curves.get(name)
            if curve is None:
                curve = self.behavior_plot.plot(
                    pen=pg.mkPen(color, width=2), name=f"{name} (decoded)", antialias=True
                )
                self.behavior_curves[name] = curve
            x = (snap.behavior_seqs - now) / fps
            curve.setData(x, (snap.behavior[:, i] - mu[i]) / sd[i] + 3.0 * i)
            if have_measured:
                meas = self.measured_curves.get(name)
                if meas is None:
                    meas = self.behavior_plot.plot(pen=pg.mkPen(color, width=1, style=Qt.DashLine))
                    self.measured_curves[name] = meas
                meas.setData(
                    (snap.measured_seqs - now) / fps,
                    (snap.measured[:, i] - mu[i]) / sd[i] + 3.0 * i,
                )
