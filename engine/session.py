"""TrainingSession: one run in a background thread, driven by commands, observed through events.

The GUI, the CLI and the tests all go through this class. ``send`` and ``drain`` never block;
every event is also appended to ``<run>/metrics.jsonl`` (flushed per line) and, when the
``tensorboard`` package is installed, to TensorBoard event files in the run folder.
"""

from __future__ import annotations

import json
import queue
import threading
import traceback
from pathlib import Path
from typing import Any

from tunedeck.engine.config import Config
from tunedeck.engine.errors import TunedeckError
from tunedeck.engine.monitor import SystemSampler
from tunedeck.engine.protocol import (
    Command,
    EndEvent,
    ErrorEvent,
    EvalEvent,
    Event,
    StartEvent,
    StepEvent,
    command_from_dict,
)


class RunLog:
    """Writes events to metrics.jsonl; holds back those emitted before the run folder exists.

    A resumed run appends to the same files from its checkpoint's step on. In metrics.jsonl its
    ``start`` event (``step`` = the checkpoint's step) marks that the steps logged after it before are
    superseded (the GUI drops them); in TensorBoard the writer is opened with ``purge_step``, the
    TensorBoard way of saying the same, so its curves show each step once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Event] = []
        self._file = None
        self._run_dir: Path | None = None
        self._tb = None

    def open(self, run_dir: Path) -> None:
        with self._lock:
            self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            self._run_dir = run_dir
            pending, self._pending = self._pending, []
            for e in pending:
                self._write(e)

    def write(self, event: Event) -> None:
        with self._lock:
            if self._file is None:
                self._pending.append(event)
            else:
                self._write(event)

    def _write(self, event: Event) -> None:
        self._file.write(json.dumps(event.to_dict(), default=str) + "\n")
        self._file.flush()
        if isinstance(event, StartEvent) and self._tb is None:
            # Opened here, not with the folder: only the start event knows the step a resume begins at.
            self._tb = _tensorboard(self._run_dir, purge_step=event.step + 1 if event.resumed_from else None)
        if self._tb is not None:
            if isinstance(event, StepEvent):
                for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "mem_allocated_mb"):
                    value = getattr(event, key)
                    if value is not None:
                        self._tb.add_scalar(f"train/{key}", value, event.step)
            elif isinstance(event, EvalEvent):
                self._tb.add_scalar("eval/loss", event.eval_loss, event.step)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
            if self._tb is not None:
                self._tb.close()


def _tensorboard(run_dir: Path, purge_step: int | None) -> Any:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)


class TrainingSession:
    """A run in a background thread. ``start()``, then ``send()`` commands and ``drain()`` events.

    ``config`` may be None when ``resume_from`` is given: the run then continues with the config
    stored in the checkpoint, live changes included. ``system_interval`` is the period of the
    system sampler in seconds; 0 turns it off (with ``train.logging_steps`` above 1, monitoring off).
    """

    def __init__(
        self, config: Config | None, resume_from: str | Path | None = None, *, system_interval: float = 1.0
    ) -> None:
        self.config = config
        self.resume_from = resume_from
        self.system_interval = system_interval
        self._events: queue.Queue[Event] = queue.Queue()
        self._commands: queue.Queue[Command] = queue.Queue()
        self._log = RunLog()
        self._thread: threading.Thread | None = None
        self.run_dir: Path | None = None
        self.end: EndEvent | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("a TrainingSession runs once; make a new one for the next run")
        self._thread = threading.Thread(target=self._main, name="tunedeck-train", daemon=True)
        self._thread.start()

    def send(self, command: Command | dict[str, Any]) -> None:
        """Queue a command for the next optimizer-step boundary; a malformed one becomes an error event."""
        if isinstance(command, dict):
            try:
                command = command_from_dict(command)
            except TunedeckError as e:
                self._emit(ErrorEvent(message=e.message, kind=e.kind, advice=e.advice))
                return
        self._commands.put(command)

    def drain(self, max_items: int | None = None) -> list[Event]:
        out: list[Event] = []
        while max_items is None or len(out) < max_items:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                break
        return out

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _emit(self, event: Event) -> None:
        self._log.write(event)
        self._events.put(event)

    def _set_run_dir(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._log.open(run_dir)

    def _main(self) -> None:
        from tunedeck.engine.trainer import Trainer

        sampler = None
        try:
            trainer = Trainer(
                self.config, self._emit, self._commands, self.resume_from, on_run_dir=self._set_run_dir
            )
            import torch

            if self.system_interval > 0:  # 0 turns the system sampler off
                sampler = SystemSampler(
                    self._emit, use_gpu=torch.cuda.is_available(), interval=self.system_interval
                )
                sampler.start()
            end = trainer.run()
        except Exception as e:  # the engine thread never dies silently, nor takes its host down
            self._emit(
                ErrorEvent(
                    message=f"internal error: {type(e).__name__}: {e}",
                    kind="internal",
                    advice="this is a bug; the traceback is in metrics.jsonl",
                )
            )
            self._log.write(ErrorEvent(message=traceback.format_exc(), kind="internal", advice=""))
            end = EndEvent(status="failed", step=getattr(locals().get("trainer"), "step", 0), output=None)
        finally:
            if sampler is not None:
                sampler.stop()
        self.end = end
        self._emit(end)
        self._log.close()
