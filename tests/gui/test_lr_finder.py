"""Find LR from the window (real engine): before a run and while paused, the curve, and Use."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tunedeck.engine.protocol import LrFindEvent
from tunedeck.gui.widgets.lr_finder import LrFinderPanel
from tunedeck.gui.widgets.summary import NO_RUN


def test_the_panel_plots_the_curve_and_offers_both_suggestions(qtbot):
    panel = LrFinderPanel()
    qtbot.addWidget(panel)
    assert not panel.use_steepest.isEnabled()
    lrs = [1e-5 * 10 ** (i / 4) for i in range(13)]
    losses = [6.0 - 0.1 * i for i in range(10)] + [5.5, 6.5, 9.0]
    ev = LrFindEvent(
        step=3, lrs=lrs, losses=losses, smoothed=losses, suggestion=0.0012345, lr_min_div_10=3.1e-4
    )
    panel.show_result(ev)
    x, y = panel.smooth.getData()
    assert len(x) == 13 and list(y) == losses  # log mode: x is plotted as log10(lr)
    assert math.isclose(float(x[0]), -5.0)
    assert panel.steepest.value() == math.log10(0.0012345) and panel.min_div_10.value() == math.log10(3.1e-4)
    assert panel.use_steepest.text() == "Use 1.23e-3 (suggestion)"
    assert panel.use_min.text() == "Use 3.1e-4 (minimum/10)"
    assert panel.summary.text().startswith("Suggested learning rate 1.23")
    with qtbot.waitSignal(panel.use) as got:
        panel.use_steepest.click()
    assert got.args == [0.00123]
    panel.steps_box.setValue(12)
    panel.start_edit.setText("1e-5")
    assert (panel.options().start_lr, panel.options().steps) == (1e-5, 12)
    panel.end_edit.setText("1e-6")
    try:
        panel.options()
    except Exception as e:
        assert e.one_line() == "find_lr start_lr=1e-05 is out of range (give above 0 and below end_lr)"
    else:
        raise AssertionError("a range that falls is refused")


def test_find_before_a_run_and_while_paused(make_window, make_config, qtbot):
    win = make_window()
    win.set_config(make_config("train.max_steps=400", "train.learning_rate=1e-3"))
    win.lr_finder.steps_box.setValue(6)
    win.lr_finder.start_edit.setText("1e-4")
    win.lr_finder.end_edit.setText("0.1")
    assert win.controls.find_lr_action.isEnabled()

    # Before a run: a session that only measures, then the window is idle again, nothing trained.
    win.controls.find_lr_action.trigger()
    assert not win.setup.isEnabled()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=90_000)
    ev = win.lr_finder.result
    assert ev is not None and ev.step == 0 and len(ev.lrs) == 6 and ev.lrs[0] == 1e-4
    assert win.setup.isEnabled() and win.controls.start_action.isEnabled() and not len(win.history)
    saved = json.loads(Path(ev.path).read_text())
    assert saved["lrs"] == ev.lrs and not (Path(ev.path).parent / "final").exists()
    assert "learning-rate range test over 6 steps" in win.log.text()
    # its result is the curve, not a run: no summary of a run that trained nothing
    assert win.summary.summary is None and win.summary.title.text() == NO_RUN
    assert win.status.step_label.text() == "learning-rate range test done"
    assert not win.lr_finder_dock.visibleRegion().isEmpty()
    assert ev.suggestion is not None and win.lr_finder.use_steepest.isEnabled()
    win.lr_finder.use_steepest.click()
    chosen = float(f"{ev.suggestion:.3g}")
    assert win.setup.form.editor("train.learning_rate").value() == chosen
    assert "for the next run" in win.log.text()

    # While paused: the range test on the run as it is, and Use applies its suggestion live.
    win.controls.start_action.trigger()
    qtbot.waitUntil(lambda: len(win.history) >= 2, timeout=60_000)
    assert not win.controls.find_lr_action.isEnabled()  # not while it trains
    win.controls.pause_action.trigger()
    qtbot.waitUntil(lambda: win.status.state == "paused", timeout=20_000)
    assert win.controls.find_lr_action.isEnabled()
    paused_at = win.bridge.step
    win.controls.find_lr_action.trigger()
    qtbot.waitUntil(lambda: win.lr_finder.result is not ev, timeout=60_000)
    second = win.lr_finder.result
    assert second.step == paused_at and win.status.state == "paused" and win.bridge.step == paused_at
    # Whichever suggestion differs from the learning rate the run has (the first find's, rounded).
    pick = (
        win.lr_finder.use_steepest if float(f"{second.suggestion:.3g}") != chosen else win.lr_finder.use_min
    )
    second_lr = float(
        f"{(second.suggestion if pick is win.lr_finder.use_steepest else second.lr_min_div_10):.3g}"
    )
    assert second_lr != chosen
    pick.click()
    qtbot.waitUntil(lambda: bool(win.plots.marker_steps), timeout=20_000)
    assert win.plots.marker_steps[0] == paused_at
    assert win.run_config is not None and win.setup.form.baseline["learning_rate"] == second_lr
    win.controls.stop_action.trigger()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=60_000)
