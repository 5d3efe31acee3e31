"""Live plots: loss, learning rate, gradient norm, throughput and memory against the optimizer step.

All plots share one x range (``setXLink``), so zooming one zooms all. Curves read the numpy
buffers of a :class:`~tunedeck.gui.history.RunHistory` and are redrawn by a timer at most ~20 times a
second, only when the history moved, and within a small share of the GUI thread (``MAX_DUTY``).
Each curve is handed only what is in view, reduced to about two points per pixel by a min/max
pyramid (:class:`~tunedeck.gui.history.Envelope`), with pyqtgraph's peak downsampling and clip-to-view on
top, so a million points per series stay smooth. Live changes (``change`` events) get a labelled
vertical marker on every plot; moving the mouse over any plot shows the values at that step.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QLineF, QRectF, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QPen
from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QPushButton, QSlider, QVBoxLayout, QWidget

from tunedeck.gui.history import Change, Envelope, RunHistory, Series, Smoother, fmt_number
from tunedeck.gui.widgets.branches import RollbackLayer
from tunedeck.gui.widgets.theme import COLORS, GRID, GRID_MINOR, MUTED

REDRAW_MS = 50  # at most 20 redraws a second, whatever the step rate
# ...and live redraws take at most this share of the GUI thread: where a redraw is slow (a big
# window, software rendering, a busy CPU) they come less often, so training keeps the CPU and the GIL.
MAX_DUTY = 0.05
MAX_INTERVAL_S = 0.5


def _pen(color: str, width: int = 1, dash: bool = False) -> pg.QtGui.QPen:
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

    def boundingRect(self) -> QRectF:
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
    """A GraphicsLayoutWidget that remembers how long its last paint took (for the redraw budget)."""

    last_paint_s = 0.0

    def paintEvent(self, ev) -> None:  # noqa: N802 (Qt name)
        t = time.perf_counter()
        super().paintEvent(ev)
        self.last_paint_s = time.perf_counter() - t


class Curve:
    """A PlotDataItem fed through an :class:`Envelope`: only what is in view, at screen resolution.

    It joins its plot's legend (if the plot has one) once it has data.
    """

    def __init__(
        self,
        plot: pg.PlotItem,
        name: str,
        color: str,
        width: int = 1,
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
        self._in_legend = False

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
        self.has_data = True
        if not self._in_legend and self.plot.legend is not None:
            self.plot.legend.addItem(self.item, self.name)
            self._in_legend = True

    def clear(self) -> None:
        self._key = None
        self.has_data = False
        self.item.setData([], [])
        if self._in_legend and self.plot.legend is not None:
            self.plot.legend.removeItem(self.item)
            self._in_legend = False

    def set_visible(self, on: bool) -> None:
        self.item.setVisible(on)


class PlotPanel(QWidget):
    """The five live plots, their toolbar (smoothing, log-y, reset) and a hover read-out."""

    hovered = Signal(float)  # the step under the mouse

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.history = RunHistory()
        self.overlay: RunHistory | None = None
        self._drawn = (-1, -1)  # (history version, overlay version) last drawn
        self._view_dirty = False
        self._envelopes: dict[int, Envelope] = {}
        # Following: the x range grows in steps (see _follow), so the axes are not redone every frame.
        self.following = True
        self._follow_hi = 0.0
        self._markers: list[tuple[Change, list[pg.InfiniteLine]]] = []
        self.smoother = Smoother(0.6)
        self.overlay_smoother = Smoother(0.6)
        self.redraws = 0
        self.readout_text = ""  # the hover read-out, as plain text

        # -- toolbar
        bar = QHBoxLayout()
        bar.setContentsMargins(6, 2, 6, 2)
        bar.addWidget(QLabel("Smoothing"))
        self.smoothing = QSlider(Qt.Orientation.Horizontal)
        self.smoothing.setRange(0, 99)
        self.smoothing.setValue(60)
        self.smoothing.setFixedWidth(140)
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
        self.reset_zoom = QPushButton("Fit")
        self.reset_zoom.setToolTip(
            "Zoom out to show every step and follow new ones (or double-click a plot)."
        )
        bar.addWidget(self.reset_zoom)
        self.readout = QLabel("")
        self.readout.setTextFormat(Qt.TextFormat.RichText)
        self.readout.setStyleSheet(f"color: {MUTED};")
        bar.addWidget(self.readout, 1)

        # -- plots
        self.glw = TimedLayout()
        self.glw.ci.setSpacing(2)
        # One column: X-linked views line up on screen, so one step is one vertical line everywhere.
        titles = ["loss", "learning rate", "gradient norm", "throughput (tokens/s)", "memory (MB)"]
        self.titles = titles
        self._title_keys: dict[int, tuple] = {}
        self.plots = [self.glw.addPlot(row=i, col=0) for i in range(len(titles))]
        self.loss_plot, self.lr_plot, self.grad_plot, self.tput_plot, self.mem_plot = self.plots
        for i, stretch in enumerate((3, 1, 1, 1, 1)):
            self.glw.ci.layout.setRowStretchFactor(i, stretch)
        for p, title in zip(self.plots, titles, strict=True):
            p.setTitle(title, size="9pt", color=MUTED)
            p.vb.addItem(GridLines(p), ignoreBounds=True)
            left, bottom = p.getAxis("left"), p.getAxis("bottom")
            left.setWidth(64)
            # fewer tick levels: less to lay out and paint, and a calmer look
            left.setStyle(maxTickLevel=1, maxTextLevel=1)
            bottom.setStyle(maxTickLevel=0)
            if p is not self.plots[-1]:
                bottom.setStyle(showValues=False)
                bottom.setHeight(4)
            if p is self.loss_plot:  # top right, where a falling loss leaves room; no background
                p.addLegend(offset=(-6, 2), labelTextSize="8pt", verSpacing=-8, horSpacing=12, colCount=3)
            # the smaller plots name their curves in the title line instead (see _titles)
            p.setDownsampling(auto=True, mode="peak")
            p.setClipToView(True)
            p.hideButtons()  # the Fit button (or a double-click) replaces pyqtgraph's per-plot "A"
            if p is not self.loss_plot:
                p.setXLink(self.loss_plot)
        self.plots[-1].setLabel("bottom", "optimizer step", color=MUTED)
        self.lr_plot.getAxis("left").enableAutoSIPrefix(False)
        # Learning rate, throughput and memory are read against zero: their y axis starts at 0 and
        # grows to the largest value in view (a flat 500 tokens/s is not drawn as wild noise).
        self.zero_based = [self.lr_plot, self.tput_plot, self.mem_plot]
        self._zero_auto = {id(p): True for p in self.zero_based}
        for p in self.zero_based:
            p.enableAutoRange(y=False)

        self.c_loss_raw = Curve(self.loss_plot, "loss", COLORS["loss_raw"], 1)
        self.c_loss = Curve(self.loss_plot, "smoothed", COLORS["loss"], 2)
        self.c_eval = Curve(self.loss_plot, "eval loss", COLORS["eval"], symbol="o")
        self.c_lr = Curve(self.lr_plot, "lr", COLORS["lr"])
        self.c_grad = Curve(self.grad_plot, "grad norm", COLORS["grad_norm"], 1)
        self.c_tput = Curve(self.tput_plot, "tokens/s", COLORS["tokens_per_s"], 1)
        self.c_mem = {
            "mem_allocated": Curve(self.mem_plot, "torch allocated", COLORS["mem_allocated"]),
            "mem_reserved": Curve(self.mem_plot, "torch reserved", COLORS["mem_reserved"]),
            "mem_peak": Curve(self.mem_plot, "torch peak", COLORS["mem_peak"], 1, dash=True),
        }
        self.c_sys = {
            "gpu_used": Curve(self.mem_plot, "GPU used", COLORS["gpu_used"]),
            "gpu_total": Curve(self.mem_plot, "GPU total", COLORS["gpu_total"], 1, dash=True),
            "rss": Curve(self.mem_plot, "process RSS", COLORS["rss"]),
        }
        # overlay (a second run to compare with): dashed, in one neutral colour
        oc = COLORS["overlay"]
        self.o_loss = Curve(self.loss_plot, "compare", oc, 1, dash=True)
        self.o_eval = Curve(self.loss_plot, "compare eval", oc, symbol="t")
        self.o_lr = Curve(self.lr_plot, "compare", oc, 1, dash=True)
        self.o_grad = Curve(self.grad_plot, "compare", oc, 1, dash=True)
        self.o_tput = Curve(self.tput_plot, "compare", oc, 1, dash=True)
        self.o_mem = Curve(self.mem_plot, "compare", oc, 1, dash=True)
        self.overlay_curves = [self.o_loss, self.o_eval, self.o_lr, self.o_grad, self.o_tput, self.o_mem]
        self._curves: dict[int, list[Curve]] = {}
        for c in (
            self.c_lr,
            self.c_grad,
            self.c_tput,
            *self.c_mem.values(),
            *self.c_sys.values(),
            self.o_lr,
            self.o_grad,
            self.o_tput,
            self.o_mem,
        ):
            self._curves.setdefault(id(c.plot), []).append(c)
        for c in self.overlay_curves:
            c.set_visible(False)

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
        for p in self.plots:
            p.vb.sigRangeChangedManually.connect(self._manual_range)
        self.glw.scene().sigMouseClicked.connect(self._clicked)
        self._mouse_proxy = pg.SignalProxy(
            self.glw.scene().sigMouseMoved, rateLimit=30, slot=self._mouse_moved
        )

        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        lay.addLayout(bar)
        lay.addWidget(self.glw, 1)

        self.smoothing.valueChanged.connect(self._smoothing_changed)
        self.show_raw.toggled.connect(lambda on: (self.c_loss_raw.set_visible(on), self.refresh(force=True)))
        self.log_y.toggled.connect(self._log_toggled)
        self.reset_zoom.clicked.connect(self.fit)

        self._next_ok = 0.0
        self._timer = QTimer(self)
        self._timer.setInterval(REDRAW_MS)
        self._timer.timeout.connect(self._tick)
        self._timer.start()

    def _tick(self) -> None:
        """Timer: redraw new data within the time budget; a zoom or pan is redrawn at once."""
        now = time.perf_counter()
        if not self._view_dirty and now < self._next_ok:
            return
        t = time.perf_counter()
        if self.refresh():
            cost = (time.perf_counter() - t) + self.glw.last_paint_s
            self._next_ok = now + min(MAX_INTERVAL_S, cost / MAX_DUTY)

    # ------------------------------------------------------------------ data

    def set_history(self, hist: RunHistory) -> None:
        """Show ``hist`` as the main run (a fresh live run, or a past one opened from disk)."""
        self.history = hist
        self.smoother.reset()
        for _, lines in self._markers:
            for line, p in zip(lines, self.plots, strict=False):
                p.removeItem(line)
        self._markers.clear()
        for c in (
            self.c_loss_raw,
            self.c_loss,
            self.c_eval,
            self.c_lr,
            self.c_grad,
            self.c_tput,
            *self.c_mem.values(),
            *self.c_sys.values(),
        ):
            c.clear()
        self._envelopes.clear()
        self._drawn = (-1, -1)
        self.fit()
        self.refresh(force=True)

    def set_overlay(self, hist: RunHistory | None) -> None:
        """Draw a second run, dashed, for comparison (None removes it)."""
        self.overlay = hist
        self.overlay_smoother.reset()
        for c in self.overlay_curves:
            c.clear()
            c.set_visible(hist is not None)
        if hist is not None:
            for c in self.overlay_curves:
                c.name = f"{hist.label()}" + (" eval" if c is self.o_eval else "")
        self.refresh(force=True)

    def fit(self) -> None:
        """Show every step and follow new ones (the Fit button, or a double-click on a plot)."""
        self.following = True
        self._follow_hi = 0.0
        for p in self.plots:
            if p in self.zero_based:
                self._zero_auto[id(p)] = True
            else:
                p.enableAutoRange(y=True)
                p.setAutoVisible(y=True)
        self._view_dirty = True

    def _no_x_autorange(self) -> None:
        # Every linked view must stop auto-ranging x, or the first one to fit its own data drags
        # the others (and the loss plot) along.
        for p in self.plots:
            p.vb.enableAutoRange(x=False)

    def show_range(self, lo: float, hi: float) -> None:
        """Zoom every plot to steps [lo, hi] and stop following (as a mouse zoom does)."""
        self.following = False
        self._no_x_autorange()
        self.loss_plot.setXRange(lo, hi, padding=0)
        self._view_dirty = True

    def _clicked(self, ev) -> None:
        if ev.double():
            self.fit()
            self.refresh(force=True)

    def _manual_range(self, *_args) -> None:
        self.following = False
        for p in self.zero_based:
            if not p.vb.autoRangeEnabled()[1] and p.vb is self.sender():
                self._zero_auto[id(p)] = False

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
        """While following, widen the x range to the next round number once the data reaches it."""
        last = self.history.steps.last(0.0) if len(self.history) else 0.0
        if self.overlay is not None and len(self.overlay):
            last = max(last, self.overlay.steps.last(0.0))
        if last > self._follow_hi or self._follow_hi == 0.0:
            self._follow_hi = nice_ceil(max(10.0, last * 1.15))
            total = self.history.total_steps
            if total and last <= total < self._follow_hi:
                self._follow_hi = float(total)  # the planned end of the run is the natural edge
            self._no_x_autorange()
            self.loss_plot.setXRange(0, self._follow_hi, padding=0.01)

    # ------------------------------------------------------------------ drawing

    def refresh(self, force: bool = False) -> bool:
        """Redraw if the data or the view moved since the last time; True when it drew."""
        ov = self.overlay.version if self.overlay is not None else -1
        key = (self.history.version, ov)
        if key == self._drawn and not force and not self._view_dirty:
            return False
        self._drawn = key
        if self.following:
            self._follow()
        self._view_dirty = False
        self.redraws += 1
        h = self.history
        x = h.x()
        loss = h.series["loss"]
        win = self._window(x)
        if self.show_raw.isChecked():
            self._set(self.c_loss_raw, x, loss, win)
        self.smoother.update(loss.view)
        self._set(self.c_loss, x, self.smoother.out, win)
        self.c_eval.set(h.eval_steps.view, h.eval_loss.view)
        self._set(self.c_lr, x, h.series["lr"], win)
        self._set(self.c_grad, x, h.series["grad_norm"], win)
        self._set(self.c_tput, x, h.series["tokens_per_s"], win)
        for name, c in self.c_mem.items():
            if name in h.nonzero:
                self._set(c, x, h.series[name], win)
        gpu = "gpu_used" in h.nonzero
        sx = h.sys_steps.view
        swin = self._window(sx)
        for name, c in self.c_sys.items():
            if name in h.nonzero and (name != "rss" or not gpu):
                self._set(c, sx, h.system[name], swin)
        self._sync_markers()
        self.rollback.sync(h)
        if self.overlay is not None:
            o = self.overlay
            ox = o.x()
            owin = self._window(ox)
            self.overlay_smoother.update(o.series["loss"].view)
            self._set(self.o_loss, ox, self.overlay_smoother.out, owin)
            self.o_eval.set(o.eval_steps.view, o.eval_loss.view)
            self._set(self.o_lr, ox, o.series["lr"], owin)
            self._set(self.o_grad, ox, o.series["grad_norm"], owin)
            self._set(self.o_tput, ox, o.series["tokens_per_s"], owin)
            if "mem_allocated" in o.nonzero:
                self._set(self.o_mem, ox, o.series["mem_allocated"], owin)
            else:
                name = "gpu_used" if "gpu_used" in o.nonzero else "rss"
                self._set(self.o_mem, o.sys_steps.view, o.system[name], self._window(o.sys_steps.view))
        self._zero_ranges()
        self._titles()
        return True

    def _titles(self) -> None:
        """Title of each small plot: its name, then its curves in their colours (no legend box)."""
        for p, title in zip(self.plots[1:], self.titles[1:], strict=True):
            shown = [c for c in self._curves.get(id(p), []) if c.has_data and c.item.isVisible()]
            key = tuple((c.name, c.color) for c in shown)
            if self._title_keys.get(id(p)) == key:
                continue
            self._title_keys[id(p)] = key
            names = "&nbsp;&nbsp;".join(
                f"<span style='color:{c.color}'>{'┄' if c.dash else '━'} {c.name}</span>" for c in shown
            )
            sep = "&nbsp;&nbsp;&nbsp;" if names else ""
            p.setTitle(f"<span style='color:{MUTED}'>{title}</span>{sep}{names}", size="9pt")

    def _set(self, curve: Curve, x: np.ndarray, series: Series, win: tuple[int, int, int]) -> None:
        env = self._envelopes.get(id(series))
        if env is None or env.src is not series:
            env = self._envelopes[id(series)] = Envelope(series)
        env.sync()
        curve.set(x, series.view, env, win)

    def _window(self, x: np.ndarray) -> tuple[int, int, int]:
        """Index range of ``x`` in view (all of it while following) and the plots' width in pixels."""
        vb = self.loss_plot.vb
        px = max(200, int(vb.width()))
        n = len(x)
        if self.following or any(p.vb.autoRangeEnabled()[0] for p in self.plots) or n < 2:
            return 0, n, px
        x0, x1 = vb.viewRange()[0]
        i0 = max(0, int(np.searchsorted(x, x0)) - 1)
        i1 = min(n, int(np.searchsorted(x, x1, side="right")) + 1)
        return i0, i1, px

    def _xrange_changed(self, *_args) -> None:
        # Following (auto range): the data already covers the view. Zoomed or panned: re-cut.
        if not self.following and not self.loss_plot.vb.autoRangeEnabled()[0]:
            self._view_dirty = True

    def _sync_markers(self) -> None:
        changes = self.history.changes
        for i in range(len(self._markers), len(changes)):
            ch = changes[i]
            text = ch.label()
            lines = []
            for p in self.plots:
                line = pg.InfiniteLine(
                    pos=ch.step,
                    angle=90,
                    movable=False,
                    pen=_pen(COLORS["marker"], 1, dash=True),
                    label=text,
                    labelOpts={
                        "position": 0.93 - 0.12 * (i % 4),
                        "color": COLORS["marker"],
                        "fill": pg.mkBrush(27, 29, 33, 210),
                        "anchors": [(0, 0.5), (0, 0.5)],
                    },
                )
                line.setToolTip(f"step {ch.step} ({ch.source}): {text}")
                line.setZValue(10)
                p.addItem(line, ignoreBounds=True)
                lines.append(line)
            self._markers.append((ch, lines))

    @property
    def marker_steps(self) -> list[int]:
        return [ch.step for ch, _ in self._markers]

    def marker_labels(self) -> list[str]:
        return [lines[0].label.textItem.toPlainText() for _, lines in self._markers]

    # ------------------------------------------------------------------ interaction

    def _smoothing_changed(self, value: int) -> None:
        w = value / 100.0
        self.smoothing_label.setText(f"{w:.2f}")
        self.smoother.set_weight(w)
        self.overlay_smoother.set_weight(w)
        self.c_loss.clear()
        self.o_loss.clear()
        self.refresh(force=True)

    def _log_toggled(self, on: bool) -> None:
        self.loss_plot.setLogMode(y=on)
        self.loss_plot.enableAutoRange(axis="y")

    def _mouse_moved(self, args) -> None:
        pos = args[0]
        for p in self.plots:
            if p.sceneBoundingRect().contains(pos):
                step = p.vb.mapSceneToView(pos).x()
                self.show_readout(step)
                return

    def show_readout(self, step: float) -> str:
        """Move the cursors to ``step`` and describe the values there; returns the text (plain)."""
        self.hovered.emit(step)
        for line in self.cursors:
            line.setPos(step)
            line.setVisible(True)
        h = self.history
        i = h.index_at(step)
        if i is None:
            self.readout.setText("")
            self.readout_text = ""
            return ""
        parts = [("step", f"{int(h.steps.view[i])}", None)]
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
            parts.append(("alloc", f"{h.series['mem_allocated'].view[i]:,.0f} MB", COLORS["mem_allocated"]))
        if len(h.sys_steps):
            k = max(0, int(np.searchsorted(h.sys_steps.view, h.steps.view[i], side="right")) - 1)
            if "gpu_used" in h.nonzero:
                parts.append(("GPU", f"{h.system['gpu_used'].view[k]:,.0f} MB", COLORS["gpu_used"]))
            elif "rss" in h.nonzero:
                parts.append(("RSS", f"{h.system['rss'].view[k]:,.0f} MB", COLORS["rss"]))
        if self.overlay is not None:
            o = self.overlay
            oi = o.index_at(step)
            if oi is not None:
                om = self.overlay_smoother.out.view
                v = om[oi] if oi < len(om) else o.series["loss"].view[oi]
                parts.append((f"compare@{int(o.steps.view[oi])}", fmt_number(float(v)), COLORS["overlay"]))
        html = "  ".join(
            f"<span style='color:{MUTED}'>{k}</span> <span style='color:{c or '#e6e6e6'}'>{v}</span>"
            for k, v, c in parts
        )
        self.readout.setText(html)
        self.readout_text = "  ".join(f"{k} {v}" for k, v, _ in parts)
        return self.readout_text

    def leaveEvent(self, event) -> None:  # noqa: N802 (Qt name)
        for line in self.cursors:
            line.setVisible(False)
        super().leaveEvent(event)
