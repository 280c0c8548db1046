"""A small live plot of the training and validation loss, drawn with QPainter (no extra deps)."""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

TRAINING_COLOUR = QColor(90, 160, 255)
VALIDATION_COLOUR = QColor(255, 150, 60)


class LossPlot(QWidget):
    """Loss against iteration on a log scale: training (blue) and validation (orange)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.training: list[tuple[int, float]] = []
        self.validation: list[tuple[int, float]] = []
        self.setMinimumHeight(140)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("training loss (blue) and validation loss (orange), log scale")

    def clear(self) -> None:
        self.training.clear()
        self.validation.clear()
        self.update()

    def add(self, iteration: int, loss: float, validation: float | None) -> None:
        if loss > 0 and math.isfinite(loss):
            self.training.append((iteration, loss))
        if validation is not None and validation > 0:
            self.validation.append((iteration, validation))
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt API)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.fillRect(self.rect(), QColor(38, 41, 48))
        margin_left, margin, width, height = 46, 8, self.width(), self.height()
        painter.setPen(QColor(200, 200, 200))
        if not self.training:
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "loss appears here during a fit")
            painter.end()
            return
        points = self.training + self.validation
        last = max(i for i, _ in points) or 1
        low = math.log10(min(v for _, v in points))
        high = math.log10(max(v for _, v in points))
        if high - low < 1e-6:
            low, high = low - 0.5, high + 0.5

        def to_screen(iteration: int, value: float) -> QPointF:
            x = margin_left + (width - margin_left - margin) * iteration / last
            y = margin + (height - 2 * margin - 14) * (high - math.log10(value)) / (high - low)
            return QPointF(x, y)

        painter.drawText(2, margin + 10, f"{10 ** high:.2g}")
        painter.drawText(2, height - 16, f"{10 ** low:.2g}")
        painter.drawText(2, (height - 14) // 2 + 4, "loss")
        painter.drawText(margin_left, height - 2, f"iteration (0 to {last}); loss on a log scale")
        legend_x = width - 150
        for row, (label, colour) in enumerate((("training loss", TRAINING_COLOUR),
                                               ("validation loss", VALIDATION_COLOUR))):
            y = margin + 10 + 14 * row
            painter.setPen(QPen(colour, 2))
            painter.drawLine(legend_x, y - 4, legend_x + 16, y - 4)
            painter.setPen(QColor(200, 200, 200))
            painter.drawText(legend_x + 22, y, label)
        for series, colour in ((self.training, TRAINING_COLOUR), (self.validation, VALIDATION_COLOUR)):
            if series:
                painter.setPen(QPen(colour, 1.5))
                painter.drawPolyline(QPolygonF([to_screen(i, v) for i, v in series]))
        painter.end()
