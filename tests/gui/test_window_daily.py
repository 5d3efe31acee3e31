"""The window as a daily tool: where runs go, what loading shows, small screens, the "now" strip,
run shortcuts in text fields, feedback while paused or evaluating, the summary, exports."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from PySide6.QtCore import QRect, Qt
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QApplication

from tests.gui.fake_session import factory
from tests.gui.test_plot_views import label_rects
from tunedeck.engine.protocol import Eval
from tunedeck.gui.history import fmt_number
from tunedeck.gui.main_window import default_runs_folder


def wait_running(win, qtbot, steps: int = 3) -> None:
    qtbot.waitUntil(lambda: win.status.state == "running" and len(win.history) >= steps, timeout=15_000)


# ---------------------------------------------------------------------- where runs go


def test_runs_go_to_the_users_data_folder_by_default_and_the_log_says_so(
    make_window, make_config, qtbot, tmp_path
):
    win = make_window(factory=factory(steps=5, delay=0.001))
    data_home = Path(os.environ["XDG_DATA_HOME"])
    assert default_runs_folder() == str(data_home / "tunedeck" / "runs")
    assert win.runs_folder == str(data_home / "tunedeck" / "runs")
    cfg = make_config()
    cfg.train.output_dir = "runs"  # the config's default: relative, the CLI's "./runs"
    win.set_config(cfg)
    win.start_run()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=10_000)
    assert Path(win.history.run_dir).parent == data_home / "tunedeck" / "runs"
    assert f"runs go to {data_home / 'tunedeck' / 'runs'}" in win.log.text()
    assert (
        win.setup.config().train.output_dir == "runs"
    )  # the form (and a saved preset) keep the config's value
    # the library lists it
    assert [s.name for s in win.library.summaries] == [Path(win.history.run_dir).name]


def test_the_runs_folder_is_settable_and_kept(make_window, make_config, settings, qtbot, tmp_path):
    win = make_window(factory=factory(steps=3, delay=0.001))
    mine = tmp_path / "my-runs"
    win.set_runs_folder(mine)
    assert win.library.folder == str(mine)
    cfg = make_config()
    cfg.train.output_dir = "runs"
    win.set_config(cfg)
    win.start_run()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=10_000)
    assert Path(win.history.run_dir).parent == mine
    win.close()
    assert make_window().runs_folder == str(mine)
    # an absolute output_dir is used as given
    other = make_window(factory=factory(steps=2, delay=0.001))
    cfg.train.output_dir = str(tmp_path / "elsewhere")
    other.set_config(cfg)
    other.start_run()
    qtbot.waitUntil(lambda: not other.bridge.active, timeout=10_000)
    assert Path(other.history.run_dir).parent == tmp_path / "elsewhere"


# ---------------------------------------------------------------------- 13. feedback


def test_loading_shows_what_loads(make_window, make_config, qtbot):
    win = make_window(factory=factory(steps=5, delay=0.001, tokenize_rows=214_000))
    win.set_config(make_config())
    seen = set()
    win.start_run()
    while win.bridge.active:
        qtbot.wait(20)
        seen.add(win.status.detail_label.text())
    assert "loading model…" in seen
    assert "tokenizing 107,000 / 214,000 rows" in seen
    lines = [e[2] for e in win.log.entries]
    assert lines.count("loading model…") == 1 and lines.count("model loaded") == 1
    assert sum(line.startswith("tokenizing") for line in lines) == 2  # when it begins and when it is done
    assert "tokenizing done: 214,000 rows" in lines
    assert win.status.detail_label.text() == ""  # the run went on: nothing stale


def test_evaluate_says_so_at_once_and_ctrl_e_works_in_a_text_field(make_window, make_config, qtbot):
    make = factory(steps=100_000, delay=0.01)
    win = make_window(factory=make)
    win.set_config(make_config())
    win.activateWindow()
    qtbot.waitUntil(win.isActiveWindow, timeout=2_000)
    win.start_run()
    wait_running(win, qtbot)
    field = win.setup.form.editor("train.learning_rate").widget
    field.setFocus()
    qtbot.waitUntil(field.hasFocus, timeout=2_000)
    qtbot.keyClick(field, Qt.Key.Key_E, Qt.KeyboardModifier.ControlModifier)
    assert "evaluating at the next step boundary…" in win.log.text()  # said before the result
    assert win.status.detail_label.text() == "evaluating…"
    qtbot.waitUntil(lambda: len(win.history.eval_steps) == 1, timeout=10_000)
    assert sum(isinstance(c, Eval) for c in make.made[0].sent) == 1
    assert win.status.detail_label.text() == ""
    # the sample prompt (a plain text edit) lets it through too
    win.samples.prompt.setFocus()
    qtbot.waitUntil(win.samples.prompt.hasFocus, timeout=2_000)
    qtbot.keyClick(win.samples.prompt, Qt.Key.Key_E, Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(lambda: len(win.history.eval_steps) == 2, timeout=10_000)
    # and Help lists the run keys
    keys = dict(win.shortcuts())
    assert keys["Ctrl+E"] == "Evaluate" and keys["F5"] == "Start" and keys["F6"] == "Pause"
    assert keys["Shift+F8"] == "Cancel" and keys["F1"] == "Keyboard shortcuts"


def test_paused_and_ended_runs_show_no_stale_eta_or_rate(make_window, make_config, qtbot):
    win = make_window(factory=factory(steps=100_000, delay=0.01))
    win.set_config(make_config())
    win.start_run()
    wait_running(win, qtbot, 5)
    qtbot.waitUntil(
        lambda: "tok/s" in win.status.tps_label.text() and "–" not in win.status.tps_label.text(),
        timeout=5_000,
    )
    win.controls.pause_action.trigger()
    qtbot.waitUntil(lambda: win.status.state == "paused", timeout=5_000)
    qtbot.wait(600)  # a status tick with the last step pending must not bring them back
    assert win.status.eta_label.text() == "ETA (paused)" and win.status.tps_label.text() == "– tok/s"
    assert win.now.values["tok/s"] == "–" and win.now.values["ETA"] == "–"
    win.controls.pause_action.trigger()
    qtbot.waitUntil(lambda: "–" not in win.status.tps_label.text(), timeout=5_000)
    win.stop_run()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=10_000)
    assert win.status.eta_label.text() == "ETA –" and win.status.tps_label.text() == "– tok/s"


# ---------------------------------------------------------------------- 9. the "now" strip


def test_the_now_strip_shows_the_current_values_without_hovering(make_window, make_config, qtbot):
    win = make_window(factory=factory(steps=100_000, delay=0.01))
    win.set_config(make_config("train.learning_rate=3e-3"))
    win.start_run()
    wait_running(win, qtbot, 10)
    win.controls.pause_action.trigger()
    qtbot.waitUntil(lambda: win.status.state == "paused", timeout=5_000)
    qtbot.wait(400)
    last = win.history.last_step
    v = win.now.values
    assert v["step"] == f"{last.step:,} / 100,000"
    assert v["loss"] == fmt_number(float(win.plots.smoother.out.last()))
    assert v["lr"] == "3e-3" and v["grad"] == "1" and v["mem"] == "10 MB"
    win.controls.pause_action.trigger()
    qtbot.waitUntil(lambda: win.now.values["tok/s"] == "1,000", timeout=5_000)
    assert win.now.values["ETA"] == "0:01"


# ---------------------------------------------------------------------- 8. small screens


def test_the_window_fits_a_1280x720_screen_and_the_plots_get_the_room(make_window, make_config, qtbot):
    win = make_window(factory=factory(steps=60, delay=0.001))
    win.fit_to_screen(QRect(0, 0, 1280, 720 - 32))  # a laptop screen less a panel
    assert win.width() <= 1280 and win.height() <= 720 - 32
    assert win.small_screen
    # the log, samples, runs and summary share one tabbed column beside the plots
    assert {win.samples_dock, win.library_dock, win.summary_dock} <= set(
        win.tabifiedDockWidgets(win.log_dock)
    )
    assert win.dockWidgetArea(win.log_dock) == Qt.DockWidgetArea.RightDockWidgetArea
    win.set_config(make_config())
    win.start_run()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=10_000)
    qtbot.wait(50)
    win.plots.refresh(force=True)
    qtbot.wait(50)
    assert win.plots.loss_plot.vb.height() >= 120, win.plots.loss_plot.vb.height()
    assert win.setup_dock.width() <= 330
    assert (
        "util" in win.plots.hidden and not win.plot_actions["util"].isChecked()
    )  # View > Plots brings it back
    for pl in win.plots._shown():  # every axis readable
        rects = label_rects(pl.getAxis("left"))
        assert rects, pl.titleLabel.text
        for i, a in enumerate(rects):
            for b in rects[i + 1 :]:
                assert not a.intersects(b), pl.titleLabel.text
    # a big screen keeps them side by side
    big = make_window()
    big.fit_to_screen(QRect(0, 0, 1920, 1080))
    assert not big.small_screen and 1500 <= big.width() <= 1920


def test_a_geometry_saved_on_a_big_screen_is_fitted_into_a_small_one(make_window, settings):
    win = make_window()
    win.resize(3000, 2000)
    win.close()
    again = make_window()
    again.resize(3000, 2000)  # as restored on the big screen (offscreen, Qt clamps to its own screen)
    laptop = QRect(0, 0, 1280, 688)
    again._keep_on_screen(laptop)
    assert again.width() <= laptop.width() and again.height() <= laptop.height() and again.small_screen


# ---------------------------------------------------------------------- 2. the read-out in the window


def test_hovering_the_plots_never_squeezes_the_setup_panel(make_window, make_config, qtbot, tmp_path):
    win = make_window(factory=factory(steps=200, delay=0.0))
    win.resize(1400, 900)
    win.set_config(make_config())
    win.start_run()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=10_000)
    qtbot.wait(50)
    width = win.setup_dock.width()
    from tunedeck.gui.history import RunHistory

    others = []
    for i in range(5):
        o = RunHistory(run_id=f"another-run-with-a-long-name-{i}")
        o.extend(win.history.samples)  # empty: a name only
        o.steps.extend(range(1, 150))
        for ser in o.series.values():
            ser.extend([1.0] * 149)
        others.append(o)
    win.plots.set_overlays(others)
    win.plots.show_readout(100)
    qtbot.wait(50)
    assert len(win.plots.readout_text) > 200
    assert win.setup_dock.width() == width  # the read-out took no room from the docks
    # the mouse leaves: the read-out clears
    from PySide6.QtCore import QEvent

    QApplication.sendEvent(win.plots.glw, QEvent(QEvent.Type.Leave))
    assert win.plots.readout.text() == ""


# ---------------------------------------------------------------------- summary and exports


def test_the_end_of_run_summary_and_the_csv_export(make_window, make_config, qtbot, tmp_path):
    win = make_window(factory=factory(steps=40, delay=0.001))
    win.set_config(make_config("train.eval_steps=10"))
    win.start_run()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=10_000)
    s = win.summary.summary
    assert s is not None and s.status == "completed" and s.steps == 40
    assert s.best_eval == (10, 2.1) and s.tokens == 4_000
    v = win.summary.values
    assert v["final loss"].text() == fmt_number(2 + __import__("math").exp(-40 / 30))
    assert v["best eval loss"].text() == "2.1 at step 10"
    assert v["adapter"].text() == str(Path(win.history.run_dir) / "final")
    assert "PeftModel.from_pretrained(base, " in win.summary.snippet.toPlainText()
    assert win.summary_dock.isVisible()
    win.summary.copy_snippet()
    assert QApplication.clipboard().text() == win.summary.snippet.toPlainText()
    opened = []
    import tunedeck.gui.widgets.summary as summary_mod

    orig = summary_mod.QDesktopServices.openUrl
    summary_mod.QDesktopServices.openUrl = lambda url: opened.append(url.toLocalFile()) or True
    try:
        win.summary.open_button.click()
    finally:
        summary_mod.QDesktopServices.openUrl = orig
    assert opened == [str(Path(win.history.run_dir) / "final")]
    # metrics as CSV: one row per step, the eval loss where there was one
    out = tmp_path / "m.csv"
    assert win.export_csv(str(out)) == 40
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 40 and rows[9]["step"] == "10" and rows[9]["eval_loss"] == "2.1"
    assert (
        rows[0]["eval_loss"] == "" and float(rows[0]["learning_rate"]) == win.run_config.train.learning_rate
    )
    win.export_plots(str(tmp_path / "p.png"))
    assert QImage(str(tmp_path / "p.png")).width() == win.plots.glw.width()


@pytest.mark.parametrize("device", ["cpu"])
def test_the_memory_plot_on_a_cpu_run_names_rss(make_window, make_config, qtbot, device):
    win = make_window(factory=factory(steps=30, delay=0.001, device=device))
    win.set_config(make_config())
    win.start_run()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=10_000)
    win.plots.refresh(force=True)
    assert (
        "process RSS" in win.plots.mem_plot.titleLabel.text
        and "torch" not in win.plots.mem_plot.titleLabel.text
    )


SMALL_SCREEN_PROBE = """
import json, sys
from PySide6.QtCore import QSettings, Qt
from PySide6.QtWidgets import QApplication
app = QApplication([])
from tunedeck.gui.widgets import theme
theme.apply(app)
from tunedeck.gui.main_window import MainWindow
win = MainWindow(settings=QSettings(sys.argv[1], QSettings.Format.IniFormat), restore=False)
win.show()
for _ in range(30):
    app.processEvents()
screen = app.primaryScreen().availableGeometry()
print(json.dumps({
    "screen": [screen.width(), screen.height()],
    "window": [win.frameGeometry().width(), win.frameGeometry().height()],
    "small": win.small_screen,
    "loss": win.plots.loss_plot.vb.height(),
    "log_area": win.dockWidgetArea(win.log_dock).name,
}))
"""


def test_on_a_real_1280x720_screen_the_window_opens_fitted(tmp_path):
    """A process of its own on an offscreen screen of 1280 x 720: the window opens within it and
    the loss plot gets a usable height (it was 30 px)."""
    import json
    import subprocess
    import sys

    from tests.gui.conftest import screen_config

    env = dict(os.environ, QT_QPA_PLATFORM=screen_config(1280, 720, str(tmp_path / "screen.json")))
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    out = subprocess.run(
        [sys.executable, "-c", SMALL_SCREEN_PROBE, str(tmp_path / "s.ini")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["screen"] == [1280, 720]
    assert got["window"][0] <= 1280 and got["window"][1] <= 720
    assert got["small"] and got["log_area"] == "RightDockWidgetArea"
    assert got["loss"] >= 200, got


def test_plots_can_be_hidden_from_the_view_menu_and_it_is_kept(make_window, settings):
    win = make_window()
    win.plot_actions["grad"].setChecked(False)
    assert win.plots.grad_plot not in win.plots._shown()
    assert win.plots.grad_plot not in win.plots.glw.ci.items
    win.close()
    again = make_window()
    assert not again.plot_actions["grad"].isChecked() and "grad" in again.plots.hidden
    again.plot_actions["grad"].setChecked(True)
    assert again.plots.grad_plot in again.plots._shown()
