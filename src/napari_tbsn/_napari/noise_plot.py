"""The noise model beside the noise measured on the data, drawn with QPainter (no extra deps).

Noise variance against signal (input units): the measured points (NoiseMeasurement) as dots,
the model (estimated, or given from a camera calibration) as a line. An estimated model is a
line through the dots; a given model that misses them is a calibration in the wrong units.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

from ..noise import NoiseMeasurement, NoiseModel

BACKGROUND = QColor(38, 41, 48)
# One colour per channel (repeating): dots in it, the model's line in a lighter shade.
CHANNEL_COLOURS = (QColor(255, 150, 60), QColor(120, 210, 120), QColor(230, 110, 200), QColor(90, 200, 230))
DOT_RADIUS = 2.5


class NoisePlot(QWidget):
    """Measured noise variance (dots) and the noise model (line) against signal, per channel."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model: NoiseModel | None = None
        self.measurement: NoiseMeasurement | None = None
        self.setMinimumHeight(120)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("noise variance against signal: measured on the data (dots) and the noise model "
                        "(line). A given camera model that misses the dots has the wrong gain, read noise "
                        "or baseline.")

    def show_model(self, model: NoiseModel | None, measurement: NoiseMeasurement | None) -> None:
        self.model, self.measurement = model, measurement
        self.update()

    def clear(self) -> None:
        self.show_model(None, None)

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt API)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.fillRect(self.rect(), BACKGROUND)
        painter.setPen(QColor(200, 200, 200))
        if self.model is None or self.measurement is None:
            text = ("the noise model appears here after a fit" if self.model is None
                    else "this model file holds no noise measurement to plot")
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, text)
            painter.end()
            return
        signals = [np.asarray(s) for s in self.measurement.signal]
        measured = [np.asarray(v) for v in self.measurement.variance]
        low_x = min(float(s.min()) for s in signals)
        high_x = max(float(s.max()) for s in signals)
        ends = np.array([low_x, high_x])
        lines = [self.model.variance(ends, channel) for channel in range(len(signals))]
        values = np.concatenate([*measured, *lines])
        low_y, high_y = min(0.0, float(values.min())), float(values.max())
        if high_x - low_x < 1e-12:
            low_x, high_x = low_x - 0.5, high_x + 0.5
        if high_y - low_y < 1e-12:
            high_y = low_y + 1.0
        margin_left, margin, width, height = 46, 8, self.width(), self.height()

        def to_screen(signal: float, variance: float) -> QPointF:
            x = margin_left + (width - margin_left - margin) * (signal - low_x) / (high_x - low_x)
            y = margin + (height - 2 * margin - 14) * (high_y - variance) / (high_y - low_y)
            return QPointF(x, y)

        painter.drawText(2, margin + 10, f"{high_y:.3g}")
        painter.drawText(2, height - 16, f"{low_y:.3g}")
        painter.drawText(2, (height - 14) // 2 + 4, "noise var.")
        painter.drawText(margin_left, height - 2,
                         f"signal {low_x:.3g} to {high_x:.3g}: \u2022 measured, \u2014 noise model")
        for channel, (signal, variance, line) in enumerate(zip(signals, measured, lines)):
            colour = CHANNEL_COLOURS[channel % len(CHANNEL_COLOURS)]
            painter.setPen(QPen(colour.lighter(140), 1.5))
            painter.drawPolyline(QPolygonF([to_screen(x, y) for x, y in zip(ends, line)]))
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(colour)
            for x, y in zip(signal, variance):
                centre = to_screen(float(x), float(y))
                painter.drawEllipse(QRectF(centre.x() - DOT_RADIUS, centre.y() - DOT_RADIUS, 2 * DOT_RADIUS, 2 * DOT_RADIUS))
        painter.end()
