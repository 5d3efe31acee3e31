"""The window's bridge drives a followed run folder as it drives a run in its own thread: the same
signals from the run's metrics file, commands through the run's control file."""

from __future__ import annotations

import pytest
from PySide6.QtWidgets import QWidget

from tests.engine.helpers import make_cfg
from tunedeck.engine.follow import FollowedRun
from tunedeck.engine.protocol import Pause, Resume, StartEvent, StateEvent, StepEvent, Stop
from tunedeck.engine.session import TrainingSession
from tunedeck.gui.bridge import SessionBridge


@pytest.mark.slow
def test_bridge_follows_a_live_run_folder_and_steers_it(qtbot, tmp_path):
    # The run goes on elsewhere (here a session's thread; a terminal or torchrun would do the same).
    cfg = make_cfg(tmp_path, train__max_steps=500, train__per_device_train_batch_size=2, data__max_length=48)
    other = TrainingSession(cfg, system_interval=0)
    other.start()
    qtbot.waitUntil(
        lambda: other.run_dir is not None and (other.run_dir / "metrics.jsonl").is_file(), timeout=60_000
    )
    holder = QWidget()
    qtbot.addWidget(holder)
    bridge = SessionBridge(holder, factory=lambda config, resume_from=None: FollowedRun(other.run_dir))
    starts, states, ends, steps = [], [], [], []

    def sort(batch: list) -> None:  # the bridge hands on batches; the window dispatches with a match
        for e in batch:
            match e:
                case StartEvent():
                    starts.append(e)
                case StateEvent(state=state):
                    states.append(state)
                case StepEvent():
                    steps.append(e)

    bridge.events.connect(sort)
    bridge.ended.connect(ends.append)
    try:
        assert bridge.start(None)
        qtbot.waitUntil(lambda: bool(starts) and bool(steps), timeout=60_000)
        assert starts[0].run_dir == str(other.run_dir) and bridge.active
        bridge.send(Pause())
        qtbot.waitUntil(lambda: bridge.state == "paused", timeout=30_000)
        paused_at = bridge.step
        bridge.send(Resume())
        qtbot.waitUntil(lambda: bridge.step > paused_at, timeout=30_000)
        bridge.send(Stop())
        qtbot.waitUntil(lambda: bool(ends), timeout=30_000)
    finally:
        other.send(Stop())
        other.join(60)
    assert ends[0].status == "stopped" and other.end is not None and other.end.status == "stopped"
    assert [s for s in states if s != "idle"][:6] == [
        "loading",
        "running",
        "paused",
        "running",
        "stopping",
        "finished",
    ]
    assert [e.step for e in steps] == list(range(1, len(steps) + 1)) and not bridge.active
