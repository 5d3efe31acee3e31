"""Rolling back from the window: a click on a checkpoint mark, new values, the branch drawn faded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PySide6.QtCore import QPointF, Qt
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QDialogButtonBox

from tunedeck.engine.protocol import ChangeEvent, CheckpointEvent, RollbackEvent, StartEvent, StepEvent
from tunedeck.gui.history import RunHistory

LONG = (
    "train.max_steps=3000",
    "train.lr_scheduler_type=constant",
    "train.warmup_ratio=0",
    "train.save_steps=5",
)


def click_mark(win, step: int, button=Qt.MouseButton.LeftButton) -> None:
    """A real mouse click on the checkpoint mark of ``step`` at the bottom of the loss plot."""
    plots = win.plots
    vb = plots.loss_plot.vb
    r = vb.viewRect()
    _, ph = plots.rollback.marks._pixel()
    scene = vb.mapViewToScene(QPointF(step, r.top() + 6 * ph))
    pos = plots.glw.mapFromScene(scene)
    QTest.mouseClick(plots.glw.viewport(), button, Qt.KeyboardModifier.NoModifier, pos)


def test_rollback_from_the_checkpoint_mark_with_a_new_learning_rate(make_window, make_config, qtbot):
    win = make_window()
    win.set_config(make_config(*LONG))
    win.controls.start_action.trigger()
    qtbot.waitUntil(lambda: len(win.history) >= 8, timeout=60_000)
    win.controls.pause_action.trigger()
    qtbot.waitUntil(lambda: win.status.state == "paused", timeout=20_000)
    win.plots.fit()
    win.plots.refresh(force=True)
    assert 5 in win.plots.rollback.marks.steps
    paused_at = int(win.history.steps.last())

    # A click on the mark of step 5 opens the menu; "with new values" opens the dialog.
    click_mark(win, 5, Qt.MouseButton.RightButton)
    qtbot.waitUntil(lambda: win.plots.rollback.menu is not None and win.plots.rollback.menu.isVisible())
    back, more = win.plots.rollback.menu.actions()[:2]
    assert back.text() == "Roll back to step 5" and back.isEnabled()
    more.trigger()
    dialog = win.plots.rollback.dialog
    assert dialog.checkpoint.currentData() == 5
    dialog.learning_rate.setText("7")  # refused with the engine's message, the dialog stays
    dialog.findChild(QDialogButtonBox).button(QDialogButtonBox.StandardButton.Ok).click()
    assert dialog.isVisible() and "train.learning_rate=7.0 is out of range" in dialog.error.text()
    dialog.learning_rate.setText("1e-3")
    dialog.findChild(QDialogButtonBox).button(QDialogButtonBox.StandardButton.Ok).click()
    qtbot.waitUntil(lambda: bool(win.history.branches), timeout=20_000)

    branch = win.history.branches[0]
    assert (branch.number, branch.to_step, branch.from_step) == (1, 5, paused_at)
    assert win.history.steps.last() == 5  # the run is back at step 5, still paused
    assert (
        f"rolled back from step {paused_at} to step-000005; steps 6-{paused_at} kept as branch 1"
        in win.log.text()
    )
    win.controls.pause_action.trigger()  # resume
    qtbot.waitUntil(lambda: win.history.steps.last() >= 9, timeout=20_000)
    xs, lrs = win.history.x(), win.history.y("lr")
    assert list(xs[:9]) == list(range(1, 10))
    assert all(lr == 1e-3 for s, lr in zip(xs, lrs, strict=True) if s > 5)
    # The abandoned trajectory stays on the plots, faded, from the fork at step 5 to where it was left.
    win.plots.refresh(force=True)
    ((_, loss_item, _lr_item),) = win.plots.rollback.curves.items
    bx, _ = loss_item.getOriginalDataset()
    assert bx[0] == 5 and bx[-1] == paused_at and loss_item.opts["pen"].color().alpha() < 255
    assert win.plots.marker_labels()[-1] == f"step {paused_at}→5, learning_rate 3e-3→1e-3"
    run_dir = Path(win.history.run_dir)
    record = json.loads((run_dir / "branches" / "1" / "branch.json").read_text())
    assert (record["from_step"], record["to_step"]) == (paused_at, 5)


def test_the_menu_only_offers_a_rollback_while_a_run_goes(make_window, qtbot):
    win = make_window()
    hist = RunHistory()
    hist.add(StartEvent(run_id="r", run_dir="/nowhere/r"))
    for s in range(1, 7):
        hist.add(StepEvent(step=s, loss=2.0 - s / 10, learning_rate=1e-3))
    hist.add(CheckpointEvent(step=3, path="/nowhere/r/checkpoints/step-000003"))
    hist.add(CheckpointEvent(step=6, path="/nowhere/r/final"))
    win.plots.set_history(hist)
    win.plots.fit()
    win.plots.refresh(force=True)
    assert win.plots.rollback.marks.steps == [3]  # final/ is no mark
    menu = win.plots.rollback.show_menu(3, win.mapToGlobal(win.rect().center()))
    assert [a.isEnabled() for a in menu.actions()[:2]] == [False, False]
    assert not win.rollback_action.isEnabled()
    menu.close()


def test_a_rollback_event_moves_the_steps_after_it_into_a_faded_branch():
    hist = RunHistory()
    for s in range(1, 9):
        hist.add(StepEvent(step=s, loss=float(s), learning_rate=0.1 * s))
    hist.add(CheckpointEvent(step=4, path="r/checkpoints/step-000004"))
    hist.add(CheckpointEvent(step=8, path="r/checkpoints/step-000008"))
    hist.add(RollbackEvent(from_step=8, to_step=4, checkpoint="step-000004", branch=1))
    hist.add(ChangeEvent(step=4, changes={"step": [8, 4]}, source="autopilot", rule="loss_spike", reason="r"))
    for s in (5, 6):
        hist.add(StepEvent(step=s, loss=10.0 + s, learning_rate=0.05))
    assert list(hist.x()) == [1, 2, 3, 4, 5, 6] and list(hist.y("loss")) == [1, 2, 3, 4, 15, 16]
    (b,) = hist.branches
    assert list(b.steps) == [4, 5, 6, 7, 8] and np.allclose(b.loss, [4, 5, 6, 7, 8])
    assert hist.checkpoints == [(4, "r/checkpoints/step-000004")]
    assert hist.changes[-1].rule == "loss_spike"


def test_the_autopilot_panel_lists_rules_with_their_firings_and_switches_them(qtbot):
    from tunedeck.engine import config as cfgmod
    from tunedeck.engine.protocol import Set
    from tunedeck.gui.widgets.autopilot import AutopilotPanel

    cfg = cfgmod.apply_overrides(
        cfgmod.Config(), ["train.autopilot=[{rule: loss_spike, max_firings: 2}, {rule: plateau, name: slow}]"]
    )
    panel = AutopilotPanel()
    qtbot.addWidget(panel)
    panel.add_event(StartEvent(run_id="r", config=cfg.to_dict()))
    assert (
        list(panel.switches) == ["loss_spike", "slow"] and panel.switches["slow"].text() == "slow (plateau)"
    )
    assert panel.details["loss_spike"].text().endswith("\nfired 0 of 2")
    panel.add_event(
        ChangeEvent(
            step=12, changes={"step": [15, 12]}, source="autopilot", rule="loss_spike", reason="loss 6.1"
        )
    )
    assert panel.details["loss_spike"].text().endswith("\nfired 1 of 2, last after step 12: loss 6.1")
    sent = []
    panel.command.connect(sent.append)
    assert not panel.switches["slow"].isEnabled()  # only while a run goes
    panel.set_live(True)
    panel.switches["slow"].setChecked(False)
    assert sent == [Set(values={"autopilot": {"slow": False}})]
    # The engine's change confirms the switch (here: switched back on by a control file).
    rules = [dict(r) for r in cfg.train.autopilot]
    panel.add_event(ChangeEvent(step=13, changes={"autopilot": [rules, rules]}, source="user"))
    assert panel.switches["slow"].isChecked() and len(sent) == 1


def test_resume_from_the_window_takes_the_checkpoint_settings_and_continues_in_place(
    make_window, make_config, qtbot, monkeypatch
):
    from PySide6.QtWidgets import QFileDialog

    win = make_window()
    win.set_config(make_config("train.max_steps=3000", "train.lr_scheduler_type=constant"))
    win.controls.start_action.trigger()
    qtbot.waitUntil(lambda: len(win.history) >= 3, timeout=60_000)
    win.controls.stop_action.trigger()  # saves a checkpoint and final/ at the step it stops
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=60_000)
    run_dir = Path(win.history.run_dir)
    (ckpt,) = (run_dir / "checkpoints").iterdir()
    stopped = int(win.history.steps.last())
    # The form now holds other settings; resuming takes the checkpoint's, so nothing is refused.
    win.set_config(make_config("train.max_steps=3000", "train.seed=7", "train.learning_rate=1e-4"))
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(ckpt))
    win.resume_dialog()
    qtbot.waitUntil(lambda: len(win.history) >= 2, timeout=60_000)
    assert win.setup.config().train.seed == 42 and win.run_config.train.learning_rate == 3e-3
    assert int(win.history.steps.view[0]) == stopped + 1 and win.history.run_dir == str(run_dir)
    assert not [p for p in win.history.problems if p.type == "error"]
    win.controls.stop_action.trigger()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=60_000)
    assert win.history.status == "stopped"
