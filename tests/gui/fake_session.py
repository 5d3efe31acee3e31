"""A stand-in for engine.session.TrainingSession: its API, emitting synthetic events.

Used where the real engine would only add time (bridge mechanics, closing the window, event
floods); the window's main tests drive the real engine.
"""

from __future__ import annotations

import json
import math
import queue
import time
from pathlib import Path

from tunedeck.engine.config import LIVE_KEYS
from tunedeck.engine.protocol import (
    Cancel,
    ChangeEvent,
    CheckpointEvent,
    EndEvent,
    ErrorEvent,
    Eval,
    EvalEvent,
    Pause,
    ProgressEvent,
    Resume,
    Sample,
    SampleEvent,
    Save,
    Set,
    StartEvent,
    StateEvent,
    StepEvent,
    Stop,
    command_from_dict,
)
from tunedeck.engine.session import TrainingSession


class FakeSession(TrainingSession):
    """TrainingSession's own start/send/drain/join/alive around a fake run, so the API cannot drift."""

    def __init__(
        self,
        config,
        resume_from=None,
        *,
        steps: int = 200,
        delay: float = 0.005,
        fail_at: int | None = None,
        die_silently: bool = False,
        tokenize_rows: int = 0,
        device: str = "fake",
    ) -> None:
        super().__init__(config, resume_from, system_interval=0)
        self.steps = steps
        self.delay = delay
        self.fail_at = fail_at
        self.die_silently = die_silently
        self.tokenize_rows = tokenize_rows  # report loading and tokenizing progress first
        self.device = device
        self._metrics = None
        self.sent: list = []

    def send(self, cmd) -> None:
        self.sent.append(command_from_dict(cmd) if isinstance(cmd, dict) else cmd)
        super().send(self.sent[-1])

    # -- the fake run
    def _emit(self, ev) -> None:  # its own metrics.jsonl: the real RunLog would add TensorBoard files
        if self._metrics is not None:
            self._metrics.write(json.dumps(ev.to_dict()) + "\n")
            self._metrics.flush()
        self._events.put(ev)

    def _main(self) -> None:
        t = self.config.train
        run_id = t.run_name or f"fake-{int(time.time() * 1000)}"
        self.run_dir = Path(t.output_dir) / run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.run_dir / "metrics.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        try:
            self._run(run_id)
        finally:
            self._metrics.close()

    def _run(self, run_id: str) -> None:
        t = self.config.train
        lr = t.learning_rate
        self._emit(StateEvent(state="loading"))
        if self.tokenize_rows:
            self._emit(ProgressEvent(stage="model", done=0, total=1))  # as the engine says it
            time.sleep(0.3)
            self._emit(ProgressEvent(stage="model", done=1, total=1))
            for done in range(0, self.tokenize_rows + 1, self.tokenize_rows // 4):
                self._emit(
                    ProgressEvent(stage="tokenizing", done=done, total=self.tokenize_rows, unit="rows")
                )
                time.sleep(0.3)
        self._emit(
            StartEvent(
                run_id=run_id,
                config=self.config.to_dict(),
                model={"device": self.device},
                data={"train_examples": 100, "eval_examples": 5},
                total_steps=self.steps,
                run_dir=str(self.run_dir),
            )
        )
        if self.die_silently:
            return  # the thread ends with no end event
        self._emit(StateEvent(state="running"))
        state, status, step = "running", "completed", 0
        start = time.time()
        while step < self.steps:
            while True:  # commands at the step boundary; block while paused
                try:
                    cmd = self._commands.get(block=state == "paused", timeout=0.05)
                except queue.Empty:
                    if state == "paused":
                        continue
                    break
                if isinstance(cmd, Stop):
                    status = "stopped"
                elif isinstance(cmd, Cancel):
                    status = "cancelled"
                elif isinstance(cmd, Pause):
                    state = "paused"
                    self._emit(StateEvent(state="paused"))
                elif isinstance(cmd, Resume):
                    state = "running"
                    self._emit(StateEvent(state="running"))
                elif isinstance(cmd, Set):
                    bad = [k for k in cmd.values if k not in LIVE_KEYS]
                    if bad:
                        self._emit(
                            ErrorEvent(message=f"{bad[0]} cannot be changed while a run goes", kind="config")
                        )
                        continue
                    if "learning_rate" in cmd.values:
                        self._emit(
                            ChangeEvent(
                                step=step, changes={"learning_rate": [lr, cmd.values["learning_rate"]]}
                            )
                        )
                        lr = cmd.values["learning_rate"]
                elif isinstance(cmd, Sample):
                    self._emit(SampleEvent(step=step, prompt=cmd.prompt, text="fake text"))
                elif isinstance(cmd, Eval):
                    self._emit(EvalEvent(step=step, eval_loss=2.05, perplexity=7.8))
                elif isinstance(cmd, Save):
                    self._emit(
                        CheckpointEvent(step=step, path=str(self.run_dir / f"checkpoints/step-{step:06d}"))
                    )
                if status != "completed":
                    break
            if status != "completed":
                break
            step += 1
            if self.fail_at is not None and step == self.fail_at:
                self._emit(ErrorEvent(message="CUDA out of memory (fake)", kind="oom", advice=""))
                self._emit(EndEvent(status="failed", step=step - 1))
                return
            self._emit(
                StepEvent(
                    step=step,
                    epoch=step / self.steps,
                    loss=2 + math.exp(-step / 30),
                    learning_rate=lr,
                    grad_norm=1.0,
                    tokens=100,
                    tokens_per_s=1000.0,
                    step_time_s=self.delay,
                    mem_allocated_mb=10.0,
                    elapsed_s=time.time() - start,
                    eta_s=1.0,
                    total_steps=self.steps,
                )
            )
            if t.eval_steps and step % t.eval_steps == 0:
                self._emit(EvalEvent(step=step, eval_loss=2.1, perplexity=8.2))
            if self.delay:
                time.sleep(self.delay)
        output = None
        if status in ("completed", "stopped"):
            final = self.run_dir / "final"
            final.mkdir(exist_ok=True)
            (final / "adapter_model.safetensors").write_bytes(b"fake")
            output = str(final)
        self._emit(StateEvent(state="finished"))
        self._emit(EndEvent(status=status, step=step, output=output))


def factory(**kw):
    """A session factory for SessionBridge / MainWindow that builds FakeSessions with ``kw``."""
    made: list[FakeSession] = []

    def make(config, resume_from=None):
        s = FakeSession(config, resume_from, **kw)
        made.append(s)
        return s

    make.made = made  # type: ignore[attr-defined]
    return make
