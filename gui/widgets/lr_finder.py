"""The learning-rate range test's curve: loss against learning rate, and its suggestion, one click away.

Shows the newest ``lr_find`` event: the loss of each sweep step (faint) and the smoothed loss
against the learning rate on a log axis, a line at the suggestion (steepest descent of the smoothed
loss) and a dashed one at the minimum/10 rule. "Use" sends the suggestion on: into the settings
before a run, or to the paused run as a live change (the window decides which).
"""

from __future__ import annotations

import math

import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QLineEdit, QPushButton, QSpinBox, QVBoxLayout, QWidget

from tunedeck.engine.errors import ConfigError
from tunedeck.engine.protocol import FindLR, LrFindEvent
from tunedeck.gui.history import fmt_number
from tunedeck.gui.widgets.theme import COLORS, MUTED

EMPTY = (
    "Find LR (toolbar) measures a learning rate for this model and data: before a run, or while it is "
    "paused. The run is left exactly as it was."
)


class LrFinderPanel(QWidget):
    """The curve of the newest range test, with buttons that apply either suggestion."""

    use = Signal(float)  # a learning rate the user chose to apply

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.result: LrFindEvent | None = None
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 4, 6, 4)
        self.summary = QLabel(EMPTY)
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.summary)
        self.plot = pg.PlotWidget()
        self.plot.setLogMode(x=True, y=False)
        self.plot.setLabel("bottom", "learning rate")
        self.plot.setLabel("left", "loss")
        self.plot.setMinimumHeight(140)
        self.raw = self.plot.plot([], [], pen=pg.mkPen(COLORS["loss_raw"], width=1))
        self.smooth = self.plot.plot([], [], pen=pg.mkPen(COLORS["loss"], width=2))
        self.steepest = pg.InfiniteLine(angle=90, pen=pg.mkPen(COLORS["marker"], width=1))
        dashed = pg.mkPen(MUTED, width=1)
        dashed.setStyle(Qt.PenStyle.DashLine)
        self.min_div_10 = pg.InfiniteLine(angle=90, pen=dashed)
        for line in (self.steepest, self.min_div_10):
            line.setVisible(False)
            self.plot.addItem(line)
        lay.addWidget(self.plot, 1)
        row = QHBoxLayout()
        defaults = FindLR()
        self.start_edit = QLineEdit(fmt_number(defaults.start_lr))
        self.end_edit = QLineEdit(fmt_number(defaults.end_lr))
        self.steps_box = QSpinBox()
        self.steps_box.setRange(5, 1000)
        self.steps_box.setValue(defaults.steps)
        for text, w, tip in (
            ("from", self.start_edit, "The sweep's first learning rate"),
            ("to", self.end_edit, "The sweep's last learning rate (it stops earlier if the loss diverges)"),
            ("steps", self.steps_box, "Optimizer steps in the sweep"),
        ):
            w.setToolTip(tip)
            w.setMaximumWidth(70)
            row.addWidget(QLabel(text))
            row.addWidget(w)
        row.addStretch(1)
        lay.addLayout(row)
        # The buttons on a line of their own: the panel fits a narrow side column on a small screen.
        row = QHBoxLayout()
        self.use_steepest = QPushButton("Use")
        self.use_steepest.setToolTip("Set the learning rate to the suggestion (steepest descent of the loss)")
        self.use_min = QPushButton("Use")
        self.use_min.setToolTip("Set the learning rate by the minimum/10 rule")
        for button in (self.use_steepest, self.use_min):
            button.setEnabled(False)
            row.addWidget(button)
        row.addStretch(1)
        lay.addLayout(row)
        self.use_steepest.clicked.connect(lambda: self._use(self.result.suggestion if self.result else None))
        self.use_min.clicked.connect(lambda: self._use(self.result.lr_min_div_10 if self.result else None))

    def options(self) -> FindLR:
        """The sweep as set above the plot; a ConfigError in one line where a value is wrong."""
        try:
            start, end = float(self.start_edit.text()), float(self.end_edit.text())
        except ValueError:
            raise ConfigError(
                f"find_lr range {self.start_edit.text()!r} to {self.end_edit.text()!r} is not two numbers",
                "give learning rates such as 1e-7 and 1",
            ) from None
        return FindLR(start_lr=start, end_lr=end, steps=self.steps_box.value()).check()

    def show_result(self, ev: LrFindEvent) -> None:
        self.result = ev
        # Log mode takes the data as it is and plots log10 of x; the lines sit at log10 of the value.
        self.raw.setData(ev.lrs, ev.losses)
        self.smooth.setData(ev.lrs, ev.smoothed)
        for line, value in ((self.steepest, ev.suggestion), (self.min_div_10, ev.lr_min_div_10)):
            line.setVisible(value is not None and value > 0)
            if value is not None and value > 0:
                line.setValue(math.log10(value))
        for button, value, what in (
            (self.use_steepest, ev.suggestion, "suggestion"),
            (self.use_min, ev.lr_min_div_10, "minimum/10"),
        ):
            usable = value is not None and 0 < value < 1  # what train.learning_rate accepts
            button.setEnabled(usable)
            button.setText(
                f"Use {fmt_number(rounded(value))} ({what})" if value is not None else f"no {what}"
            )
        steps = f"{len(ev.lrs)} steps at step {ev.step}, {ev.stopped}"
        if ev.suggestion is None:
            self.summary.setText(f"No suggestion: the loss did not fall ({steps}). Widen the range.")
        else:
            self.summary.setText(
                f"Suggested learning rate {fmt_number(ev.suggestion)} (steepest descent of the smoothed "
                f"loss); minimum/10: {fmt_number(ev.lr_min_div_10)}. {steps}."
            )

    def _use(self, value: float | None) -> None:
        if value is not None:
            self.use.emit(rounded(value))


def rounded(lr: float) -> float:
    """Three significant digits: a learning rate to read and type, as the CLI prints it."""
    return float(f"{lr:.3g}")
