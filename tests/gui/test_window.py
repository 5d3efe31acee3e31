"""The whole window driving the real engine (builtin tiny model, demo data, CPU)."""

from __future__ import annotations

from pathlib import Path

from tunedeck.engine.protocol import StepEvent
from tunedeck.gui.history import fmt_number
from tunedeck.gui.main_window import MainWindow

LONG = ("train.max_steps=3000", "train.lr_scheduler_type=constant", "train.warmup_ratio=0")


def steps_seen(win: MainWindow) -> int:
    return len(win.history)


def test_a_builtin_run_from_the_window(make_window, make_config, qtbot):
    """Start, see points, pause, resume, change the learning rate live, sample, stop and save."""
    win = make_window()
    win.set_config(make_config(*LONG))
    assert win.controls.start_action.isEnabled()
    win.controls.start_action.trigger()
    assert not win.controls.start_action.isEnabled()
    assert not win.setup.form.editor("lora.r").widget.isEnabled()  # locked during the run
    qtbot.waitUntil(lambda: steps_seen(win) >= 3, timeout=60_000)

    # points arrive in the plots, and the status bar follows
    def plotted() -> int:
        x, _ = win.plots.c_loss_raw.item.getOriginalDataset()
        return 0 if x is None else len(x)

    qtbot.waitUntil(lambda: plotted() >= 3, timeout=5_000)
    qtbot.waitUntil(lambda: win.status.step >= 3, timeout=2_000)
    assert win.status.total == 3000
    assert "tok/s" in win.status.tps_label.text() and win.status.state == "running"

    # pause and resume
    win.controls.pause_action.trigger()
    qtbot.waitUntil(lambda: win.status.state == "paused", timeout=20_000)
    assert win.controls.pause_action.text() == "Resume"
    n = steps_seen(win)
    qtbot.wait(600)
    assert steps_seen(win) == n
    win.controls.pause_action.trigger()
    qtbot.waitUntil(lambda: steps_seen(win) >= n + 2, timeout=20_000)
    assert win.controls.pause_action.text() == "Pause"

    # a live learning-rate change: a marker, a log line, and the new LR in the following steps
    old_lr = win.run_config.train.learning_rate
    lr_editor = win.setup.form.editor("train.learning_rate")
    assert lr_editor.widget.isEnabled()
    lr_editor.set_raw("1e-3")
    assert win.setup.form.apply_button.isEnabled()
    win.setup.form.apply_button.click()
    qtbot.waitUntil(lambda: bool(win.plots.marker_steps), timeout=20_000)
    changed_at = win.plots.marker_steps[0]
    assert win.plots.marker_labels()[0] == f"learning_rate {fmt_number(old_lr)}→1e-3"
    qtbot.waitUntil(lambda: win.history.steps.last() >= changed_at + 2, timeout=20_000)
    lrs = {int(s): lr for s, lr in zip(win.history.x(), win.history.y("lr"), strict=True)}
    assert all(lr == 1e-3 for s, lr in lrs.items() if s > changed_at)
    assert all(lr == old_lr for s, lr in lrs.items() if s <= changed_at)
    assert "changed learning_rate" in win.log.text()
    assert not win.setup.form.apply_button.isEnabled()  # applied: nothing left to send

    # a sample from the model as it is now
    win.samples.prompt.setPlainText("Upper: cloud")
    win.samples.button.click()
    qtbot.waitUntil(lambda: bool(win.samples.samples), timeout=30_000)
    assert win.samples.samples[0].prompt == "Upper: cloud"

    # stop and save: the adapter is on disk, and the window is ready for the next run
    win.controls.stop_action.trigger()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=60_000)
    assert win.history.status == "stopped"
    assert (Path(win.history.output) / "adapter_model.safetensors").is_file()
    assert win.controls.start_action.isEnabled() and not win.controls.stop_action.isEnabled()
    assert win.setup.form.editor("lora.r").widget.isEnabled()
    assert not win.banner.isVisible()


def test_bad_input_is_flagged_before_start(make_window, make_config, qtbot):
    win = make_window()
    win.set_config(make_config())
    win.setup.form.editor("train.per_device_train_batch_size").set_raw("0")
    assert not win.controls.start_action.isEnabled()
    assert "train.per_device_train_batch_size=0 is out of range" in win.setup.problem
    assert win.setup.problem_label.isVisible()
    assert "Fix the settings first" in win.controls.start_action.toolTip()
    assert not win.start_run()  # even if called directly
    assert win.banner.isVisible() and not win.bridge.active
    win.setup.form.editor("train.per_device_train_batch_size").set_raw("2")
    assert win.controls.start_action.isEnabled()


def test_an_engine_failure_is_shown_and_a_new_run_can_start(make_window, make_config, qtbot, tmp_path):
    win = make_window()
    win.set_config(make_config("train.max_steps=3"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    win.setup.data.set_value(str(empty))
    assert win.controls.start_action.isEnabled()  # the engine, not the form, finds it has no rows
    win.controls.start_action.trigger()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=60_000)
    assert win.isVisible()
    assert win.banner.isVisible() and "has no rows" in win.banner.message
    assert "error (data)" in win.log.text() and "run failed" in win.log.text()
    assert win.status.state == "failed"
    assert win.controls.start_action.isEnabled() and not win.controls.cancel_action.isEnabled()
    assert win.setup.data.path_edit.isEnabled()

    # the next run starts and completes
    win.setup.data.set_value("builtin:demo")
    win.controls.start_action.trigger()
    assert not win.banner.isVisible()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=90_000)
    assert win.history.status == "completed" and len(win.history) == 3

    # ...and, as a past run, opens in another window with its curves and settings
    run_dir = Path(win.history.run_dir)
    other = make_window(restore=False)
    hist = other.open_run(run_dir)
    assert hist is not None and len(hist) == 3 and hist.status == "completed"
    other.plots.refresh(force=True)
    x, _ = other.plots.c_loss_raw.item.getOriginalDataset()
    assert list(x) == [1, 2, 3]
    assert other.setup.config().train.max_steps == 3
    # its summary's code loads the adapter with transformers and peft, as a user would paste it
    from peft import PeftModel

    code = other.summary.snippet.toPlainText()
    assert f"PeftModel.from_pretrained(base, '{run_dir / 'final'}')" in code
    scope: dict = {}
    exec(code, scope)
    assert isinstance(scope["model"], PeftModel) and scope["tokenizer"] is not None
    # and overlays on a second one for comparison
    other.compare_run(run_dir)
    other.plots.refresh(force=True)
    assert len(other.plots.overlays[0].loss.item.getOriginalDataset()[0]) == 3
    assert other.clear_compare_action.isEnabled()


def test_opening_something_that_is_not_a_run(make_window, tmp_path):
    win = make_window()
    assert win.open_run(tmp_path) is None
    assert win.banner.isVisible() and "metrics.jsonl" in win.banner.message


def test_settings_and_geometry_are_remembered(make_window, make_config, settings, qtbot):
    win = make_window()
    win.set_config(make_config("train.learning_rate=2.5e-4"))
    win.resize(1200, 800)  # within the test screen (1920 x 1200), which restoreGeometry respects
    size = (win.width(), win.height())  # what the window allowed (its docks have minimum sizes)
    win.close()
    assert settings.value("window/geometry") is not None
    again = make_window()
    assert again.setup.config().train.learning_rate == 2.5e-4
    assert (again.width(), again.height()) == size


def test_a_first_launch_opens_on_the_demo_preset(make_window, settings):
    from tunedeck.engine import builtin
    from tunedeck.engine import config as cfgmod

    demo = cfgmod.load(builtin.DEMO_PRESET)
    assert demo.train.learning_rate != cfgmod.Config().train.learning_rate  # so the check below can tell
    win = make_window()  # empty settings: a first launch
    assert win.setup.config().to_dict() == demo.to_dict()
    win.close()
    settings.setValue("last/config", "model: [not, a, mapping")  # a broken entry: as a first launch
    assert make_window().setup.config().to_dict() == demo.to_dict()


def test_step_events_only_update_the_status_once_per_batch(make_window, qtbot):
    win = make_window()
    batch = [StepEvent(step=i, loss=1.0, total_steps=10, tokens_per_s=5.0) for i in range(1, 6)]
    win._on_events(batch)
    qtbot.waitUntil(lambda: win.status.step == 5, timeout=2_000)
    assert len(win.history) == 5
