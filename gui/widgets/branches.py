"""Rollback in the window: the run's checkpoints as marks along the step axis of the loss plot, a menu
on each (roll back there, or there with new values) and the branches rollbacks left behind, drawn
faded on the loss and learning-rate plots.

The layer only asks: it emits the ``rollback`` command to send; the main window sends it, the engine
answers with a ``rollback`` event and the history moves the abandoned steps into a branch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyqtgraph as pg
from PySide6.QtCore import QObject, QPoint, QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QPainterPath, QPen
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QMenu,
    QVBoxLayout,
    QWidget,
)

from tunedeck.engine import config as cfgmod
from tunedeck.engine.errors import ConfigError
from tunedeck.engine.protocol import Rollback
from tunedeck.gui.history import Branch, RunHistory
from tunedeck.gui.widgets.theme import COLORS

if TYPE_CHECKING:
    from tunedeck.gui.widgets.plots import PlotPanel

MARK = "#e0c060"
FADED_ALPHA = 150


def checkpoint_steps(hist: RunHistory) -> list[int]:
    """Steps of the checkpoints on the run's current trajectory (``final/`` is not one to go back to)."""
    return sorted({step for step, path in hist.checkpoints if Path(path).parent.name == "checkpoints"})


def step_name(step: int) -> str:
    return f"step-{step:06d}"


class CheckpointMarks(pg.GraphicsObject):
    """Small triangles along the bottom edge of a plot, one per checkpoint; a click on one (either
    button) emits ``clicked(step, screen position)``. Clicks elsewhere go on to the plot."""

    clicked = Signal(int, QPoint)
    SIZE_PX = 8.0
    HIT_PX = 7.0

    def __init__(self, plot: pg.PlotItem) -> None:
        super().__init__()
        self.vb = plot.vb
        self.steps: list[int] = []
        self._rect = QRectF()
        self.setZValue(15)
        self.setToolTip("A checkpoint: click it to roll back there")
        self.vb.sigRangeChanged.connect(self._changed)
        self.vb.sigResized.connect(self._changed)

    def set_steps(self, steps: list[int]) -> None:
        if steps != self.steps:
            self.steps = list(steps)
            self.update()

    def _pixel(self) -> tuple[float, float]:
        r = self.vb.viewRect()
        w, h = max(1.0, self.vb.width()), max(1.0, self.vb.height())
        return r.width() / w, r.height() / h

    def _changed(self, *_args: Any) -> None:
        self.prepareGeometryChange()
        r = self.vb.viewRect()
        _, ph = self._pixel()
        # View y grows upwards: the plot's bottom edge is the rect's top() in view coordinates.
        self._rect = QRectF(r.left(), r.top(), r.width(), (self.SIZE_PX + 4) * ph)
        self.update()

    def boundingRect(self) -> QRectF:  # noqa: N802 (Qt name)
        return self._rect

    def paint(self, p: Any, *_args: Any) -> None:
        if not self.steps:
            return
        pw, ph = self._pixel()
        bottom = self._rect.top() + 2 * ph
        w, h = self.SIZE_PX * pw / 2, self.SIZE_PX * ph
        path = QPainterPath()
        for s in self.steps:
            if self._rect.left() - w <= s <= self._rect.right() + w:
                path.moveTo(QPointF(s, bottom + h))
                path.lineTo(QPointF(s - w, bottom))
                path.lineTo(QPointF(s + w, bottom))
                path.closeSubpath()
        pen = QPen(QColor("#1b1d21"))
        pen.setCosmetic(True)
        p.setPen(pen)
        p.setBrush(QBrush(QColor(MARK)))
        p.drawPath(path)

    def step_at(self, x: float) -> int | None:
        """The checkpoint within a few pixels of view x, or None."""
        pw, _ = self._pixel()
        near = [s for s in self.steps if abs(s - x) <= self.HIT_PX * pw]
        return min(near, key=lambda s: abs(s - x)) if near else None

    def mouseClickEvent(self, ev: Any) -> None:  # noqa: N802 (pyqtgraph name)
        step = self.step_at(ev.pos().x())
        if step is None:
            ev.ignore()
            return
        ev.accept()
        self.clicked.emit(step, ev.screenPos().toPoint())


class BranchCurves:
    """Each branch's loss and learning rate, faded and dashed, beside the run's own curves."""

    def __init__(self, loss_plot: pg.PlotItem, lr_plot: pg.PlotItem) -> None:
        self.loss_plot, self.lr_plot = loss_plot, lr_plot
        self.items: list[tuple[Branch, pg.PlotDataItem, pg.PlotDataItem]] = []

    @staticmethod
    def _pen(color: str) -> QPen:
        c = QColor(color)
        c.setAlpha(FADED_ALPHA)
        pen = pg.mkPen(c, width=1.5)
        pen.setStyle(Qt.PenStyle.DashLine)
        return pen

    def sync(self, branches: list[Branch]) -> None:
        if [b for b, _, _ in self.items] == branches:
            return
        self.clear()
        for b in branches:
            loss = self.loss_plot.plot(b.steps, b.loss, pen=self._pen(COLORS["loss"]), connect="finite")
            lr = self.lr_plot.plot(b.steps, b.lr, pen=self._pen(COLORS["lr"]), connect="finite")
            for item in (loss, lr):
                item.setZValue(-5)
                item.faded = True  # the y ranges follow the run's own curves, not what it left behind
                item.setToolTip(f"branch {b.number}: steps {b.to_step + 1}-{b.from_step}, left by a rollback")
            self.items.append((b, loss, lr))

    def clear(self) -> None:
        for _, loss, lr in self.items:
            self.loss_plot.removeItem(loss)
            self.lr_plot.removeItem(lr)
        self.items.clear()


class RollbackDialog(QDialog):
    """Which checkpoint to go back to, and optionally a new learning rate to go on with."""

    def __init__(self, parent: QWidget | None, steps: list[int], step: int | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Roll back")
        self.checkpoint = QComboBox()
        for s in steps:
            self.checkpoint.addItem(f"step {s} ({step_name(s)})", s)
        if step in steps:
            self.checkpoint.setCurrentIndex(steps.index(step))
        elif steps:
            self.checkpoint.setCurrentIndex(len(steps) - 1)
        self.learning_rate = QLineEdit()
        self.learning_rate.setPlaceholderText("the checkpoint's")
        self.learning_rate.setToolTip(
            "A new learning rate from the restored step on; empty keeps the one the checkpoint had."
        )
        self.error = QLabel()
        self.error.setStyleSheet("color: #ff8a8f;")
        self.error.setWordWrap(True)
        self.error.setVisible(False)
        form = QFormLayout()
        form.addRow("Checkpoint", self.checkpoint)
        form.addRow("Learning rate", self.learning_rate)
        note = QLabel(
            "Weights, optimizer, schedule, data position and settings go back to the checkpoint; "
            "the steps after it are kept as a branch."
        )
        note.setWordWrap(True)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
        )
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Roll back")
        buttons.accepted.connect(self._accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(note)
        lay.addWidget(self.error)
        lay.addWidget(buttons)

    def command(self) -> Rollback:
        """The rollback asked for; raises ConfigError (the engine's message) for a bad value."""
        step = self.checkpoint.currentData()
        if step is None:
            raise ConfigError("this run has no checkpoint to roll back to", "save one first")
        values: dict[str, Any] = {}
        text = self.learning_rate.text().strip()
        if text:
            values["learning_rate"] = cfgmod.validate_value("train", "learning_rate", text)
        return Rollback(checkpoint=step_name(int(step)), values=values)

    def _accept(self) -> None:
        try:
            self.command()
        except ConfigError as e:
            self.error.setText(e.one_line())
            self.error.setVisible(True)
            return
        self.accept()


class RollbackLayer(QObject):
    """The marks, the faded branches and the menu of a :class:`PlotPanel`; ``requested`` carries the
    ``rollback`` command to send. ``live``: whether a run is going (otherwise the menu says so)."""

    requested = Signal(object)

    def __init__(self, panel: PlotPanel) -> None:
        super().__init__(panel)
        self.panel = panel
        self.live = False
        self.marks = CheckpointMarks(panel.loss_plot)
        panel.loss_plot.addItem(self.marks, ignoreBounds=True)
        self.curves = BranchCurves(panel.loss_plot, panel.lr_plot)
        self.marks.clicked.connect(self.show_menu)
        self.menu: QMenu | None = None
        self.dialog: RollbackDialog | None = None

    def sync(self, hist: RunHistory) -> None:
        self.marks.set_steps(checkpoint_steps(hist))
        self.curves.sync(hist.branches)

    def show_menu(self, step: int, where: QPoint) -> QMenu:
        menu = QMenu(self.panel)
        back = menu.addAction(f"Roll back to step {step}")
        back.triggered.connect(lambda: self.requested.emit(Rollback(checkpoint=step_name(step))))
        more = menu.addAction(f"Roll back to step {step} with new values…")
        more.triggered.connect(lambda: self.ask(step))
        for action in (back, more):
            action.setEnabled(self.live)
        if not self.live:
            menu.addSeparator()
            menu.addAction("(only while a run goes; resume a checkpoint with File ▸ Resume)").setEnabled(
                False
            )
        self.menu = menu
        menu.popup(where)
        return menu

    def ask(self, step: int | None = None) -> RollbackDialog:
        """The dialog: which checkpoint and new values; on OK the command is requested."""
        dialog = RollbackDialog(self.panel, checkpoint_steps(self.panel.history), step)
        dialog.accepted.connect(lambda: self.requested.emit(dialog.command()))
        self.dialog = dialog
        dialog.open()
        return dialog
