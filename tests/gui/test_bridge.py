"""The bridge drains a session on a timer and always ends a run with an end signal."""

from __future__ import annotations

from PySide6.QtWidgets import QWidget

from tests.gui.fake_session import factory
from tunedeck.engine.config import Config
from tunedeck.engine.errors import DataError
from tunedeck.engine.protocol import EndEvent, ErrorEvent, StepEvent
from tunedeck.gui.bridge import SessionBridge


def run_bridge(qtbot, make):
    holder = QWidget()  # a Qt parent: the bridge must be destroyed on the main thread
    qtbot.addWidget(holder)
    b = SessionBridge(holder, factory=make)
    b.holder = holder  # keep the parent (and so the bridge) alive for the test
    batches, ends = [], []
    b.events.connect(batches.append)
    b.ended.connect(ends.append)
    cfg = Config()
    return b, batches, ends, cfg


def test_events_arrive_in_batches_and_the_run_ends(qtbot, tmp_path):
    make = factory(steps=2000, delay=0)  # as fast as the thread can go
    b, batches, ends, cfg = run_bridge(qtbot, make)
    cfg.train.output_dir = str(tmp_path)
    assert b.start(cfg)
    qtbot.waitUntil(lambda: bool(ends), timeout=20_000)
    steps = [e for batch in batches for e in batch if isinstance(e, StepEvent)]
    assert [e.step for e in steps] == list(range(1, 2001))
    assert len(batches) < 2000  # batched: the step rate does not drive the GUI
    assert ends[0].status == "completed" and not b.active


def test_a_session_that_cannot_start_reports_error_and_end(qtbot):
    def broken(config, resume_from=None):
        raise DataError("data file x.jsonl does not exist", "check data.path")

    b, batches, ends, cfg = run_bridge(qtbot, broken)
    assert not b.start(cfg)
    assert isinstance(batches[0][0], ErrorEvent) and batches[0][0].kind == "data"
    assert ends and ends[0].status == "failed" and not b.active


def test_a_thread_that_dies_silently_still_ends_the_run(qtbot, tmp_path):
    make = factory(die_silently=True)
    b, batches, ends, cfg = run_bridge(qtbot, make)
    cfg.train.output_dir = str(tmp_path)
    b.start(cfg)
    qtbot.waitUntil(lambda: bool(ends), timeout=10_000)
    flat = [e for batch in batches for e in batch]
    assert any(isinstance(e, ErrorEvent) for e in flat) and isinstance(flat[-1], EndEvent)
    assert ends[0].status == "failed"


def test_commands_reach_the_session(qtbot, tmp_path):
    make = factory(steps=100000, delay=0.001)
    b, batches, ends, cfg = run_bridge(qtbot, make)
    cfg.train.output_dir = str(tmp_path)
    b.start(cfg)
    qtbot.waitUntil(lambda: b.step > 3, timeout=10_000)
    b.send({"cmd": "stop"})
    qtbot.waitUntil(lambda: bool(ends), timeout=10_000)
    assert ends[0].status == "stopped"
    assert make.made[0].sent[0].name == "stop"
    b.send({"cmd": "pause"})  # after the end: ignored, no error
