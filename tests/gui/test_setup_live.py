"""The setup panel around a run: Start keeps the view, Apply stays in sight, the changed mark goes
away once applied, Enter applies, and the form says where its values come from."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication, QScrollArea

from tests.gui.fake_session import factory
from tunedeck.engine import builtin
from tunedeck.engine import config as cfgmod
from tunedeck.engine.protocol import Set

ORANGE = (0xD9, 0xA3, 0x2B)  # the "changed" border (theme)


def orange_pixels(win, widget) -> int:
    """Orange pixels along the top edge of ``widget`` as the screen shows it (the offscreen
    platform keeps each window's backing store: this is what was painted, not a fresh render)."""
    img = QApplication.primaryScreen().grabWindow(win.winId()).toImage()
    top_left = widget.mapTo(win, widget.rect().topLeft())
    n = 0
    for x in range(top_left.x(), top_left.x() + widget.width()):
        c = img.pixelColor(x, top_left.y())
        if all(abs(a - b) < 24 for a, b in zip((c.red(), c.green(), c.blue()), ORANGE, strict=True)):
            n += 1
    return n


def running_window(make_window, make_config, qtbot, **kw):
    make = factory(steps=100_000, delay=0.01, **kw)
    win = make_window(factory=make)
    win.set_config(make_config("train.learning_rate=3e-3"))
    win.activateWindow()
    qtbot.waitUntil(win.isActiveWindow, timeout=2_000)
    return win, make


def test_start_keeps_the_focus_and_the_scroll_and_apply_is_pinned_in_view(make_window, make_config, qtbot):
    win, make = running_window(make_window, make_config, qtbot)
    win.resize(1280, 700)
    scroll = win.setup.findChild(QScrollArea)
    bar = scroll.verticalScrollBar()
    r = win.setup.form.editor("lora.r").widget
    scroll.ensureWidgetVisible(r)
    r.setFocus()
    qtbot.waitUntil(r.hasFocus, timeout=2_000)
    before = bar.value()
    assert before > 0  # the form is scrolled down to the LoRA group
    win.start_run()
    qtbot.waitUntil(lambda: len(win.history) > 2, timeout=10_000)
    eval_every = win.setup.form.editor("train.eval_steps").widget
    assert not eval_every.hasFocus()
    assert bar.value() == before  # the view stayed where the user left it
    # the Apply bar sits below the scroll area, in view whatever the scroll position
    apply_bar = win.setup.form.apply_bar
    assert apply_bar.isVisible() and not scroll.isAncestorOf(apply_bar)
    for value in (0, bar.maximum()):
        bar.setValue(value)
        top_left = win.setup.form.apply_button.mapTo(win.setup, win.setup.form.apply_button.rect().topLeft())
        assert win.setup.rect().contains(top_left) and win.setup.form.apply_button.isVisible()
        assert top_left.y() > scroll.geometry().bottom() - 1


def test_the_changed_mark_goes_once_applied_and_enter_applies(make_window, make_config, qtbot):
    win, make = running_window(make_window, make_config, qtbot)
    win.start_run()
    qtbot.waitUntil(lambda: win.status.state == "running" and len(win.history) > 2, timeout=10_000)
    lr = win.setup.form.editor("train.learning_rate").widget
    win.setup.findChild(QScrollArea).ensureWidgetVisible(lr)
    lr.setFocus()
    qtbot.waitUntil(lr.hasFocus, timeout=2_000)
    lr.selectAll()
    qtbot.keyClicks(lr, "1e-3")
    qtbot.wait(50)
    assert lr.property("changed") and orange_pixels(win, lr) > lr.width() // 2  # marked on screen
    qtbot.keyClick(lr, Qt.Key.Key_Return)  # Enter applies
    qtbot.waitUntil(lambda: bool(win.plots.marker_steps), timeout=10_000)
    assert [c for c in make.made[0].sent if isinstance(c, Set)] == [Set(values={"learning_rate": 1e-3})]
    qtbot.wait(50)
    assert not lr.property("changed")
    assert orange_pixels(win, lr) == 0  # repainted: no stale orange border
    assert not win.setup.form.apply_button.isEnabled()


def test_the_apply_bar_says_paused_while_paused(make_window, make_config, qtbot):
    win, make = running_window(make_window, make_config, qtbot)
    win.start_run()
    qtbot.waitUntil(lambda: win.status.state == "running", timeout=10_000)
    assert win.setup.form.apply_hint.text().startswith("The run is going")
    win.controls.pause_action.trigger()
    qtbot.waitUntil(lambda: win.status.state == "paused", timeout=10_000)
    assert win.setup.form.apply_hint.text().startswith("The run is paused")
    win.controls.pause_action.trigger()
    qtbot.waitUntil(lambda: win.status.state == "running", timeout=10_000)
    assert win.setup.form.apply_hint.text().startswith("The run is going")


def test_after_a_run_the_form_says_where_its_values_come_from_and_resets(
    make_window, make_config, qtbot, tmp_path
):
    win, make = running_window(make_window, make_config, qtbot)
    preset = tmp_path / "mine.yaml"
    cfgmod.save(make_config("train.learning_rate=3e-3"), preset)
    assert win.load_config(preset)
    assert "preset mine.yaml" in win.setup.origin_label.text()
    win.start_run()
    qtbot.waitUntil(lambda: win.status.state == "running", timeout=10_000)
    win.setup.form.editor("train.learning_rate").set_raw("1e-3")
    win.setup.form.apply_button.click()
    qtbot.waitUntil(lambda: bool(win.history.changes), timeout=10_000)
    win.stop_run()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=10_000)
    run = win.history.label()
    # the form keeps what the run ended with, and says so
    assert win.setup.config().train.learning_rate == 1e-3
    text = win.setup.origin_label.text()
    assert f"as run {run} ended" in text and "learning_rate 3e-3→1e-3" in text
    assert "The next Start uses these values" in text
    choices = [t for t, _ in win.setup.reset_choices()]
    assert choices == ["Preset mine.yaml", f"Starting settings of run {run}"]
    assert win.setup.reset_to(f"Starting settings of run {run}")
    assert win.setup.config().train.learning_rate == 3e-3
    assert win.setup.origin_label.text().startswith("Settings: <b>starting settings of run")
    win.setup.form.editor("lora.r").set_raw("16")
    assert "edited: lora.r" in win.setup.origin_label.text()
    assert win.setup.reset_to("Preset mine.yaml")
    assert win.setup.config().to_dict() == cfgmod.load(preset).to_dict()
    assert "settings reset to the preset mine.yaml" in win.log.text()


def test_a_first_launch_names_the_demo_preset_as_the_origin(make_window):
    win = make_window()
    assert f"preset {builtin.DEMO_PRESET.name}" in win.setup.origin_label.text()
    assert win.setup.reset_choices()[0][0] == f"Preset {builtin.DEMO_PRESET.name}"
