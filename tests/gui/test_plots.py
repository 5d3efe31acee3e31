"""The plot panel: regression for the PySide6 6.12 refcount bug, markers, hover, big data, overlay."""

from __future__ import annotations

import sys
import time

import numpy as np
import pyqtgraph as pg

from tunedeck.engine.protocol import ChangeEvent, EvalEvent, StepEvent, SystemEvent
from tunedeck.gui.history import RunHistory
from tunedeck.gui.widgets.plots import PlotPanel, nice_ceil


def feed(h: RunHistory, n: int, start: int = 1) -> None:
    for s in range(start, start + n):
        h.add(
            StepEvent(
                step=s,
                loss=3.0 / s**0.3,
                learning_rate=1e-4,
                grad_norm=1.0,
                tokens_per_s=500.0,
                mem_allocated_mb=100.0,
                total_steps=1000,
            )
        )


def shown_panel(qtbot, size: tuple[int, int], steps: int) -> tuple[PlotPanel, RunHistory]:
    """A visible panel of ``size`` following a history fed with ``steps`` steps."""
    p = PlotPanel()
    qtbot.addWidget(p)
    p.resize(*size)
    p.show()
    h = RunHistory()
    p.set_history(h)
    feed(h, steps)
    return p, h


def test_curve_updates_do_not_leak_references_to_none(qtbot):
    """PySide6 6.12.0 + pyqtgraph 0.14 on Python 3.11: every arrayToQPath call lowered
    sys.getrefcount(None) until the interpreter crashed. We pin PySide6 < 6.12; this must stay green."""
    w = pg.PlotWidget()
    qtbot.addWidget(w)
    w.show()
    curve = w.plot(pen="y")
    x = np.arange(500, dtype=float)
    curve.setData(x, np.sin(x))
    curve.curve.getPath()
    before = sys.getrefcount(None)
    for i in range(2000):
        curve.setData(x, np.sin(x + i))
        curve.curve.getPath()  # arrayToQPath
    pg.arrayToQPath(x, np.cos(x))
    after = sys.getrefcount(None)
    assert after >= before - 50, f"refcount of None fell from {before} to {after}"


def test_live_data_markers_and_hover(qtbot):
    p, h = shown_panel(qtbot, (1000, 700), 20)
    h.add(ChangeEvent(step=20, changes={"learning_rate": [1e-4, 3e-4]}))
    h.add(EvalEvent(step=20, eval_loss=1.9, perplexity=6.7))
    h.add(SystemEvent(rss_mb=321.0))
    feed(h, 10, start=21)
    assert p.refresh()
    assert not p.refresh()  # nothing new: no redraw
    x, y = p.c_loss_raw.item.getOriginalDataset()
    assert len(x) == 30 and x[-1] == 30
    assert p.marker_steps == [20]
    assert "learning_rate 1e-4→3e-4" in p.marker_labels()[0]
    # a marker on every plot
    assert all(any(isinstance(i, pg.InfiniteLine) and i.value() == 20 for i in pl.items) for pl in p.plots)
    text = p.show_readout(12.2)
    assert (
        "step 12" in text and "lr 1e-4" in text and "RSS 100 MB" in text
    )  # on a CPU the step memory is the process RSS
    # log y and smoothing redraw without trouble
    p.log_y.setChecked(True)
    p.smoothing.setValue(90)
    assert p.smoother.weight == 0.9 and len(p.smoother.out) == 30


def test_one_x_range_for_all_plots(qtbot):
    p, h = shown_panel(qtbot, (1000, 700), 500)
    p.refresh()
    p.show_range(100, 200)
    qtbot.wait(20)
    for pl in p.plots:
        lo, hi = pl.vb.viewRange()[0]
        assert abs(lo - 100) < 1 and abs(hi - 200) < 1
    p.refresh()
    x, _ = p.c_lr.item.getOriginalDataset()
    assert x[0] >= 98 and x[-1] <= 202  # only what is in view is handed to pyqtgraph
    p.fit()
    p.refresh()
    assert p.following


def test_a_million_points_per_series_stay_cheap(qtbot):
    n = 1_000_000
    h = RunHistory()
    steps = np.arange(1, n + 1, dtype=float)
    h.steps.extend(steps)
    for name, ser in h.series.items():
        ser.extend(np.sin(steps / 1000) + (name == "loss"))
    h.nonzero.update(h.series)
    h.version += 1
    p = PlotPanel()
    qtbot.addWidget(p)
    p.resize(1200, 800)
    p.show()
    p.set_history(h)
    qtbot.wait(10)
    times = []
    for _ in range(5):
        h.steps.append(h.steps.last() + 1)
        for ser in h.series.values():
            ser.append(0.5)
        h.version += 1
        t = time.perf_counter()
        p.refresh()
        p.glw.repaint()
        times.append(time.perf_counter() - t)
    x, _ = p.c_loss_raw.item.getOriginalDataset()
    assert len(x) < 10_000  # the envelope, not a million points
    assert sorted(times)[2] < 0.5  # generous: shared CI machines; see gui/perf_check.py for real figures


def test_overlay_of_a_second_run(qtbot):
    p = PlotPanel()
    qtbot.addWidget(p)
    p.show()
    a, b = RunHistory(run_id="a"), RunHistory(run_id="b")
    feed(a, 10)
    feed(b, 15)
    p.set_history(a)
    p.set_overlay(b)
    p.refresh(force=True)
    o = p.overlays[0]
    x, _ = o.loss.item.getOriginalDataset()
    assert len(x) == 15 and o.loss.item in p.loss_plot.items
    assert "b@5" in p.show_readout(5)
    p.set_overlay(None)
    assert not p.overlays and o.loss.item not in p.loss_plot.items


def test_nice_ceil():
    assert [nice_ceil(v) for v in (0.5, 9, 11, 1150, 70000)] == [0.5, 10, 12.5, 1250, 80000]


def test_hovering_with_the_mouse_shows_values(qtbot):
    from PySide6.QtCore import QPoint

    p = PlotPanel()
    qtbot.addWidget(p)
    p.resize(900, 700)
    p.show()
    qtbot.waitExposed(p)
    h = RunHistory()
    p.set_history(h)
    feed(h, 50)
    p.refresh()
    qtbot.wait(50)
    vb = p.loss_plot.vb
    centre = vb.mapViewToScene(pg.Point(25, float(h.y("loss")[24])))
    pos = p.glw.mapFromScene(centre)
    qtbot.mouseMove(p.glw.viewport(), QPoint(int(pos.x()), int(pos.y())))
    qtbot.waitUntil(lambda: p.readout_text.startswith(("step 24 ", "step 25 ", "step 26 ")), timeout=3_000)
    assert p.cursors[0].isVisible()


def test_following_grows_the_x_range_in_round_steps(qtbot):
    p, h = shown_panel(qtbot, (900, 700), 82)
    p.refresh()
    qtbot.wait(20)
    for pl in p.plots:  # every plot shows 0..100, not its own data's extent
        lo, hi = pl.vb.viewRange()[0]
        assert lo <= 0 and 100 <= hi <= 102


def test_step_to_screen_latency_is_counted_from_each_event_to_the_paint_that_shows_it():
    from tunedeck.gui.perf_check import _latencies

    events = [StepEvent(step=s, time=100.0 + s) for s in range(1, 5)]
    paints = [(0, 100.5), (2, 103.25), (3, 103.5), (4, 110.0)]  # (steps drawn, when)
    assert _latencies(events, paints) == [2.25, 1.25, 0.5, 6.0]
    assert _latencies(events, paints[:2]) == [2.25, 1.25]  # steps never painted are left out
