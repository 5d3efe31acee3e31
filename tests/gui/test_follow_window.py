"""The window on runs whose processes are not its own thread: a run on 2 processes it launches itself
(``tunedeck-train --nproc-per-node 2`` as a child), and a run started from a terminal that it follows
(File > Follow run); the same plots and controls, and closing asks what becomes of the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.gui.conftest import FAST
from tunedeck.engine.follow import FollowedRun, LaunchedRun
from tunedeck.engine.protocol import Rollback, StepEvent
from tunedeck.engine.session import TrainingSession

ROOT = Path(__file__).resolve().parents[2]
CONSTANT = ("train.lr_scheduler_type=constant", "train.warmup_ratio=0")


def events_of(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["type"] == kind]


@pytest.mark.slow
def test_the_window_launches_a_run_on_two_processes_and_steers_it(
    make_window, make_config, qtbot, monkeypatch
):
    win = make_window()
    win.set_config(make_config("train.run_name=two", "train.max_steps=2000", *CONSTANT))
    win.setup.form.processes.setValue(2)
    assert win.controls.start_action.isEnabled() and win.setup.problem is None
    win.controls.start_action.trigger()
    run = win.bridge.session
    assert win.run_kind == "launched" and isinstance(run, LaunchedRun) and run.nproc == 2
    assert not win.setup.form.processes.isEnabled()  # locked while it goes, as every non-live setting
    qtbot.waitUntil(lambda: len(win.history) >= 3, timeout=180_000)
    assert win.history.model["world_size"] == 2 and win.history.run_dir == str(run.run_dir)
    assert "2 processes" in win.windowTitle() and win.status.where_label.text() == "2 processes"

    win.controls.pause_action.trigger()
    qtbot.waitUntil(lambda: win.status.state == "paused", timeout=60_000)
    paused_at = int(win.history.steps.last())
    # While paused every command is applied at once, in the order sent.
    win.setup.form.editor("train.learning_rate").set_raw("1e-3")
    win.setup.form.apply_button.click()
    win.controls.save_action.trigger()
    win.controls.eval_action.trigger()
    win.samples.prompt.setPlainText("Upper: cloud\n")
    win.samples.max_tokens.setValue(4)
    win.samples.button.click()
    qtbot.waitUntil(lambda: bool(win.samples.samples), timeout=60_000)
    assert [c.changes for c in win.history.changes] == [{"learning_rate": [3e-3, 1e-3]}]
    assert not win.setup.form.apply_button.isEnabled()  # the form shows what the run now uses
    assert win.history.checkpoints[-1][0] == paused_at and win.history.eval_steps.last() == paused_at
    assert win.samples.samples[0].step == paused_at and win.samples.samples[0].prompt == "Upper: cloud\n"
    win.plots.refresh(force=True)
    assert paused_at in win.plots.rollback.marks.steps  # the checkpoint's mark, to roll back to

    win.controls.pause_action.trigger()  # resume
    qtbot.waitUntil(lambda: win.history.steps.last() >= paused_at + 3, timeout=60_000)
    from_step = int(win.history.steps.last())
    win.send_rollback(Rollback(checkpoint=f"step-{paused_at:06d}"))  # what a click on its mark sends
    qtbot.waitUntil(lambda: bool(win.history.branches), timeout=60_000)
    (branch,) = win.history.branches
    assert branch.to_step == paused_at and branch.from_step >= from_step

    # Closing asks as for a run in the window's thread: stop and save, then close.
    asked = []
    monkeypatch.setattr(win, "ask_close", lambda: asked.append(1) or "stop")
    monkeypatch.setattr(win, "ask_close_followed", lambda: pytest.fail("a launched run is the window's own"))
    win.close()
    assert asked and win.isVisible()
    qtbot.waitUntil(lambda: not win.isVisible(), timeout=120_000)
    assert run.join(30) and run.proc.returncode == 0, run.log_path.read_text()[-2000:]
    assert win.history.status == "stopped" and not win.bridge.active
    assert (run.run_dir / "final" / "adapter_model.safetensors").is_file()
    steps = events_of(run.run_dir, "step")
    assert {s["learning_rate"] for s in steps if s["step"] > paused_at} == {1e-3}
    assert all(len(s["mem_peak_mb_ranks"]) == 2 for s in steps)
    assert json.loads((run.run_dir / "branches" / "1" / "branch.json").read_text())["to_step"] == paused_at


def test_processes_refuse_what_the_engine_refuses(make_window, make_config, qtbot):
    """The form asks the engine's own launch check: fsdp cannot shard a 4-bit model."""
    win = make_window()
    win.set_config(make_config("train.distributed=fsdp", "lora.enabled=true"))
    win.setup.form.processes.setValue(2)
    assert win.setup.problem is None and win.controls.start_action.isEnabled()
    win.setup.form.editor("quantization").set_raw("4-bit (QLoRA, NF4)")
    refused = (
        "train.distributed=fsdp cannot shard a quantized base model (model.load_in_4bit=true): FSDP2 shards "
        "plain tensors, not bitsandbytes' packed 4-bit/8-bit weights (use train.distributed=ddp (QLoRA in "
        "every process), or turn quantization off)"
    )
    assert win.setup.problem == refused and win.setup.form.processes_error.text() == refused
    assert not win.controls.start_action.isEnabled() and refused in win.controls.start_action.toolTip()
    assert win.start_run() is False and not win.bridge.active
    # One process does not shard: the same settings are then for the engine's thread to judge.
    win.setup.form.processes.setValue(1)
    assert win.setup.form.processes_error.isHidden()
    assert not win.setup.form.editor("train.distributed").widget.isEnabled()


def terminal_run(tmp_path: Path, name: str, *sets: str) -> subprocess.Popen:
    """``tunedeck-train`` started apart from the window, as from a terminal."""
    cmd = [sys.executable, "-m", "tunedeck.engine.cli", "--quiet", "--output-dir", str(tmp_path / "runs")]
    for s in (*FAST, f"train.run_name={name}", *CONSTANT, *sets):
        cmd += ["--set", s]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_following_a_run_started_from_a_terminal(make_window, qtbot, monkeypatch, tmp_path):
    proc = terminal_run(tmp_path, "t", "train.max_steps=5000")
    run_dir = tmp_path / "runs" / "t"
    try:
        qtbot.waitUntil(
            lambda: (run_dir / "metrics.jsonl").is_file() or proc.poll() is not None, timeout=120_000
        )
        assert proc.poll() is None, proc.stderr.read()
        win = make_window()
        assert win.follow_run(run_dir)
        assert win.run_kind == "follow" and isinstance(win.bridge.session, FollowedRun)
        qtbot.waitUntil(lambda: len(win.history) >= 3, timeout=60_000)
        assert win.history.steps.view[0] == 1  # its history from the start, then live
        form = win.setup.form
        assert form.editor("train.run_name").value() == "t" and win.setup.processes() == 1
        assert not form.processes.isEnabled() and not form.editor("data.max_length").widget.isEnabled()
        assert "(followed)" in win.setup.origin_label.text() and win.status.where_label.text() == "following"
        form.editor("train.learning_rate").set_raw("1e-3")
        form.apply_button.click()
        qtbot.waitUntil(lambda: bool(win.history.changes), timeout=30_000)
        assert win.history.changes[0].changes == {"learning_rate": [3e-3, 1e-3]}

        # Closing while following asks; leaving the run going closes the window at once.
        monkeypatch.setattr(win, "ask_close_followed", lambda: "leave")
        monkeypatch.setattr(win, "ask_close", lambda: pytest.fail("a followed run is not the window's own"))
        win.close()
        assert not win.isVisible() and not win.bridge.active
        time.sleep(1.0)
        assert proc.poll() is None  # still training
        assert [json.loads(x)["cmd"] for x in (run_dir / "control.jsonl").read_text().splitlines()] == ["set"]

        # Followed again, then its process is killed: no end event ever comes. The window says so
        # after a bounded silence and returns to idle.
        again = make_window()
        again.follow_silent_after_s = 3.0
        assert again.follow_run(run_dir)
        qtbot.waitUntil(lambda: again.status.state == "running", timeout=30_000)
        assert again.history.steps.view[0] == 1
        killed = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        qtbot.waitUntil(lambda: not again.bridge.active, timeout=30_000)
        assert time.monotonic() - killed < 15
        assert again.history.status == "failed" and again.status.state == "failed"
        assert "has written nothing for" in again.banner.message
        assert "its process has ended without finishing" in again.banner.message
        assert again.controls.start_action.isEnabled() and again.setup.form.processes.isEnabled()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.mark.slow
def test_closing_while_following_can_stop_the_run(make_window, make_config, qtbot, monkeypatch):
    other = TrainingSession(
        make_config("train.max_steps=5000", "train.run_name=elsewhere"), system_interval=1.0
    )
    other.start()  # in this process, but only its folder is shared with the window
    try:
        qtbot.waitUntil(
            lambda: other.run_dir is not None and (other.run_dir / "metrics.jsonl").is_file(), timeout=60_000
        )
        win = make_window()
        assert win.follow_run(other.run_dir)
        qtbot.waitUntil(lambda: len(win.history) >= 2, timeout=60_000)
        monkeypatch.setattr(win, "ask_close_followed", lambda: "stay")
        win.close()
        assert win.isVisible() and win.bridge.active and other.alive
        monkeypatch.setattr(win, "ask_close_followed", lambda: "stop")
        win.close()
        assert win.isVisible()  # until the run has saved and ended
        qtbot.waitUntil(lambda: not win.isVisible(), timeout=60_000)
        assert other.join(30) and other.end.status == "stopped" and win.history.status == "stopped"
        assert (other.run_dir / "final" / "adapter_model.safetensors").is_file()
    finally:
        if other.alive:
            other.send({"cmd": "cancel"})
            other.join(60)


def test_following_a_dead_run_or_a_folder_that_is_not_one(make_window, qtbot, tmp_path):
    win = make_window()
    assert not win.follow_run(tmp_path)
    assert win.banner.message == "Not a run folder to follow" and not win.bridge.active
    # A run killed long ago: its history, then "ended without finishing" at once, not a wait.
    run_dir = tmp_path / "runs" / "old"
    run_dir.mkdir(parents=True)
    events = [{"type": "start", "run_id": "old", "total_steps": 10, "run_dir": str(run_dir), "time": 1.0}]
    events += [StepEvent(step=s, loss=3.0 - s / 10, time=1.0 + s).to_dict() for s in range(1, 5)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    os.utime(run_dir / "metrics.jsonl", (time.time() - 3600, time.time() - 3600))
    assert win.follow_run(run_dir)
    qtbot.waitUntil(lambda: not win.bridge.active, timeout=5_000)
    assert len(win.history) == 4 and win.history.status == "failed"
    assert win.banner.message.startswith("the run has written nothing for 3")
    assert " s and has no end event: its process has ended without finishing" in win.banner.message
