"""Following a run through its folder: the tolerant reader, a run started in a terminal, and
``tunedeck-train --nproc-per-node 2`` started and steered as a child process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine.helpers import make_cfg
from tests.engine.helpers import run as run_trainer
from tunedeck.engine.errors import ConfigError
from tunedeck.engine.follow import FollowedRun, LaunchedRun, RunFollower
from tunedeck.engine.protocol import EndEvent, Pause, StartEvent, StepEvent, Stop

ROOT = Path(__file__).resolve().parents[2]


def line(**event) -> bytes:
    return (json.dumps({"time": 1.0, **event}) + "\n").encode()


def test_reader_waits_for_whole_lines_skips_junk_and_rereads_a_replaced_file(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    follower = RunFollower(tmp_path)
    assert follower.poll() == [] and not follower.ready
    step = line(type="step", step=1, loss=2.5)
    metrics.write_bytes(line(type="start", run_id="r", step=0) + step[:10])
    (start,) = follower.poll()
    assert isinstance(start, StartEvent) and start.run_id == "r"
    with open(metrics, "ab") as f:
        f.write(step[10:] + b"not json\n" + line(type="telemetry", x=1) + line(type="step", step=2, loss=2.0))
    got = follower.poll()
    assert [type(e).__name__ for e in got] == ["StepEvent", "WarningEvent", "StepEvent"]
    assert [e.step for e in got if isinstance(e, StepEvent)] == [1, 2] and got[0].loss == 2.5
    assert "has a line that is not an event; skipped: not json" in got[1].message
    assert follower.poll() == []
    # A resumed run's folder: its earlier part ended, a later start goes on; only the last end counts.
    metrics.write_bytes(
        line(type="start", step=0) + line(type="end", status="stopped", step=3) + line(type="start", step=3)
    )
    got = follower.poll()
    assert [e.type for e in got] == ["start", "start"] and follower.end is None
    with open(metrics, "ab") as f:
        f.write(line(type="end", status="completed", step=6))
    (end,) = follower.poll()
    assert isinstance(end, EndEvent) and follower.end == end


def test_follow_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ConfigError) as e:
        FollowedRun(tmp_path)
    assert e.value.one_line() == (
        f"{tmp_path} holds no metrics.jsonl, so it is not a run folder "
        "(pick a folder under a run's output_dir, e.g. runs/20250101-120000)"
    )
    (tmp_path / "metrics.jsonl").write_text("")
    run = FollowedRun(tmp_path)
    run.start()
    run.send({"cmd": "set"})  # refused here, before it reaches the run
    (error,) = run.drain()
    assert error.type == "error" and error.message == "set names no hyperparameter"
    assert not (tmp_path / "control.jsonl").exists()


def test_a_run_folder_that_falls_silent_without_an_end_is_said_to_have_ended(tmp_path):
    """A killed run writes no end event; a live one writes a line at least every second."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(line(type="start", run_id="r", step=0) + line(type="step", step=1, loss=2.0))
    run = FollowedRun(tmp_path, silent_after_s=1.0)
    run.start()
    assert [e.type for e in run.drain()] == ["start", "step"]
    for s in range(2, 8):  # growing: alive, however long it goes on
        time.sleep(0.25)
        with open(metrics, "ab") as f:
            f.write(line(type="system", rss_mb=1.0) if s % 2 else line(type="step", step=s, loss=1.0))
        assert [e.type for e in run.drain()] in (["system"], ["step"]) and run.alive
    time.sleep(0.3)
    assert run.drain() == [] and run.alive  # a short silence: within the bound
    time.sleep(1.0)
    error, end = run.drain()
    assert re.fullmatch(
        r"the run has written nothing for \d+ s and has no end event: its process has ended without "
        r"finishing \(killed, or its machine went down\)",
        error.message,
    )
    assert (end.status, end.step) == ("failed", 6) and not run.alive and run.end == end
    assert run.drain() == []  # said once


def drain_until(run, test, timeout: float) -> list:
    events: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += run.drain()
        if test(events):
            return events
        time.sleep(0.1)
    raise AssertionError(f"timed out; last events: {[e.type for e in events[-10:]]}")


@pytest.mark.slow
def test_following_a_run_started_in_a_terminal(tmp_path):
    """One tunedeck-train process started apart; followed from its folder, paused, changed, stopped."""
    cmd = [sys.executable, "-m", "tunedeck.engine.cli", "--output-dir", str(tmp_path), "--quiet"]
    for s in ("train.run_name=t", "train.max_steps=300", "train.per_device_train_batch_size=2", "data.max_length=64",
              "train.lr_scheduler_type=constant", "train.warmup_ratio=0", "train.eval_steps=0"):  # fmt: skip
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not (tmp_path / "t" / "metrics.jsonl").is_file():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        run = FollowedRun(tmp_path / "t")
        run.start()
        events = drain_until(run, lambda ev: any(isinstance(e, StepEvent) for e in ev), 120)
        assert events[0].type == "state" and any(isinstance(e, StartEvent) for e in events)  # from the start
        run.send(Pause())
        events = drain_until(run, lambda ev: any(getattr(e, "state", "") == "paused" for e in ev), 60)
        paused_at = max(e.step for e in events if isinstance(e, StepEvent))
        run.send({"cmd": "set", "learning_rate": 1e-3})
        run.send({"cmd": "resume"})
        run.send({"cmd": "stop"})
        events = drain_until(run, lambda ev: any(isinstance(e, EndEvent) for e in ev), 60)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and not run.alive and run.end is not None and run.end.status == "stopped"
    (change,) = [e for e in events if e.type == "change"]
    assert change.step == paused_at and change.changes == {"learning_rate": [3e-3, 1e-3]}
    assert all(e.learning_rate == 1e-3 for e in events if isinstance(e, StepEvent) and e.step > paused_at)


@pytest.mark.slow
def test_a_launch_that_cannot_start_reports_why(tmp_path):
    cfg = make_cfg(tmp_path, train__distributed="fsdp", model__load_in_8bit=True)
    run = LaunchedRun(cfg, nproc=2)
    run.start()
    events = drain_until(run, lambda ev: any(isinstance(e, EndEvent) for e in ev), 120)
    error, end = events[-2:]
    assert end.status == "failed" and not run.alive and run.join(1)
    assert error.message.startswith("the run's processes ended (exit status 2) without an end event: ")
    assert "train.distributed=fsdp cannot shard a quantized base model" in error.message
    assert not run.run_dir.exists()


@pytest.mark.slow
def test_launched_on_two_processes_steered_and_interrupted(tmp_path):
    """The window's way to run on N > 1 processes: started as a child, followed and steered through its
    folder; then Ctrl-C to the child's process group, as from its terminal, stops and saves it."""
    cfg = make_cfg(
        tmp_path,
        train__run_name="two",
        train__max_steps=400,
        train__per_device_train_batch_size=2,
        train__lr_scheduler_type="constant",
        data__max_length=64,
    )
    run = LaunchedRun(cfg, nproc=2)
    assert run.run_dir == tmp_path / "runs" / "two"
    run.send(Pause())  # before the run has a folder: kept, then sent
    run.start()
    try:
        events = drain_until(run, lambda ev: any(getattr(e, "state", "") == "paused" for e in ev), 240)
        start = next(e for e in events if isinstance(e, StartEvent))
        assert start.model["world_size"] == 2 and start.run_dir == str(run.run_dir)
        paused_at = max((e.step for e in events if isinstance(e, StepEvent)), default=0)
        for c in ({"cmd": "eval"}, {"cmd": "save"}, {"cmd": "sample", "prompt": "Hi", "max_new_tokens": 4},
                  {"cmd": "set", "learning_rate": 1e-3}, {"cmd": "resume"}):  # fmt: skip
            run.send(c)
        events += drain_until(
            run, lambda ev: any(isinstance(e, StepEvent) and e.step > paused_at + 1 for e in ev), 60
        )
        os.killpg(run.proc.pid, signal.SIGINT)
        events += drain_until(run, lambda ev: any(isinstance(e, EndEvent) for e in ev), 120)
        assert run.join(60)
    finally:
        if run.proc is not None and run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
    output = run.log_path.read_text()
    assert run.proc.returncode == 0, output[-3000:]
    assert events[-1].status == "stopped" and not run.alive
    kinds = [e.type for e in events]
    assert kinds.count("start") == 1 and kinds.count("end") == 1
    steps = [e.step for e in events if isinstance(e, StepEvent)]
    assert steps == list(range(1, len(steps) + 1))  # rank 0 alone reports, each step once
    i = next(i for i, e in enumerate(events) if getattr(e, "state", "") == "paused")
    seen = [e for e in events[i:] if e.type in ("eval", "checkpoint", "sample", "change", "state")][:6]
    assert [e.type for e in seen] == ["state", "eval", "checkpoint", "sample", "change", "state"]
    assert seen[-1].state == "running" and all(e.step == paused_at for e in seen[1:5])
    assert {e.learning_rate for e in events if isinstance(e, StepEvent) and e.step > paused_at} == {1e-3}
    assert all(len(e.mem_peak_mb_ranks) == 2 for e in events if isinstance(e, StepEvent))
    assert output.count("interrupt: stopping after this step and saving") == 1
    assert (run.run_dir / "checkpoints" / f"step-{paused_at:06d}").is_dir()
    assert (run.run_dir / "checkpoints" / f"step-{events[-1].step:06d}").is_dir()
    assert (run.run_dir / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_launch_sends_the_resumes_settings_as_the_cli_takes_them(tmp_path):
    """A resume on N processes: the checkpoint's own folder when it continues there; the settings that
    differ from the checkpoint's go as --set, as tunedeck-train takes them with --resume."""
    cfg = make_cfg(tmp_path, train__max_steps=4, train__save_steps=1, train__run_name="r")
    _, trainer = run_trainer(cfg, at={2: [Stop()]})  # stopped at step 2: its newest state is step 2
    ckpts = trainer.run_dir / "checkpoints"
    asked = cfg.copy()
    asked.train.learning_rate = 1e-3
    newest = LaunchedRun(asked, ckpts / "step-000002", nproc=2)
    assert newest.run_dir == trainer.run_dir  # continues in its own folder
    cmd = newest.command()
    assert cmd[cmd.index("--resume") + 1] == str(ckpts / "step-000002")
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"] == ["train.learning_rate=0.001"]
    older = LaunchedRun(asked, ckpts / "step-000001", nproc=2)  # an older state: a new folder beside it
    assert older.run_dir == trainer.run_dir.parent / "r-2"
    assert "train.run_name=r-2" in older.command()
