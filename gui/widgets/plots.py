"""Live plots: loss, learning rate, gradient norm, throughput, memory and utilisation on one x axis.

All plots share one x range (``setXLink``): optimizer step, tokens seen or wall time. Curves read the
numpy buffers of a :class:`~tunedeck.gui.history.RunHistory` and are redrawn by a timer at most ~20
times a second, only when the history moved, and within a small share of the GUI thread
(``MAX_DUTY``). Each curve is handed only what is in view, reduced to about two points per pixel by a
min/max pyramid (:class:`~tunedeck.gui.history.Envelope`), so a million points per series stay smooth.

The mouse: the wheel zooms the x axis only (each y axis follows the data in view), a left drag pans,
a right drag zooms to a box, a double-click (or Fit) shows the whole run. While *following*, the
view keeps the newest step in sight; a pan or zoom that leaves it stops following, and one that
brings it back (or the Follow button) resumes it, keeping the zoomed width.

Live changes get a dashed line on every plot and one label per step on the loss plot, laid out in
rows so labels never overlap or leave the plot (the full text is the label's tooltip). Other runs can
be overlaid, each in its own colour, with their own change markers.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QEvent, QLineF, QObject, QPointF, QRectF, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QPen
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QSlider,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from tunedeck.gui.history import (
    X_MODES,
    Change,
    Envelope,
    RunHistory,
    Series,
    Smoother,
    fmt_duration,
    fmt_mb,
    fmt_number,
)
from tunedeck.gui.widgets.branches import RollbackLayer
from tunedeck.gui.widgets.theme import COLORS, GRID, GRID_MINOR, MUTED, OVERLAY_COLORS

REDRAW_MS = 50  # at most 20 redraws a second, whatever the step rate
# ...and live redraws take at most this share of the GUI thread: where a redraw is slow (a big
# window, software rendering, a busy CPU) they come less often, so training keeps the CPU and the GIL.
MAX_DUTY = 0.05  # of the GUI thread's CPU time
MAX_INTERVAL_S = 0.5
LABEL_CHARS = 38  # a marker label longer than this is cut (its tooltip has all of it)
LABEL_ROWS = 6  # rows of marker labels under the top of the loss plot, at most
TITLE_PX = 20  # height of a plot's title line (pyqtgraph's 30 takes a third of a small plot)
TICK_GAP_PX = 24  # room between two tick labels of a y axis
TICK_LEAST_PX = 14  # ...and the least, on a short axis (a label's height)
CPUS = os.cpu_count() or 1


def _pen(color: str, width: float = 1, dash: bool = False) -> QPen:
    pen = pg.mkPen(color, width=width)
    if dash:
        pen.setStyle(Qt.PenStyle.DashLine)
    return pen


def nice_ceil(v: float) -> float:
    """The smallest of 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8 times a power of ten that is >= v."""
    if v <= 0:
        return 1.0
    mag = 10.0 ** math.floor(math.log10(v))
    for m in (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * mag >= v * (1 - 1e-12):
            return m * mag
    return 10 * mag


def log_ticks(lo: float, hi: float, pixels: float, gap: float = TICK_GAP_PX) -> list[float]:
    """Tick values (in linear units) for a log axis showing 10**lo .. 10**hi on ``pixels`` pixels,
    at least ``gap`` pixels apart: whole decades, or 1-2-5 or 1..9 within them, or, on a range
    narrower than a decade, round linear steps (0.6, 0.8, 1, 1.2 ...)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo or pixels <= 0:
        return []
    per_px = (hi - lo) / pixels  # log10 units per pixel

    def spaced(values: list[float]) -> bool:
        logs = np.log10(np.asarray(values))
        return len(values) < 2 or float(np.min(np.diff(logs))) / per_px >= gap

    def within(values: list[float]) -> list[float]:
        return [v for v in values if lo <= math.log10(v) <= hi]

    d0, d1 = math.floor(lo), math.ceil(hi)
    best: list[float] = []
    for mantissas in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        vals = within([m * 10.0**d for d in range(d0, d1 + 1) for m in mantissas])
        if spaced(vals) and len(vals) > len(best):
            best = vals
    if len(best) < 3:  # less than a decade in view: round linear steps, as dense as the room allows
        a, b = 10.0**lo, 10.0**hi
        mag = 10.0 ** math.floor(math.log10(b - a))
        for step in (mag * m for m in (0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5, 10)):
            vals = [k * step for k in range(math.ceil(a / step), math.floor(b / step) + 1) if k > 0]
            if len(vals) >= 2 and spaced(vals):
                if len(vals) > len(best):
                    best = vals
                break
    if not best:  # many decades on few pixels: every n-th decade
        n = 1
        while n < 100:
            n += 1
            vals = within([10.0**d for d in range(d0, d1 + 1) if d % n == 0])
            if spaced(vals):
                return vals
    return best


def linear_ticks(
    lo: float, hi: float, pixels: float, gap: float = TICK_GAP_PX, least: float = TICK_LEAST_PX
) -> tuple[float, list[float]]:
    """(spacing, values): round values (1, 2, 2.5, 5 times a power of ten apart) in [lo, hi], at
    least ``gap`` pixels apart on an axis of ``pixels`` pixels; on a short axis where that leaves
    fewer than two, as close as ``least`` pixels (a label's height)."""
    span = hi - lo
    if not (math.isfinite(lo) and math.isfinite(hi)) or span <= 0 or pixels <= 0:
        return 1.0, []

    def multiples(spacing: float) -> list[float]:
        first = math.ceil(lo / spacing - 1e-9)
        return [k * spacing for k in range(first, int(math.floor(hi / spacing + 1e-9)) + 1)]

    spacing, values = 1.0, []
    for g in (gap, least):
        raw = span * g / pixels
        mag = 10.0 ** math.floor(math.log10(raw))
        spacing = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
        values = multiples(spacing)
        if len(values) >= 2:
            break
    else:
        # The round step above the least room leaves one label: the round step below half the
        # span gives two, if they still stand a label's height apart.
        half = span / 2
        mag = 10.0 ** math.floor(math.log10(half))
        lower = max(m * mag for m in (1, 2, 2.5, 5) if m * mag <= half * (1 + 1e-9))
        if lower * pixels / span >= least - 2 and len(multiples(lower)) >= 2:
            spacing, values = lower, multiples(lower)
    return spacing, [0.0 if abs(v) < spacing * 1e-9 else v for v in values]


class SpacedAxis(pg.AxisItem):
    """A y axis with one level of labels, never closer than TICK_GAP_PX (pyqtgraph's own piles
    labels on top of each other on a short plot, and on a log axis)."""

    def tickValues(self, minVal, maxVal, size):  # noqa: N802 (pyqtgraph name)
        if self.logMode:
            return [(1.0, [math.log10(v) for v in log_ticks(minVal, maxVal, size)])]
        spacing, values = linear_ticks(minVal, maxVal, size)
        return [(spacing, values)]

    def tickStrings(self, values, scale, spacing):  # noqa: N802 (pyqtgraph name)
        if self.logMode:
            return [fmt_number(float(f"{10.0**v:.6g}")) for v in values]
        return super().tickStrings(values, scale, spacing)


class MemoryAxis(SpacedAxis):
    """MB values written as 512 MB or 1.5 GB, with round ticks in the unit shown."""

    def tickValues(self, minVal, maxVal, size):  # noqa: N802 (pyqtgraph name)
        if max(abs(minVal), abs(maxVal)) < 2048:
            return super().tickValues(minVal, maxVal, size)
        spacing, values = linear_ticks(minVal / 1024, maxVal / 1024, size)
        return [(spacing * 1024, [v * 1024 for v in values])]

    def tickStrings(self, values, scale, spacing):  # noqa: N802 (pyqtgraph name)
        if spacing >= 1024:
            return [f"{v / 1024:g} GB" for v in values]
        return [f"{v:,.0f} MB" for v in values]


class XAxis(pg.AxisItem):
    """The shared x axis: optimizer steps, tokens (1.5M) or wall time (1:05:00)."""

    mode = "step"

    def tickStrings(self, values, scale, spacing):  # noqa: N802 (pyqtgraph name)
        if self.mode == "time":
            return [fmt_duration(v) if v >= 0 else "" for v in values]
        if self.mode == "tokens":
            return [_short(v) for v in values]
        return [f"{v:,.0f}" if spacing >= 1 else f"{v:g}" for v in values]


def _short(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


class StepViewBox(pg.ViewBox):
    """Wheel and left drag on the x axis only (y follows the data); right drag zooms to a box."""

    sigBoxZoomed = Signal(object)  # the box, in view coordinates

    def __init__(self) -> None:
        super().__init__()
        self.setMouseEnabled(x=True, y=False)
        self.setMenuEnabled(False)

    def mouseDragEvent(self, ev, axis=None) -> None:  # noqa: N802 (pyqtgraph name)
        if ev.button() == Qt.MouseButton.RightButton and axis is None:
            ev.accept()
            if ev.isFinish():
                self.rbScaleBox.hide()
                box = QRectF(pg.Point(ev.buttonDownPos(ev.button())), pg.Point(ev.pos())).normalized()
                box = self.childGroup.mapRectFromParent(box)
                if box.width() > 0 and box.height() > 0:
                    self.showAxRect(box, padding=0)
                    self.sigBoxZoomed.emit(box)
            else:
                self.updateScaleBox(ev.buttonDownPos(), ev.pos())
            return
        super().mouseDragEvent(ev, axis)


class GridLines(pg.GraphicsObject):
    """Grid lines at the axes' major ticks, drawn in one drawLines call with opaque pens.

    pyqtgraph's own grid (showGrid) draws alpha-blended lines through each axis' QPicture and
    tripled the painting time of the window; this costs a fraction and looks the same.
    """

    def __init__(self, plot: pg.PlotItem) -> None:
        super().__init__()
        self.plot = plot
        self.vb = plot.vb
        self.pen = QPen(QColor(GRID))
        self.pen.setCosmetic(True)
        self.minor_pen = QPen(QColor(GRID_MINOR))
        self.minor_pen.setCosmetic(True)
        self._lines: tuple[list[QLineF], list[QLineF]] = ([], [])
        self._rect = QRectF()
        self.setZValue(-100)
        self.vb.sigRangeChanged.connect(self._changed)
        self.vb.sigResized.connect(self._changed)

    def _changed(self, *_args) -> None:
        self.prepareGeometryChange()
        self._rect = QRectF(self.vb.viewRect())
        r = self._rect
        major: list[QLineF] = []
        minor: list[QLineF] = []
        x_axis, y_axis = self.plot.getAxis("bottom"), self.plot.getAxis("left")
        if self.vb.width() > 0 and self.vb.height() > 0:
            xs = x_axis.tickValues(r.left(), r.right(), self.vb.width())
            for v in xs[0][1] if xs else []:
                major.append(QLineF(v, r.top(), v, r.bottom()))
            lo, hi = sorted((r.top(), r.bottom()))
            ys = y_axis.tickValues(lo, hi, self.vb.height())  # in view coordinates, log mode too
            for level, (_, vals) in enumerate(ys[:2]):
                for v in vals:
                    (major if level == 0 else minor).append(QLineF(r.left(), v, r.right(), v))
        self._lines = (major, minor)
        self.update()

    def boundingRect(self) -> QRectF:  # noqa: N802 (Qt name)
        return self._rect

    def paint(self, p, *_args) -> None:
        major, minor = self._lines
        if minor:
            p.setPen(self.minor_pen)
            p.drawLines(minor)
        if major:
            p.setPen(self.pen)
            p.drawLines(major)


class TimedLayout(pg.GraphicsLayoutWidget):
    """A GraphicsLayoutWidget that remembers how long its last paint took (for the redraw budget).

    ``paint_log``, when a list, gets (steps drawn, wall time) after each paint: how late a step
    reaches the screen (``perf_check steps`` reads it)."""

    last_paint_s = 0.0
    drawn_steps = 0  # steps of the main run handed to the curves by the last refresh
    paint_log: list[tuple[int, float]] | None = None

    def paintEvent(self, ev) -> None:  # noqa: N802 (Qt name)
        t = time.thread_time()
        super().paintEvent(ev)
        self.last_paint_s = time.thread_time() - t
        if self.paint_log is not None:
            self.paint_log.append((self.drawn_steps, time.time()))


class Curve:
    """A PlotDataItem fed through an :class:`Envelope`: only what is in view, at screen resolution."""

    def __init__(
        self,
        plot: pg.PlotItem,
        name: str,
        color: str,
        width: float = 1,
        dash: bool = False,
        symbol: str | None = None,
    ) -> None:
        self.plot, self.name, self.color, self.dash = plot, name, color, dash
        self.has_data = False
        if symbol:
            self.item = plot.plot(
                pen=None,
                symbol=symbol,
                symbolSize=7,
                symbolBrush=pg.mkBrush(color),
                symbolPen=pg.mkPen("#1b1d21"),
            )
        else:
            # The envelope already reduces to ~2 points per pixel; pyqtgraph's own peak downsampling
            # and clipping stay on as a safety net and cost little on that many points.
            self.item = plot.plot(pen=_pen(color, width, dash), connect="finite", autoDownsampleFactor=2.0)
            self.item.setDownsampling(auto=True, method="peak")
            self.item.setClipToView(True)
        self._key: tuple | None = None

    def set(
        self,
        x: np.ndarray,
        y: np.ndarray,
        env: Envelope | None = None,
        window: tuple[int, int, int] | None = None,
    ) -> None:
        """Show y against x; with ``env`` and ``window`` = (i0, i1, pixels), only that part, reduced."""
        n = min(len(x), len(y))
        key = (id(x.base if x.base is not None else x), id(y.base if y.base is not None else y), n, window)
        if key == self._key:
            return
        self._key = key
        if n == 0:
            self.item.setData([], [])
            return
        if env is not None and window is not None:
            i0, i1, px = window
            xs, ys = env.window(x, i0, i1, px)
        else:
            xs, ys = x[:n], y[:n]
        self.item.setData(xs, ys)
        self.has_data = bool(np.isfinite(ys).any()) if len(ys) else False

    def clear(self) -> None:
        self._key = None
        self.has_data = False
        self.item.setData([], [])

    def set_visible(self, on: bool) -> None:
        self.item.setVisible(on)

    def remove(self) -> None:
        self.plot.removeItem(self.item)
        self.item.deleteLater()  # freed here, on the GUI thread, not by a garbage collection elsewhere


@dataclass
class MarkerGroup:
    """The changes of one run at one step: a line per plot, one label on the loss plot."""

    step: int
    text: str  # the full text (the label shows it cut to LABEL_CHARS)
    color: str
    lines: list[pg.InfiniteLine] = field(default_factory=list)
    label: pg.TextItem | None = None


def merge_changes(changes: list[Change]) -> list[tuple[int, str]]:
    """One (step, text) per step: changes made at one step (a user's and the engine's follow-up,
    several keys) read as one line."""
    by_step: dict[int, list[str]] = {}
    for ch in changes:
        text = ch.label()
        if ch.source not in ("user", ""):
            text = f"{ch.source}: {text}"
        by_step.setdefault(ch.step, []).append(text)
    return [(step, "; ".join(texts)) for step, texts in sorted(by_step.items())]


class Overlay:
    """Another run drawn over the plots in one colour, with its own change markers."""

    def __init__(self, panel: PlotPanel, hist: RunHistory, color: str) -> None:
        self.hist, self.color = hist, color
        self.smoother = Smoother(panel.smoother.weight)
        name = hist.label()
        self.loss = Curve(panel.loss_plot, name, color, 1.5)
        self.eval = Curve(panel.loss_plot, f"{name} eval", color, symbol="t")
        self.lr = Curve(panel.lr_plot, name, color, 1)
        self.grad = Curve(panel.grad_plot, name, color, 1)
        self.tput = Curve(panel.tput_plot, name, color, 1)
        self.mem = Curve(panel.mem_plot, name, color, 1)
        self.util = Curve(panel.util_plot, name, color, 1)
        self.curves = [self.loss, self.eval, self.lr, self.grad, self.tput, self.mem, self.util]
        self.per_core = PerCore()
        self.markers: list[MarkerGroup] = []
        self.envelopes: dict[int, Envelope] = {}

    def remove(self, panel: PlotPanel) -> None:
        for c in self.curves:
            c.remove()
        panel._drop_markers(self.markers)


class PlotPanel(QWidget):
    """The live plots, their toolbar (smoothing, log-y, x axis, follow, fit) and a hover read-out."""

    hovered = Signal(float)  # the step under the mouse
    following_changed = Signal(bool)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.history = RunHistory()
        self.overlays: list[Overlay] = []
        self._drawn: tuple = ()  # versions last drawn
        self._view_dirty = False
        self._envelopes: dict[int, Envelope] = {}
        # Following: the x range grows in round steps (see _follow), so the axes are not redone every
        # frame; with a width (a zoom that kept the newest step in view) it slides along instead.
        self.following = True
        self.follow_width: float | None = None
        self._follow_hi = 0.0
        self.x_mode = "step"
        self._markers: list[MarkerGroup] = []
        self._marker_count = 0
        self.smoother = Smoother(0.6)
        self._per_core = PerCore()
        self.redraws = 0
        self.readout_text = ""  # the hover read-out, as plain text
        self.mem_note = ""  # the machine's memory on a CPU run, in the memory plot's title

        # -- toolbar
        bar = QHBoxLayout()
        bar.setContentsMargins(6, 2, 6, 2)
        bar.addWidget(QLabel("smooth"))
        self.smoothing = QSlider(Qt.Orientation.Horizontal)
        self.smoothing.setRange(0, 99)
        self.smoothing.setValue(60)
        self.smoothing.setFixedWidth(90)
        self.smoothing.setToolTip(
            "Weight of the exponential moving average drawn over the raw loss: 0 shows the raw values, "
            "0.99 a very smooth trend. It changes only the drawing, not the training."
        )
        self.smoothing_label = QLabel("0.60")
        self.smoothing_label.setMinimumWidth(32)
        bar.addWidget(self.smoothing)
        bar.addWidget(self.smoothing_label)
        self.show_raw = QCheckBox("raw")
        self.show_raw.setChecked(True)
        self.show_raw.setToolTip("Also draw the unsmoothed loss of every step, faintly.")
        self.log_y = QCheckBox("log y")
        self.log_y.setToolTip("Logarithmic loss axis: late, small improvements stay visible.")
        bar.addWidget(self.show_raw)
        bar.addWidget(self.log_y)
        bar.addSpacing(8)
        bar.addWidget(QLabel("x"))
        self.x_axis = QComboBox()
        self.x_axis.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.x_axis.setMinimumContentsLength(8)
        for mode, text in X_MODES.items():
            self.x_axis.addItem(text, mode)
        self.x_axis.setToolTip("What the x axis counts: optimizer steps, tokens trained on, or wall time.")
        bar.addWidget(self.x_axis)
        self.follow_button = QToolButton()
        self.follow_button.setText("Follow")
        self.follow_button.setCheckable(True)
        self.follow_button.setChecked(True)
        self.follow_button.setToolTip(
            "Keep the newest step in view (End). A pan or zoom away from it stops following; "
            "one that brings it back, or this button, resumes, keeping the zoomed width."
        )
        bar.addWidget(self.follow_button)
        self.reset_zoom = QPushButton("Fit")
        self.reset_zoom.setToolTip("Show every step and follow new ones (or double-click a plot).")
        bar.addWidget(self.reset_zoom)
        bar.addSpacing(8)
        # The read-out never sizes the layout: it takes the room left and cuts what does not fit.
        self.readout = QLabel("")
        self.readout.setTextFormat(Qt.TextFormat.RichText)
        self.readout.setStyleSheet(f"color: {MUTED};")
        self.readout.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.readout.setMinimumWidth(0)
        self.readout.setContentsMargins(8, 0, 8, 0)
        self.readout.setFixedHeight(self.readout.fontMetrics().height() + 2)
        bar.addStretch(1)

        # -- plots
        self.glw = TimedLayout()
        self.glw.ci.setSpacing(2)
        self.glw.installEventFilter(self)
        titles = [
            "loss",
            "learning rate",
            "gradient norm",
            "throughput (tokens/s)",
            "memory",
            "utilisation (%)",
        ]
        self.titles = titles
        self._title_keys: dict[int, tuple] = {}
        self.x_axes = [XAxis("bottom") for _ in titles]
        lefts: list[pg.AxisItem] = [SpacedAxis("left") for _ in titles]
        lefts[4] = MemoryAxis("left")
        self.plots: list[pg.PlotItem] = []
        for i in range(len(titles)):
            vb = StepViewBox()
            p = self.glw.addPlot(
                row=i, col=0, viewBox=vb, axisItems={"left": lefts[i], "bottom": self.x_axes[i]}
            )
            self.plots.append(p)
        self.loss_plot, self.lr_plot, self.grad_plot, self.tput_plot, self.mem_plot, self.util_plot = (
            self.plots
        )
        self.names = ["loss", "lr", "grad", "tput", "mem", "util"]
        self.hidden: set[str] = set()
        self.loss_share = 3  # the loss plot's height against one small plot's (more on a small screen)
        for p, title in zip(self.plots, titles, strict=True):
            _title(p, f"<span style='color:{MUTED}'>{title}</span>")
            p.vb.addItem(GridLines(p), ignoreBounds=True)
            left, bottom = p.getAxis("left"), p.getAxis("bottom")
            left.setWidth(64)
            # fewer tick levels: less to lay out and paint, and a calmer look
            left.setStyle(maxTickLevel=1, maxTextLevel=1)
            bottom.setStyle(maxTickLevel=0)
            p.setDownsampling(auto=True, mode="peak")
            p.setClipToView(True)
            p.hideButtons()  # the Fit button (or a double-click) replaces pyqtgraph's per-plot "A"
            p.vb.sigBoxZoomed.connect(self._box_zoomed)
            if p is not self.loss_plot:
                p.setXLink(self.loss_plot)
        self._arrange()
        self.lr_plot.getAxis("left").enableAutoSIPrefix(False)
        self.mem_plot.getAxis("left").enableAutoSIPrefix(False)
        # Learning rate, throughput and memory are read against zero: their y axis starts at 0 and
        # grows to the largest value in view (a flat 500 tokens/s is not drawn as wild noise).
        self.zero_based = [self.lr_plot, self.tput_plot, self.mem_plot]
        self._zero_auto = {id(p): True for p in self.zero_based}
        for p in self.zero_based:
            p.enableAutoRange(y=False)
        self.util_plot.enableAutoRange(y=False)
        self.util_plot.setYRange(0, 100, padding=0.02)

        self.c_loss_raw = Curve(self.loss_plot, "loss", COLORS["loss_raw"], 1)
        self.c_loss = Curve(self.loss_plot, "smoothed", COLORS["loss"], 2)
        self.c_eval = Curve(self.loss_plot, "eval loss", COLORS["eval"], symbol="o")
        self.c_lr = Curve(self.lr_plot, "lr", COLORS["lr"])
        self.c_grad = Curve(self.grad_plot, "grad norm", COLORS["grad_norm"], 1)
        self.c_tput = Curve(self.tput_plot, "tokens/s", COLORS["tokens_per_s"], 1)
        # memory: named for what they measure on the run's device (see _memory_curves)
        self.c_mem = {
            "mem_allocated": Curve(self.mem_plot, "torch allocated", COLORS["mem_allocated"]),
            "mem_reserved": Curve(self.mem_plot, "torch reserved", COLORS["mem_reserved"]),
            "mem_peak": Curve(self.mem_plot, "torch peak", COLORS["mem_peak"], 1, dash=True),
        }
        self.c_sys = {
            "gpu_used": Curve(self.mem_plot, "GPU used", COLORS["gpu_used"]),
            "gpu_total": Curve(self.mem_plot, "GPU total", COLORS["gpu_total"], 1, dash=True),
            "host_used": Curve(self.mem_plot, "system used", COLORS["host_used"]),
            "host_total": Curve(self.mem_plot, "system total", COLORS["gpu_total"], 1, dash=True),
        }
        self.c_util = {
            "cpu": Curve(self.util_plot, f"CPU (process, % of {CPUS} cores)", COLORS["cpu"]),
            "gpu_util": Curve(self.util_plot, "GPU", COLORS["gpu_used"]),
        }
        self._main_curves = [
            self.c_loss_raw,
            self.c_loss,
            self.c_eval,
            self.c_lr,
            self.c_grad,
            self.c_tput,
            *self.c_mem.values(),
            *self.c_sys.values(),
            *self.c_util.values(),
        ]

        # hover cursor: one dashed vertical line per plot, moved together
        self.cursors = []
        for p in self.plots:
            line = pg.InfiniteLine(angle=90, movable=False, pen=_pen(COLORS["cursor"], 1, dash=True))
            line.setVisible(False)
            line.setZValue(20)
            p.addItem(line, ignoreBounds=True)
            self.cursors.append(line)
        # checkpoints as marks on the step axis (click one to roll back), rollbacks' branches faded
        self.rollback = RollbackLayer(self)
        self.loss_plot.vb.sigXRangeChanged.connect(self._xrange_changed)
        self.loss_plot.vb.sigResized.connect(self._xrange_changed)
        # Labels sit in view coordinates: when the y range moves (auto-range runs just before a
        # paint) they are placed again, so they keep their rows under the top of the plot.
        self.loss_plot.vb.sigRangeChanged.connect(self._range_changed)
        self.loss_plot.vb.sigResized.connect(self._range_changed)
        for p in self.plots:
            p.vb.sigRangeChangedManually.connect(self._manual_range)
        self.glw.scene().sigMouseClicked.connect(self._clicked)
        # The read-out follows the mouse at most ~30 times a second. (A timer the panel owns, not
        # pyqtgraph's SignalProxy: its own timer outlived the panel and could be freed off the GUI thread.)
        self._hover_pos: QPointF | None = None
        self._hover_timer = QTimer(self)
        self._hover_timer.setSingleShot(True)
        self._hover_timer.setInterval(33)
        self._hover_timer.timeout.connect(self._hover)
        self.glw.scene().sigMouseMoved.connect(self._mouse_moved)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        lay.addLayout(bar)
        lay.addWidget(self.readout)  # a row of its own: a narrow window leaves no room beside the bar
        lay.addWidget(self.glw, 1)

        self.smoothing.valueChanged.connect(self._smoothing_changed)
        self.show_raw.toggled.connect(lambda on: (self.c_loss_raw.set_visible(on), self.refresh(force=True)))
        self.log_y.toggled.connect(self._log_toggled)
        self.reset_zoom.clicked.connect(lambda: (self.fit(), self.refresh(force=True)))
        self.follow_button.clicked.connect(self._follow_clicked)
        self.x_axis.currentIndexChanged.connect(lambda _i: self.set_x_mode(self.x_axis.currentData()))

        self._next_ok = 0.0
        self._timer = QTimer(self)
        self._timer.setInterval(REDRAW_MS)
        self._timer.timeout.connect(self._tick)
        self._timer.start()

    def poke(self) -> None:
        """New data has just arrived: draw it now if the time budget allows (else the timer will),
        so a step is not kept waiting for the next tick."""
        self._tick()

    def _tick(self) -> None:
        """Timer: redraw new data within the time budget; a zoom or pan is redrawn at once."""
        now = time.perf_counter()
        if not self._view_dirty and now < self._next_ok:
            return
        # The cost is the GUI thread's own CPU time: on a busy machine the wall time of a redraw
        # includes waiting for a core, which takes nothing from training and must not slow redraws.
        t = time.thread_time()
        if self.refresh():
            cost = (time.thread_time() - t) + self.glw.last_paint_s
            self._next_ok = now + min(MAX_INTERVAL_S, cost / MAX_DUTY)

    # ------------------------------------------------------------------ which plots

    def _shown(self) -> list[pg.PlotItem]:
        return [p for p, n in zip(self.plots, self.names, strict=True) if n not in self.hidden]

    def _bottom_plot(self) -> pg.PlotItem:
        return self._shown()[-1]

    def _arrange(self) -> None:
        """Lay the shown plots out in one column; the lowest carries the x axis' values and label."""
        ci = self.glw.ci
        for p in self.plots:
            if p in ci.items:
                ci.removeItem(p)
        shown = self._shown()
        for row, p in enumerate(shown):
            ci.addItem(p, row=row, col=0)
            ci.layout.setRowStretchFactor(row, self.loss_share if p is self.loss_plot else 1)
            bottom = p.getAxis("bottom")
            last = p is shown[-1]
            bottom.setStyle(showValues=last)
            bottom.setHeight(None if last else 4)
            if last:
                p.setLabel("bottom", X_MODES[self.x_mode], color=MUTED)
            bottom.showLabel(last)
            # A grid layout shares out only the room above the rows' preferred heights by the
            # stretch factors: with preferred = minimum, the loss plot gets its shares on any screen.
            base = 90 if p is self.loss_plot else 48  # two labelled ticks and the title line
            p.setMinimumHeight(base + (40 if last else 0))  # ...and the x axis with its label
            p.setPreferredHeight(p.minimumHeight())
        for row in range(len(shown), len(self.plots)):
            ci.layout.setRowStretchFactor(row, 0)
        self._title_keys.clear()

    def set_plot_visible(self, name: str, on: bool) -> None:
        """Show or hide one plot ("lr", "grad", "tput", "mem", "util"; the loss plot stays)."""
        if name == "loss" or name not in self.names or (name not in self.hidden) == on:
            return
        (self.hidden.discard if on else self.hidden.add)(name)
        self._arrange()
        self._view_dirty = True

    def set_compact(self, on: bool) -> None:
        """A small screen: the loss plot takes a bigger share, the utilisation plot is hidden."""
        self.loss_share = 6 if on else 3
        if on:
            self.hidden.add("util")
        self._arrange()

    # ------------------------------------------------------------------ data

    def set_history(self, hist: RunHistory) -> None:
        """Show ``hist`` as the main run (a fresh live run, or a past one opened from disk)."""
        self.history = hist
        self.smoother.reset()
        self._drop_markers(self._markers)
        self._markers = []
        self._marker_count = 0
        for c in self._main_curves:
            c.clear()
        self._envelopes.clear()
        self._drawn = ()
        self.fit()
        self.refresh(force=True)

    def set_overlays(self, hists: list[RunHistory]) -> None:
        """Draw these runs over the main one, each in its own colour (an empty list removes them)."""
        for o in self.overlays:
            o.remove(self)
        self.overlays = [
            Overlay(self, h, OVERLAY_COLORS[i % len(OVERLAY_COLORS)]) for i, h in enumerate(hists)
        ]
        self._title_keys.clear()
        self._drawn = ()
        self.refresh(force=True)

    def set_overlay(self, hist: RunHistory | None) -> None:
        """One run to compare with (None removes the comparison)."""
        self.set_overlays([] if hist is None else [hist])

    @property
    def overlay(self) -> RunHistory | None:
        return self.overlays[0].hist if self.overlays else None

    def set_x_mode(self, mode: str) -> None:
        """Plot against "step", "tokens" (seen so far) or "time" (wall time since the start)."""
        if mode not in X_MODES or mode == self.x_mode:
            return
        self.x_mode = mode
        for ax in self.x_axes:
            ax.mode = mode
            ax.picture = None
            ax.update()
        self._bottom_plot().setLabel("bottom", X_MODES[mode], color=MUTED)
        i = self.x_axis.findData(mode)
        if i != self.x_axis.currentIndex():
            self.x_axis.setCurrentIndex(i)
        for c in self._main_curves:
            c.clear()
        for o in self.overlays:
            for c in o.curves:
                c.clear()
        self.fit()
        self.refresh(force=True)

    def fit(self) -> None:
        """Show every step and follow new ones (the Fit button, or a double-click on a plot)."""
        self._set_following(True, None)
        self._follow_hi = 0.0
        for p in self.plots:
            if p in self.zero_based:
                self._zero_auto[id(p)] = True
            elif p is not self.util_plot:
                p.enableAutoRange(y=True)
                p.setAutoVisible(y=True)
        self._view_dirty = True

    def _set_following(self, on: bool, width: float | None) -> None:
        changed = on != self.following
        self.following, self.follow_width = on, (width if on else None)
        self.follow_button.setChecked(on)
        if changed:
            self.following_changed.emit(on)

    def follow(self) -> None:
        """Follow the newest step again, keeping the current zoom's width."""
        x0, x1 = self.loss_plot.vb.viewRange()[0]
        first, last = self._x_extent()
        self._set_following(True, None if x0 <= first else x1 - x0)
        self._follow_hi = 0.0
        self._view_dirty = True
        self.refresh(force=True)

    def _follow_clicked(self, checked: bool) -> None:
        if checked:
            self.follow()
        else:
            self._set_following(False, None)

    def _no_x_autorange(self) -> None:
        # Every linked view must stop auto-ranging x, or the first one to fit its own data drags
        # the others (and the loss plot) along.
        for p in self.plots:
            p.vb.enableAutoRange(x=False)

    def show_range(self, lo: float, hi: float) -> None:
        """Zoom every plot to x in [lo, hi] and stop following (as a mouse zoom away from the end does)."""
        self._set_following(False, None)
        self._no_x_autorange()
        self.loss_plot.setXRange(lo, hi, padding=0)
        self._view_dirty = True

    def _clicked(self, ev) -> None:
        if ev.double():
            self.fit()
            self.refresh(force=True)

    def _x_extent(self) -> tuple[float, float]:
        """First and last x of the main run and the overlays (0, 0 when there are none)."""
        lo, hi = math.inf, -math.inf
        for h in [self.history, *(o.hist for o in self.overlays)]:
            x = h.x(self.x_mode)
            if len(x):
                lo, hi = min(lo, float(x[0])), max(hi, float(x[-1]))
        return (0.0, 0.0) if hi < lo else (min(lo, 0.0), hi)

    def _manual_range(self, *_args) -> None:
        """A wheel zoom or a pan: follow on when the newest step is still in view, else stop."""
        for p in self.zero_based:
            if not p.vb.autoRangeEnabled()[1] and p.vb is self.sender():
                self._zero_auto[id(p)] = False
        x0, x1 = self.loss_plot.vb.viewRange()[0]
        first, last = self._x_extent()
        if x0 <= last <= x1:
            self._set_following(True, None if x0 <= first else x1 - x0)
        else:
            self._set_following(False, None)
        self._view_dirty = True

    def _box_zoomed(self, _box: QRectF) -> None:
        # A box is a deliberate look at one region: it stays put.
        self._set_following(False, None)
        self._view_dirty = True

    def _zero_ranges(self) -> None:
        for p in self.zero_based:
            if not self._zero_auto[id(p)]:
                continue
            top = 0.0
            for item in p.listDataItems():
                if not item.isVisible() or getattr(item, "faded", False):
                    continue
                _, y = item.getOriginalDataset()
                if y is not None and len(y):
                    with np.errstate(invalid="ignore"):
                        m = np.nanmax(y) if np.isfinite(y).any() else 0.0
                    top = max(top, float(m))
            lo, hi = p.vb.viewRange()[1]
            want = top * 1.1 if top > 0 else 1.0
            if lo != 0 or want > hi * 1.0001 or want < 0.7 * hi:  # hysteresis: fewer axis redraws
                p.setYRange(0, want, padding=0)

    def _follow(self) -> None:
        """While following, keep the newest point in view: widen to the next round number once the
        data reaches it (whole run), or slide a window of the zoomed width along."""
        _, last = self._x_extent()
        vb = self.loss_plot.vb
        if self.follow_width is not None:
            w = self.follow_width
            x0, x1 = vb.viewRange()[0]
            if not (x1 - 0.2 * w <= last + 0.02 * w <= x1 + 1e-9) or abs((x1 - x0) - w) > 1e-6 * w:
                self._no_x_autorange()
                vb.setXRange(last + 0.02 * w - w, last + 0.02 * w, padding=0)
            return
        if last > self._follow_hi or self._follow_hi == 0.0:
            floor = 10.0 if self.x_mode == "step" else 1.0
            self._follow_hi = nice_ceil(max(floor, last * 1.15))
            total = self.history.total_steps
            if self.x_mode == "step" and total and last <= total < self._follow_hi:
                self._follow_hi = float(total)  # the planned end of the run is the natural edge
            self._no_x_autorange()
            vb.setXRange(0, self._follow_hi, padding=0.01)

    # ------------------------------------------------------------------ drawing

    def refresh(self, force: bool = False) -> bool:
        """Redraw if the data or the view moved since the last time; True when it drew."""
        key = (self.history.version, *(o.hist.version for o in self.overlays))
        if key == self._drawn and not force and not self._view_dirty:
            return False
        self._drawn = key
        if self.following:
            self._follow()
        self._view_dirty = False
        self.redraws += 1
        h, mode = self.history, self.x_mode
        x = h.x(mode)
        loss = h.series["loss"]
        win = self._window(x)
        if self.show_raw.isChecked():
            self._set(self.c_loss_raw, x, loss, win)
        self.smoother.update(loss.view)
        self._set(self.c_loss, x, self.smoother.out, win)
        self.c_eval.set(h.x_at(h.eval_steps.view, mode), h.eval_loss.view)
        self._set(self.c_lr, x, h.series["lr"], win)
        self._set(self.c_grad, x, h.series["grad_norm"], win)
        self._set(self.c_tput, x, h.series["tokens_per_s"], win)
        self._memory_curves(h, x, win)
        sx = h.x_at(h.sys_steps.view, mode)
        swin = self._window(sx)
        if "cpu" in h.nonzero:
            self._set(self.c_util["cpu"], sx, self._per_core.update(h.system["cpu"]), swin)
        if "gpu_util" in h.nonzero:
            self._set(self.c_util["gpu_util"], sx, h.system["gpu_util"], swin)
        self._sync_markers()
        self._sync_rollback(h)
        self.glw.drawn_steps = len(h)
        for o in self.overlays:
            self._draw_overlay(o)
        self._layout_labels()
        self._zero_ranges()
        self._titles()
        # pyqtgraph defers the views' auto-range to just before a paint; the labels it moves would then
        # ask for a second paint. Done now, the new data, ranges and labels go out in one paint.
        self.glw.scene().prepareForPaint()
        return True

    def _sync_rollback(self, h: RunHistory) -> None:
        """Checkpoint marks and the branches rollbacks left: drawn against the step, so shown only
        when the x axis counts steps."""
        steps = self.x_mode == "step"
        self.rollback.sync(h)
        self.rollback.marks.setVisible(steps)
        for _b, loss, lr in self.rollback.curves.items:
            loss.setVisible(steps)
            lr.setVisible(steps)

    def _memory_curves(self, h: RunHistory, x: np.ndarray, win: tuple[int, int, int]) -> None:
        """What is true on the run's device: on a GPU the allocator's figures and the device's memory,
        on a CPU the process RSS, its peak, and the machine's memory (the step fields are all RSS there)."""
        gpu = h.on_gpu
        names = (
            {"mem_allocated": "torch allocated", "mem_reserved": "torch reserved", "mem_peak": "torch peak"}
            if gpu
            else {"mem_allocated": "process RSS", "mem_peak": "peak RSS"}
        )
        for name, c in self.c_mem.items():
            shown = name in names and name in h.nonzero
            c.name = names.get(name, c.name)
            c.set_visible(shown)
            if shown:
                self._set(c, x, h.series[name], win)
        sx = h.x_at(h.sys_steps.view, self.x_mode)
        swin = self._window(sx)
        # On a CPU the machine's memory (tens of GB) would flatten the process' curve: it is said
        # in the title line instead.
        wanted = ("gpu_used", "gpu_total") if gpu else ()
        self.mem_note = ""
        if not gpu and "host_used" in h.nonzero:
            used, total = h.system["host_used"].last(), h.system["host_total"].last()
            if math.isfinite(used) and math.isfinite(total):
                self.mem_note = f"system {fmt_mb(used)} of {fmt_mb(total)} used"
        for name, c in self.c_sys.items():
            shown = name in wanted and name in h.nonzero
            c.set_visible(shown)
            if shown:
                self._set(c, sx, h.system[name], swin)

    def _draw_overlay(self, o: Overlay) -> None:
        h, mode = o.hist, self.x_mode
        x = h.x(mode)
        win = self._window(x)

        def put(curve: Curve, series: Series, xs: np.ndarray = x, w: tuple[int, int, int] = win) -> None:
            env = o.envelopes.get(id(series))
            if env is None or env.src is not series:
                env = o.envelopes[id(series)] = Envelope(series)
            env.sync()
            curve.set(xs, series.view, env, w)

        o.smoother.update(h.series["loss"].view)
        put(o.loss, o.smoother.out)
        o.eval.set(h.x_at(h.eval_steps.view, mode), h.eval_loss.view)
        put(o.lr, h.series["lr"])
        put(o.grad, h.series["grad_norm"])
        put(o.tput, h.series["tokens_per_s"])
        if "mem_allocated" in h.nonzero:
            put(o.mem, h.series["mem_allocated"])
        util = "gpu_util" if "gpu_util" in h.nonzero else "cpu" if "cpu" in h.nonzero else None
        if util is not None:
            sx = h.x_at(h.sys_steps.view, mode)
            series = h.system["gpu_util"] if util == "gpu_util" else o.per_core.update(h.system["cpu"])
            put(o.util, series, sx, self._window(sx))
        if len(o.markers) != len(merge_changes(h.changes)):
            self._drop_markers(o.markers)
            o.markers = self._make_markers(h, o.color, f"{h.label()}: ")

    def _titles(self) -> None:
        """Each plot's title line: its name, then its curves in their colours (no legend box to
        cover the data or the marker labels)."""
        for p, title in zip(self.plots, self.titles, strict=True):
            shown = [
                c
                for c in [*self._main_curves, *(c for o in self.overlays for c in o.curves)]
                if c.plot is p and c.has_data and c.item.isVisible() and not c.name.endswith(" eval")
            ]
            note = self.mem_note if p is self.mem_plot else ""
            key = (*((c.name, c.color) for c in shown), note)
            if self._title_keys.get(id(p)) == key:
                continue
            self._title_keys[id(p)] = key
            names = "&nbsp;&nbsp;".join(
                f"<span style='color:{c.color}'>{'┄' if c.dash else '━'} {c.name}</span>" for c in shown
            )
            if note:
                names += f"&nbsp;&nbsp;&nbsp;<span style='color:{MUTED}'>{note}</span>"
            sep = "&nbsp;&nbsp;&nbsp;" if names else ""
            _title(p, f"<span style='color:{MUTED}'>{title}</span>{sep}{names}")

    def _set(self, curve: Curve, x: np.ndarray, series: Series, win: tuple[int, int, int]) -> None:
        env = self._envelopes.get(id(series))
        if env is None or env.src is not series:
            env = self._envelopes[id(series)] = Envelope(series)
        env.sync()
        curve.set(x, series.view, env, win)

    def _window(self, x: np.ndarray) -> tuple[int, int, int]:
        """Index range of ``x`` in view (all of it while following the whole run) and the plots'
        width in pixels."""
        vb = self.loss_plot.vb
        px = max(200, int(vb.width()))
        n = len(x)
        whole = self.following and self.follow_width is None
        if whole or any(p.vb.autoRangeEnabled()[0] for p in self.plots) or n < 2:
            return 0, n, px
        x0, x1 = vb.viewRange()[0]
        i0 = max(0, int(np.searchsorted(x, x0)) - 1)
        i1 = min(n, int(np.searchsorted(x, x1, side="right")) + 1)
        return i0, i1, px

    def _range_changed(self, *_args) -> None:
        self._layout_labels()

    def _xrange_changed(self, *_args) -> None:
        # Zoomed, panned or resized: re-cut the data, and lay the marker labels out again.
        self._view_dirty = True

    # ------------------------------------------------------------------ change markers

    def _make_markers(self, h: RunHistory, color: str, prefix: str = "") -> list[MarkerGroup]:
        out = []
        for step, text in merge_changes(h.changes):
            g = MarkerGroup(step, prefix + text, color)
            for p in self.plots:
                line = pg.InfiniteLine(pos=step, angle=90, movable=False, pen=_pen(color, 1, dash=True))
                line.setToolTip(f"step {step}: {g.text}")
                line.setZValue(10)
                p.addItem(line, ignoreBounds=True)
                g.lines.append(line)
            short = g.text if len(g.text) <= LABEL_CHARS else g.text[: LABEL_CHARS - 1] + "…"
            g.label = pg.TextItem(short, color=color, fill=pg.mkBrush(27, 29, 33, 220), anchor=(0, 0))
            g.label.setToolTip(f"step {step}: {g.text}")
            g.label.setZValue(30)
            self.loss_plot.addItem(g.label, ignoreBounds=True)
            out.append(g)
        return out

    def _drop_markers(self, groups: list[MarkerGroup]) -> None:
        for g in groups:
            for line, p in zip(g.lines, self.plots, strict=False):
                p.removeItem(line)
                line.deleteLater()
            if g.label is not None:
                self.loss_plot.removeItem(g.label)
                g.label.deleteLater()

    def _sync_markers(self) -> None:
        changes = self.history.changes
        if len(changes) != self._marker_count:
            self._marker_count = len(changes)
            self._drop_markers(self._markers)
            self._markers = self._make_markers(self.history, COLORS["marker"])

    def _layout_labels(self) -> None:
        """Place the marker labels in rows under the top of the loss plot: right of their line, or
        left of it near the right edge, never over another label, never outside the plot."""
        vb = self.loss_plot.vb
        rect = vb.sceneBoundingRect()
        if rect.width() <= 0:
            return
        groups = [(g, self.history) for g in self._markers] + [
            (g, o.hist) for o in self.overlays for g in o.markers
        ]
        placed: list[tuple[float, float, float, pg.TextItem]] = []
        rows: list[float] = []  # the right edge of the last label in each row
        row_h = 2 + max(
            (g.label.boundingRect().height() for g, _ in groups if g.label is not None), default=18
        )
        for g, h in sorted(groups, key=lambda gh: float(gh[1].x_at([gh[0].step], self.x_mode)[0])):
            x = float(h.x_at([g.step], self.x_mode)[0])
            for line in g.lines:
                line.setPos(x)
            label = g.label
            if label is None:
                continue
            sx = vb.mapViewToScene(QPointF(x, 0)).x()
            w = label.boundingRect().width()
            if not (rect.left() <= sx <= rect.right()):
                label.setVisible(False)
                continue
            left = sx + 3
            if left + w > rect.right():  # near the live edge: to the left of the line instead
                left = max(rect.left(), sx - 3 - w)
            row = next((r for r, edge in enumerate(rows) if left > edge + 6), len(rows))
            if row >= LABEL_ROWS or (rect.top() + 2 + (row + 1) * row_h) > rect.bottom():
                label.setVisible(False)  # no room: the line (and its tooltip) still say it
                continue
            if row == len(rows):
                rows.append(0.0)
            rows[row] = left + w
            top = rect.top() + 2 + row * row_h
            label.setPos(vb.mapSceneToView(QPointF(left, top)))
            label.setVisible(True)
            placed.append((left, top, w, label))

    @property
    def marker_steps(self) -> list[int]:
        return [g.step for g in self._markers]

    def marker_labels(self) -> list[str]:
        """The full text of each marker of the main run, one per step."""
        return [g.text for g in self._markers]

    def marker_items(self) -> list[pg.TextItem]:
        """The label items on the loss plot (main run and overlays), shown or not."""
        return [g.label for g in [*self._markers, *(m for o in self.overlays for m in o.markers)] if g.label]

    # ------------------------------------------------------------------ export

    def export_png(self, path: str) -> None:
        if not self.glw.grab().save(path, "PNG"):
            raise OSError(f"could not write {path}")

    def export_svg(self, path: str) -> None:
        """The plots as drawn, as vector graphics (Qt's SVG painter over the whole plot area)."""
        from PySide6.QtCore import QSize
        from PySide6.QtGui import QPainter
        from PySide6.QtSvg import QSvgGenerator

        gen = QSvgGenerator()
        gen.setFileName(path)
        size = QSize(self.glw.width(), self.glw.height())
        gen.setSize(size)
        gen.setViewBox(QRectF(0, 0, size.width(), size.height()))
        gen.setTitle(f"Tunedeck: {self.history.label()}")
        painter = QPainter()
        if not painter.begin(gen):
            raise OSError(f"could not write {path}")
        try:
            self.glw.render(painter)
        finally:
            painter.end()

    # ------------------------------------------------------------------ interaction

    def _smoothing_changed(self, value: int) -> None:
        w = value / 100.0
        self.smoothing_label.setText(f"{w:.2f}")
        self.smoother.set_weight(w)
        for o in self.overlays:
            o.smoother.set_weight(w)
            o.loss.clear()
        self.c_loss.clear()
        self.refresh(force=True)

    def _log_toggled(self, on: bool) -> None:
        self.loss_plot.setLogMode(y=on)
        self.loss_plot.enableAutoRange(axis="y")
        self._view_dirty = True

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt name)
        if obj is self.glw and event.type() == QEvent.Type.Leave:
            self.clear_readout()
        return super().eventFilter(obj, event)

    def _mouse_moved(self, pos: QPointF) -> None:
        self._hover_pos = pos
        if not self._hover_timer.isActive():
            self._hover_timer.start()

    def _hover(self) -> None:
        pos = self._hover_pos
        if pos is None:
            return
        for p in self._shown():
            if p.sceneBoundingRect().contains(pos):
                x = p.vb.mapSceneToView(pos).x()
                self.show_readout(self.history.step_at(x, self.x_mode), x)
                return

    def clear_readout(self) -> None:
        for line in self.cursors:
            line.setVisible(False)
        self.readout.setText("")
        self.readout_text = ""

    def show_readout(self, step: float, x: float | None = None) -> str:
        """Move the cursors to ``step`` (at ``x`` on the axis) and describe the values there;
        returns the text (plain)."""
        self.hovered.emit(step)
        xpos = step if x is None else x
        for line in self.cursors:
            line.setPos(xpos)
            line.setVisible(True)
        h = self.history
        i = h.index_at(step)
        parts: list[tuple[str, str, str | None]] = []
        if i is not None:
            parts += self._readout_main(h, i)
        for o in self.overlays:
            oi = o.hist.index_at(o.hist.step_at(xpos, self.x_mode), clamp=False)
            if oi is None:
                continue  # beyond that run's end: it has no value here
            om = o.smoother.out.view
            v = om[oi] if oi < len(om) else o.hist.series["loss"].view[oi]
            parts.append((f"{o.hist.label()}@{int(o.hist.steps.view[oi])}", fmt_number(float(v)), o.color))
        html = "  ".join(
            f"<span style='color:{MUTED}'>{k}</span> <span style='color:{c or '#e6e6e6'}'>{v}</span>"
            for k, v, c in parts
        )
        self.readout.setText(html)
        self.readout_text = "  ".join(f"{k} {v}" for k, v, _ in parts)
        return self.readout_text

    def _readout_main(self, h: RunHistory, i: int) -> list[tuple[str, str, str | None]]:
        parts: list[tuple[str, str, str | None]] = [("step", f"{int(h.steps.view[i])}", None)]
        loss = h.series["loss"].view[i]
        parts.append(("loss", fmt_number(float(loss)), COLORS["loss"]))
        sm = self.smoother.out.view
        if i < len(sm):
            parts.append(("smoothed", fmt_number(float(sm[i])), COLORS["loss"]))
        if len(h.eval_steps):
            j = int(np.searchsorted(h.eval_steps.view, h.steps.view[i], side="right")) - 1
            if j >= 0:
                parts.append(
                    (
                        f"eval@{int(h.eval_steps.view[j])}",
                        fmt_number(float(h.eval_loss.view[j])),
                        COLORS["eval"],
                    )
                )
        parts.append(("lr", fmt_number(float(h.series["lr"].view[i])), COLORS["lr"]))
        g = float(h.series["grad_norm"].view[i])
        if math.isfinite(g):
            parts.append(("grad", fmt_number(g), COLORS["grad_norm"]))
        parts.append(("tok/s", f"{h.series['tokens_per_s'].view[i]:,.0f}", COLORS["tokens_per_s"]))
        if "mem_allocated" in h.nonzero:
            name = "alloc" if h.on_gpu else "RSS"
            parts.append((name, fmt_mb(float(h.series["mem_allocated"].view[i])), COLORS["mem_allocated"]))
        if len(h.sys_steps) and "gpu_used" in h.nonzero:
            k = max(0, int(np.searchsorted(h.sys_steps.view, h.steps.view[i], side="right")) - 1)
            parts.append(("GPU", fmt_mb(float(h.system["gpu_used"].view[k])), COLORS["gpu_used"]))
        return parts

    def leaveEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self.clear_readout()
        super().leaveEvent(event)


def _title(plot: pg.PlotItem, text: str) -> None:
    plot.setTitle(text, size="9pt")
    plot.layout.setRowFixedHeight(0, TITLE_PX)  # setTitle puts back its own 30 px each time
    plot.titleLabel.setMaximumHeight(TITLE_PX)


class PerCore:
    """The process CPU share as a percentage of all cores (psutil counts 100 per busy core),
    extended as the source grows."""

    def __init__(self) -> None:
        self.out = Series(256)
        self._src: Series | None = None
        self._gen = -1

    def update(self, cpu: Series) -> Series:
        if cpu is not self._src or cpu.gen != self._gen or len(self.out) > len(cpu):
            self.out.clear()
            self._src, self._gen = cpu, cpu.gen
        if len(self.out) < len(cpu):
            self.out.extend(cpu.view[len(self.out) :] / CPUS)
        return self.out
