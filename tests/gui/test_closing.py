"""Closing the window during a run asks first, and loses nothing whichever way the user goes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gui.fake_session import factory


@pytest.mark.parametrize(
    "choice, status, adapter", [("stop", "stopped", True), ("cancel", "cancelled", False)]
)
def test_closing_during_a_run(make_window, make_config, qtbot, monkeypatch, choice, status, adapter):
    make = factory(steps=100_000, delay=0.002)
    win = make_window(factory=make)
    win.set_config(make_config())
    win.start_run()
    qtbot.waitUntil(lambda: len(win.history) > 5, timeout=10_000)

    asked = []
    monkeypatch.setattr(win, "ask_close", lambda: asked.append(1) or "stay")
    win.close()
    assert asked and win.isVisible() and win.bridge.active  # stay: nothing happens

    monkeypatch.setattr(win, "ask_close", lambda: choice)
    win.close()
    assert win.isVisible()  # not yet: the run ends first
    qtbot.waitUntil(lambda: not win.isVisible(), timeout=10_000)
    assert not win.bridge.active and win.history.status == status
    run_dir = Path(win.history.run_dir)
    assert (run_dir / "final" / "adapter_model.safetensors").is_file() == adapter
    assert '"type": "end"' in (run_dir / "metrics.jsonl").read_text()  # the record is complete


def test_closing_when_idle_does_not_ask(make_window, monkeypatch, qtbot):
    win = make_window()
    monkeypatch.setattr(win, "ask_close", lambda: pytest.fail("asked while idle"))
    win.close()
    assert not win.isVisible()


def test_an_event_flood_keeps_the_window_responsive(make_window, make_config, qtbot):
    """20,000 steps as fast as a thread can make them: batched draining, bounded redraws."""
    make = factory(steps=20_000, delay=0)
    win = make_window(factory=make)
    win.set_config(make_config())
    redraws = win.plots.redraws
    win.start_run()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=30_000)
    qtbot.wait(120)
    assert len(win.history) == 20_000 and win.status.step == 20_000
    assert win.plots.redraws - redraws < 2_000  # at most one per 50 ms timer tick, not one per step


def test_a_failure_mid_run_shows_oom_advice(make_window, make_config, qtbot):
    win = make_window(factory=factory(steps=100, delay=0.001, fail_at=10))
    win.set_config(make_config())
    win.start_run()
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=10_000)
    assert win.banner.isVisible() and "out of memory" in win.banner.message
    assert "lower the batch size" in win.log.text()
    assert win.controls.start_action.isEnabled() and win.status.state == "failed"


@pytest.mark.parametrize(
    "ask, press, expected",
    [
        ("ask_close", "Cancel run", "cancel"),
        ("ask_close", "Stop and save", "stop"),
        ("ask_close", None, "stay"),  # Escape
        ("ask_close_followed", "Leave it going", "leave"),
        ("ask_close_followed", None, "stay"),
    ],
)
def test_the_closing_questions_answer_what_was_clicked(make_window, qtbot, ask, press, expected):
    from PySide6.QtCore import Qt, QTimer
    from PySide6.QtWidgets import QApplication, QMessageBox

    win = make_window()
    seen: list[list[str]] = []

    def answer() -> None:
        box = QApplication.activeModalWidget()
        assert isinstance(box, QMessageBox)
        seen.append([b.text() for b in box.buttons()])
        if press is None:
            qtbot.keyClick(box, Qt.Key.Key_Escape)
        else:
            next(b for b in box.buttons() if b.text() == press).click()

    QTimer.singleShot(100, answer)
    assert getattr(win, ask)() == expected
    assert seen and "Stay" in seen[0]
