"""The plots as a user drives them: zoom and follow, the read-out, change markers, memory on each
device, log ticks, the x axis, exports, overlaid runs."""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
import pytest
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtGui import QImage, QMouseEvent, QPainter, QWheelEvent
from PySide6.QtWidgets import QApplication

from tunedeck.engine.protocol import ChangeEvent, EvalEvent, StartEvent, StepEvent, SystemEvent
from tunedeck.gui.history import RunHistory
from tunedeck.gui.widgets.plots import PlotPanel, linear_ticks, log_ticks


def decaying(h: RunHistory, n: int, start: int = 1, tokens: int = 100) -> None:
    """Loss from ~4 down to ~1, so the late part of the run lies well below the early part."""
    for s in range(start, start + n):
        h.add(
            StepEvent(
                step=s,
                loss=1.0 + 3.0 * math.exp(-s / 40),
                learning_rate=1e-4,
                grad_norm=1.0,
                tokens=tokens,
                tokens_per_s=500.0,
                mem_allocated_mb=100.0,
                elapsed_s=s * 0.5,
                total_steps=1000,
            )
        )


@pytest.fixture
def panel(qtbot):
    def make(steps: int = 300, size: tuple[int, int] = (1000, 700)) -> tuple[PlotPanel, RunHistory]:
        p = PlotPanel()
        p._timer.stop()  # the test drives the refreshes
        qtbot.addWidget(p)
        p.resize(*size)
        p.show()
        qtbot.waitExposed(p)
        h = RunHistory()
        p.set_history(h)
        decaying(h, steps)
        p.refresh(force=True)
        qtbot.wait(10)
        return p, h

    return make


def scene_to_viewport(p: PlotPanel, plot: pg.PlotItem, x: float, y: float) -> QPointF:
    return QPointF(p.glw.mapFromScene(plot.vb.mapViewToScene(pg.Point(x, y))))


def wheel(p: PlotPanel, plot: pg.PlotItem, x: float, y: float, clicks: int) -> None:
    pos = scene_to_viewport(p, plot, x, y)
    vp = p.glw.viewport()
    ev = QWheelEvent(
        pos,
        QPointF(vp.mapToGlobal(pos.toPoint())),
        QPoint(0, 0),
        QPoint(0, 120 * clicks),
        Qt.MouseButton.NoButton,
        Qt.KeyboardModifier.NoModifier,
        Qt.ScrollPhase.NoScrollPhase,
        False,
    )
    QApplication.sendEvent(vp, ev)


def drag(p: PlotPanel, plot: pg.PlotItem, a: tuple[float, float], b: tuple[float, float], button) -> None:
    """A mouse drag from view point ``a`` to ``b`` on ``plot``, in a few moves (as a hand would)."""
    vp = p.glw.viewport()
    pa, pb = scene_to_viewport(p, plot, *a), scene_to_viewport(p, plot, *b)

    def send(kind, pos, buttons):
        ev = QMouseEvent(
            kind, pos, QPointF(vp.mapToGlobal(pos.toPoint())), button, buttons, Qt.KeyboardModifier.NoModifier
        )
        QApplication.sendEvent(vp, ev)

    send(QMouseEvent.Type.MouseButtonPress, pa, button)
    for t in np.linspace(0, 1, 8)[1:]:
        send(QMouseEvent.Type.MouseMove, pa + (pb - pa) * float(t), button)
    send(QMouseEvent.Type.MouseButtonRelease, pb, Qt.MouseButton.NoButton)


def x_range(p: PlotPanel) -> tuple[float, float]:
    lo, hi = p.loss_plot.vb.viewRange()[0]
    return lo, hi


# ---------------------------------------------------------------------- 1. zoom, pan, follow


def test_wheel_zooms_x_only_and_y_follows_the_data_in_view(panel, qtbot):
    p, h = panel()
    lo0, hi0 = x_range(p)
    y_top0 = p.loss_plot.vb.viewRange()[1][1]
    assert y_top0 > 3.5  # the whole run: the early loss of ~4 is in view
    wheel(p, p.loss_plot, 250, 1.2, clicks=4)  # zoom in around step 250
    p.refresh()
    qtbot.wait(20)
    lo, hi = x_range(p)
    assert hi - lo < 0.7 * (hi0 - lo0) and lo < 250 < hi  # x zoomed around the mouse
    y_lo, y_hi = p.loss_plot.vb.viewRange()[1]
    in_view = h.y("loss")[(h.x() >= lo) & (h.x() <= hi)]
    # y was not zoomed by the wheel but follows the data in view: the late loss fills the plot
    assert y_hi < 1.0 + 3.0 * math.exp(-lo / 40) + 0.2 and y_lo <= in_view.min() and y_hi >= in_view.max()
    assert not p.following  # the newest step (300) left the view


def test_zooming_at_the_live_edge_keeps_following_with_that_width(panel, qtbot):
    p, h = panel()
    _, hi0 = x_range(p)
    wheel(p, p.loss_plot, 299, 1.2, clicks=5)
    lo, hi = x_range(p)
    assert lo <= 300 <= hi and p.following and p.follow_width == pytest.approx(hi - lo)
    decaying(h, 100, start=301)
    p.refresh()
    lo2, hi2 = x_range(p)
    assert lo2 <= 400 <= hi2 and hi2 - lo2 == pytest.approx(hi - lo)  # slid along, same width


def test_a_pan_away_stops_following_and_a_pan_back_resumes(panel, qtbot):
    p, h = panel()
    wheel(p, p.loss_plot, 299, 1.2, clicks=5)  # a sliding window at the end
    lo, hi = x_range(p)
    w = hi - lo
    drag(p, p.loss_plot, (lo + 0.2 * w, 1.5), (lo + 0.9 * w, 1.5), Qt.MouseButton.LeftButton)  # look back
    lo2, hi2 = x_range(p)
    assert hi2 < 300 and not p.following and not p.follow_button.isChecked()
    decaying(h, 50, start=301)
    p.refresh()
    assert x_range(p) == pytest.approx((lo2, hi2))  # looking back: new steps do not move the view
    # pan forwards, a piece at a time: following comes back exactly when the newest step (350) does
    for _ in range(8):
        a, b = x_range(p)
        y = sum(p.loss_plot.vb.viewRange()[1]) / 2  # on the plot, wherever its y range now lies
        drag(p, p.loss_plot, (a + 0.7 * (b - a), y), (a + 0.3 * (b - a), y), Qt.MouseButton.LeftButton)
        a, b = x_range(p)
        assert p.following == (a <= 350 <= b), (a, b)
        if p.following:
            break
    assert p.following and p.follow_button.isChecked()
    decaying(h, 50, start=351)
    p.refresh()
    assert x_range(p)[0] <= 400 <= x_range(p)[1]


def test_the_follow_button_returns_to_the_newest_step(panel, qtbot):
    p, h = panel()
    p.show_range(20, 60)
    assert not p.following and not p.follow_button.isChecked()
    p.follow_button.click()
    assert p.following
    lo, hi = x_range(p)
    assert lo <= 300 <= hi and hi - lo == pytest.approx(40, rel=0.05)


def test_right_drag_zooms_to_a_box(panel, qtbot):
    p, h = panel()
    drag(p, p.loss_plot, (50, 2.8), (120, 1.4), Qt.MouseButton.RightButton)
    lo, hi = x_range(p)
    y_lo, y_hi = p.loss_plot.vb.viewRange()[1]
    assert lo == pytest.approx(50, abs=2) and hi == pytest.approx(120, abs=2)
    assert y_lo == pytest.approx(1.4, abs=0.1) and y_hi == pytest.approx(2.8, abs=0.1)
    assert not p.following
    for other in p.plots[1:]:  # one x range for all
        assert other.vb.viewRange()[0] == pytest.approx([lo, hi], abs=1)
    p.fit()
    p.refresh()
    qtbot.wait(20)
    assert p.following and p.loss_plot.vb.viewRange()[1][1] > 3.5


# ---------------------------------------------------------------------- 2. the read-out


def test_the_read_out_never_sizes_the_panel_and_clears_when_the_mouse_leaves(panel, qtbot):
    p, h = panel(size=(700, 500))
    hint = p.minimumSizeHint().width()
    others = []
    for i in range(6):  # a long read-out: six overlaid runs
        o = RunHistory(run_id=f"a-rather-long-run-name-{i}")
        decaying(o, 280)
        others.append(o)
    p.set_overlays(others)
    text = p.show_readout(150)
    assert text.count("@150") == 6 and len(text) > 250
    qtbot.wait(10)
    assert p.minimumSizeHint().width() == hint and p.width() == 700
    assert p.readout.width() <= p.width()
    QApplication.sendEvent(p.glw, pg.QtCore.QEvent(pg.QtCore.QEvent.Type.Leave))
    assert p.readout.text() == "" and p.readout_text == ""
    assert not any(c.isVisible() for c in p.cursors)


# ---------------------------------------------------------------------- 5. change markers


def test_one_label_per_step_merged_and_laid_out_without_overlap(panel, qtbot):
    p, h = panel(steps=100, size=(900, 600))
    # a user change and the engine's follow-up at one step, then several close together
    h.add(ChangeEvent(step=40, changes={"gradient_accumulation_steps": [1, 4]}))
    h.add(ChangeEvent(step=40, changes={"total_steps": [1000, 260]}, source="auto"))
    for s in (42, 44, 46, 99):
        h.add(ChangeEvent(step=s, changes={"learning_rate": [1e-4, 2e-4], "weight_decay": [0.0, 0.01]}))
    decaying(h, 1, start=101)
    p.refresh(force=True)
    qtbot.wait(10)
    p.refresh(force=True)
    assert p.marker_steps == [40, 42, 44, 46, 99]
    assert p.marker_labels()[0] == "gradient_accumulation_steps 1→4; auto: total_steps 1000→260"
    # lines on every plot, labels on the loss plot only
    for pl in p.plots:
        assert sum(isinstance(i, pg.InfiniteLine) and i.value() == 40 for i in pl.items) == 1
    labels = [g for g in p.marker_items() if g.isVisible()]
    assert len(labels) == 5
    assert all(g in p.loss_plot.items for g in labels)
    view = p.loss_plot.vb.sceneBoundingRect()
    rects = [g.sceneBoundingRect() for g in labels]
    for r in rects:
        assert view.contains(r), (view, r)  # never clipped by the plot's edges (the live edge included)
    for i, a in enumerate(rects):
        for b in rects[i + 1 :]:
            assert not a.intersects(b)
    # the full text on hover, even where the label is cut
    assert labels[1].toolTip() == "step 42: learning_rate 1e-4→2e-4, weight_decay 0→0.01"
    assert len(labels[0].textItem.toPlainText()) <= 38 and labels[0].toolTip().endswith(
        "total_steps 1000→260"
    )
    # no legend box over the data and labels: the curve names are in the title line
    assert p.loss_plot.legend is None and "smoothed" in p.loss_plot.titleLabel.text


def test_marker_labels_move_with_the_view(panel, qtbot):
    p, h = panel(steps=100)
    h.add(ChangeEvent(step=30, changes={"learning_rate": [1e-4, 2e-4]}))
    p.refresh(force=True)
    label = p.marker_items()[0]
    x_before = label.sceneBoundingRect().left()
    p.show_range(20, 60)
    p.refresh()
    assert label.isVisible() and label.sceneBoundingRect().left() > x_before
    p.show_range(50, 90)
    p.refresh()
    assert not label.isVisible()  # its step is out of view


# ---------------------------------------------------------------------- 6. memory on each device


def test_on_a_cpu_the_memory_plot_shows_process_rss_and_the_machine(panel, qtbot):
    p, h = panel(steps=0)
    h.add(StartEvent(run_id="cpu", model={"device": "cpu"}, total_steps=10))
    for s in range(1, 11):
        h.add(StepEvent(step=s, loss=1.0, mem_allocated_mb=700.0, mem_reserved_mb=700.0, mem_peak_mb=750.0))
        h.add(SystemEvent(rss_mb=700.0, cpu_percent=150.0))
        h.set_host_memory(12_000.0, 24_000.0)
    p.refresh(force=True)
    shown = {c.name for c in p._main_curves if c.plot is p.mem_plot and c.item.isVisible() and c.has_data}
    assert shown == {"process RSS", "peak RSS"}
    assert "torch" not in p.mem_plot.titleLabel.text
    assert "system 11.7 GB of 23.4 GB used" in p.mem_plot.titleLabel.text
    assert p.mem_plot.getAxis("left").tickStrings([0.0, 512.0], 1, 256) == ["0 MB", "512 MB"]
    # CPU use as a share of all cores
    _, y = p.c_util["cpu"].item.getOriginalDataset()
    import os

    assert y[-1] == pytest.approx(150.0 / (os.cpu_count() or 1))


def test_on_a_gpu_the_memory_plot_shows_the_allocator_and_the_device(panel, qtbot):
    p, h = panel(steps=0)
    h.add(StartEvent(run_id="gpu", model={"device": "cuda:0"}, total_steps=10))
    for s in range(1, 11):
        h.add(
            StepEvent(step=s, loss=1.0, mem_allocated_mb=9000.0, mem_reserved_mb=12000.0, mem_peak_mb=15000.0)
        )
        h.add(
            SystemEvent(
                rss_mb=3000.0,
                cpu_percent=100.0,
                gpu_util=97.0,
                gpu_mem_used_mb=16000.0,
                gpu_mem_total_mb=81920.0,
            )
        )
    p.refresh(force=True)
    shown = {c.name for c in p._main_curves if c.plot is p.mem_plot and c.item.isVisible() and c.has_data}
    assert shown == {"torch allocated", "torch reserved", "torch peak", "GPU used", "GPU total"}
    axis = p.mem_plot.getAxis("left")
    spacing, values = axis.tickValues(0, 81920, 200)[0]
    assert spacing % 1024 == 0 and axis.tickStrings(values, 1, spacing)[1].endswith(" GB")
    assert "GPU" in p.util_plot.titleLabel.text
    assert "alloc 8.79 GB" in p.show_readout(5) and "GPU 15.6 GB" in p.readout_text


# ---------------------------------------------------------------------- 7. tick labels


def label_rects(axis: pg.AxisItem) -> list:
    img = QImage(10, 10, QImage.Format.Format_ARGB32)
    painter = QPainter(img)
    try:
        specs = axis.generateDrawSpecs(painter)
    finally:
        painter.end()
    return [] if specs is None else [r for r, _flags, text in specs[2] if text]


@pytest.mark.parametrize("span", [(0.5, 1.5), (2.1, 4.3), (0.05, 6.0), (1e-4, 10.0)])
def test_log_y_labels_never_pile_up(panel, qtbot, span):
    p, h = panel(steps=0, size=(900, 480))  # a loss plot ~150 px tall, as on a laptop
    lo, hi = span
    for s, v in enumerate(np.geomspace(hi, lo, 200), start=1):
        h.add(StepEvent(step=s, loss=float(v)))
    p.log_y.setChecked(True)
    p.refresh(force=True)
    qtbot.wait(20)
    rects = label_rects(p.loss_plot.getAxis("left"))
    assert len(rects) >= 2
    for i, a in enumerate(rects):
        for b in rects[i + 1 :]:
            assert not a.intersects(b), (span, a, b)


def test_small_plots_keep_their_labels_apart(qtbot):
    """On a small screen the small plots are short: every y axis still shows separate labels."""
    p = PlotPanel()
    qtbot.addWidget(p)
    p.resize(900, 460)
    p.show()
    h = RunHistory()
    p.set_history(h)
    decaying(h, 50)
    for _ in range(50):
        h.add(SystemEvent(rss_mb=700.0, cpu_percent=190.0))
    p.refresh(force=True)
    qtbot.wait(20)
    for pl in p.plots:
        rects = label_rects(pl.getAxis("left"))
        assert len(rects) >= 2, pl.titleLabel.text
        for i, a in enumerate(rects):
            for b in rects[i + 1 :]:
                assert not a.intersects(b), pl.titleLabel.text


def test_tick_helpers():
    assert log_ticks(math.log10(0.5), math.log10(1.5), 200) == pytest.approx([0.6, 0.8, 1.0, 1.2, 1.4])
    assert log_ticks(-2, 1, 300) == pytest.approx([0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10])
    assert linear_ticks(0, 100, 60) == (50, [0, 50, 100])
    assert linear_ticks(0.9, 2.1, 30) == (1, [1, 2])  # a short axis: two labels, a label's height apart


# ---------------------------------------------------------------------- x axis, export, overlays


def test_the_x_axis_counts_steps_tokens_or_time(panel, qtbot):
    p, h = panel(steps=100)
    h.add(EvalEvent(step=50, eval_loss=1.5, perplexity=4.5))
    h.add(ChangeEvent(step=60, changes={"learning_rate": [1e-4, 2e-4]}))
    p.refresh(force=True)
    p.x_axis.setCurrentIndex(p.x_axis.findData("tokens"))
    assert p.x_mode == "tokens"
    x, _ = p.c_loss_raw.item.getOriginalDataset()
    assert x[0] == 100 and x[-1] == 10_000  # 100 tokens a step
    ex, _ = p.c_eval.item.getOriginalDataset()
    assert list(ex) == [5_000]
    assert p._markers[0].lines[0].value() == 6_000
    assert p.x_axes[-1].tickStrings([5000.0, 1.5e6], 1, 5000) == ["5k", "1.5M"]
    assert "tokens seen" in p.plots[-1].getAxis("bottom").labelText
    p.set_x_mode("time")
    x, _ = p.c_loss_raw.item.getOriginalDataset()
    assert x[-1] == 50.0  # elapsed_s
    assert p.x_axes[-1].tickStrings([65.0, 3725.0], 1, 60) == ["1:05", "1:02:05"]
    # the read-out still speaks in steps
    assert p.show_readout(h.step_at(25.0, "time"), 25.0).startswith("step 50 ")


def test_plots_export_as_png_and_svg(panel, qtbot, tmp_path):
    from PySide6.QtGui import QImage

    p, h = panel(steps=50)
    p.export_png(str(tmp_path / "plots.png"))
    img = QImage(str(tmp_path / "plots.png"))
    assert img.width() == p.glw.width() and img.height() == p.glw.height()
    p.export_svg(str(tmp_path / "plots.svg"))
    svg = (tmp_path / "plots.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "<path" in svg


def test_overlaid_runs_have_their_colours_names_and_markers_and_no_value_past_their_end(panel, qtbot):
    p, h = panel(steps=0)  # nothing of its own: only the runs overlaid from the library
    decaying(h, 0)
    runs = []
    for i, n in enumerate((40, 60, 80)):
        o = RunHistory(run_id=f"run-{i}")
        decaying(o, n)
        o.add(ChangeEvent(step=n // 2, changes={"learning_rate": [1e-4, 5e-5]}))
        runs.append(o)
    p.set_overlays(runs)
    p.refresh(force=True)
    qtbot.wait(50)  # the y range follows the new data at the next paint: the labels follow it
    view = p.loss_plot.vb.sceneBoundingRect()
    shown = [g for g in p.marker_items() if g.isVisible()]
    assert len(shown) == 3 and all(view.contains(g.sceneBoundingRect()) for g in shown)
    assert all(g.sceneBoundingRect().top() < view.top() + 100 for g in shown)  # in rows under the top
    colours = [o.color for o in p.overlays]
    assert len(set(colours)) == 3
    title = p.loss_plot.titleLabel.text
    assert all(f"run-{i}" in title for i in range(3))
    for o in p.overlays:
        assert len(o.markers) == 1 and o.markers[0].color == o.color
        assert o.markers[0].text.startswith(o.hist.label() + ": learning_rate")
    text = p.show_readout(70)
    assert text.startswith("run-")  # no main run: only the overlaid ones
    assert "run-0@" not in text and "run-1@" not in text and "run-2@70" in text  # past their ends: no value
    p.set_overlays([])
    assert all(m not in p.loss_plot.items for m in [g.label for o in runs for g in []])
    assert not p.overlays and len(p.marker_items()) == 0
