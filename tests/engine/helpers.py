"""Run the trainer in the test's own thread, with commands injected at exact step boundaries."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunedeck.engine import cli
from tunedeck.engine import config as config_mod
from tunedeck.engine import resume as resume_mod
from tunedeck.engine.protocol import Command, Event, StepEvent
from tunedeck.engine.sinks import JsonlSink, RunLog
from tunedeck.engine.trainer import Trainer


def make_cfg(tmp_path: Path, **overrides: Any) -> config_mod.Config:
    """The demo preset, made small and deterministic: override with dotted keys, e.g. train__max_steps=5."""
    cfg = config_mod.load(Path(__file__).resolve().parents[2] / "resources" / "presets" / "demo.yaml")
    sets = {
        "train.output_dir": str(tmp_path / "runs"),
        "train.max_steps": 6,
        "train.eval_steps": 0,
        "train.save_steps": 0,
        "train.per_device_train_batch_size": 4,
        "train.warmup_ratio": 0.0,
        "lora.dropout": 0.0,
        "train.lr_scheduler_type": "linear",
    }
    sets.update({k.replace("__", "."): v for k, v in overrides.items()})
    return config_mod.apply_overrides(cfg, [f"{k}={v}" for k, v in sets.items()])


def run(
    cfg: config_mod.Config | None,
    at: dict[int, list[Command]] | None = None,
    resume_from: Path | None = None,
    metrics: bool = False,
) -> tuple[list[Event], Trainer]:
    """Run to the end; ``at[n]`` commands are queued when step n is first reported, so they apply before
    step n+1 (once: a rollback that reports step n again does not send them again). With ``resume_from``,
    ``cfg`` is the config asked for, compared with the checkpoint's as a resume does (None: the checkpoint's).
    ``metrics``: the events also go to the run folder's metrics.jsonl, as a session writes them."""
    at = dict(at or {})
    events: list[Event] = []
    commands: queue.Queue = queue.Queue()
    log = RunLog()

    def emit(e: Event) -> None:
        if metrics:
            log.write(e)
        events.append(e)
        if isinstance(e, StepEvent):
            for c in at.pop(e.step, []):
                commands.put(c)

    for c in at.pop(0, []):
        commands.put(c)
    resume = None
    if resume_from is not None:
        cfg, resume = resume_mod.prepare(resume_from, cfg)
    assert cfg is not None, "run() needs a config or a checkpoint"
    opened = (lambda run_dir: log.open([JsonlSink(run_dir)])) if metrics else None
    trainer = Trainer(cfg, emit, commands, resume=resume, on_run_dir=opened)
    emit(trainer.run())
    log.close()
    return events, trainer


def of(events: list[Event], kind: str) -> list[Any]:
    return [e for e in events if e.type == kind]


def steps(events: list[Event]) -> dict[int, StepEvent]:
    return {e.step: e for e in events if isinstance(e, StepEvent)}


class CliRun:
    """``tunedeck-train ARGS`` in a thread of this process, as a terminal would run it, with the
    events of its run folder ``run_dir`` read as they are written."""

    def __init__(self, args: list[str], run_dir: Path) -> None:
        self.metrics = run_dir / "metrics.jsonl"
        self.result: dict[str, int] = {}
        self.thread = threading.Thread(target=lambda: self.result.update(code=cli.main(args)))
        self.thread.start()

    def events(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        return [json.loads(x) for x in self.metrics.read_text().splitlines()]

    def wait_for(self, test: Callable[[list[dict]], bool], deadline: float | None = None) -> None:
        """Until ``test(events)`` holds; fails once the run has ended or ``deadline`` (monotonic time;
        by default 120 s from now) has passed."""
        deadline = time.monotonic() + 120 if deadline is None else deadline
        while not test(self.events()):
            assert time.monotonic() < deadline and self.thread.is_alive()
            time.sleep(0.05)

    def join(self, timeout: float = 120) -> int | None:
        """The exit status, or None while it still runs after ``timeout`` seconds."""
        self.thread.join(timeout)
        return self.result.get("code")
