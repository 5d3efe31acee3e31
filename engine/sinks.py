"""Where events go besides the caller: ``metrics.jsonl`` and TensorBoard, each one sink.

A sink is anything with ``write(event)`` and ``close()``; another logger is one more class. The
:class:`RunLog` holds back the events emitted before the run folder exists and hands every event to
every sink once it does.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import IO, Any, Protocol

from tunedeck.engine.protocol import EvalEvent, Event, RollbackEvent, StartEvent, StepEvent


class EventSink(Protocol):
    def write(self, event: Event) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """``<run>/metrics.jsonl``: one JSON object per event, flushed as written, appended on resume."""

    def __init__(self, run_dir: Path) -> None:
        self._file: IO[str] = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def write(self, event: Event) -> None:
        self._file.write(json.dumps(event.to_dict(), default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """Scalars in ``<run>/tensorboard/``, named as HF Trainer names them (``train/loss``, ``eval/loss``).

    Opened at the ``start`` event, the one that knows the step a resume begins at: a resumed run's
    writer is opened with ``purge_step``, TensorBoard's way of dropping the steps the run redoes. A
    rollback reopens it the same way: TensorBoard shows the trajectory the run is on (metrics.jsonl
    keeps the abandoned branches too).
    """

    STEP_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_s", "mem_allocated_mb")

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._writer: Any = None

    @staticmethod
    def available() -> bool:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return False
        return True

    def write(self, event: Event) -> None:
        match event:
            case StartEvent(step=step, resumed_from=resumed) if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                purge = step + 1 if resumed else None
                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)
            case RollbackEvent(to_step=to_step) if self._writer is not None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer.close()
                self._writer = SummaryWriter(
                    log_dir=str(self.run_dir / "tensorboard"), purge_step=to_step + 1
                )
            case StepEvent() if self._writer is not None:
                for key in self.STEP_KEYS:
                    value = getattr(event, key)
                    if value is not None:
                        self._writer.add_scalar(f"train/{key}", value, event.step)
            case EvalEvent() if self._writer is not None:
                self._writer.add_scalar("eval/loss", event.eval_loss, event.step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def default_sinks(run_dir: Path) -> list[EventSink]:
    sinks: list[EventSink] = [JsonlSink(run_dir)]
    if TensorBoardSink.available():
        sinks.append(TensorBoardSink(run_dir))
    return sinks


class RunLog:
    """Hands events to the run folder's sinks; holds back those emitted before the folder exists.

    A resumed run appends to the same files from its checkpoint's step on. In metrics.jsonl its
    ``start`` event (``step`` = the checkpoint's step) marks that the steps logged after it before are
    superseded (the GUI drops them); TensorBoard purges them (see :class:`TensorBoardSink`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Event] = []
        self._sinks: list[EventSink] | None = None

    def open(self, sinks: list[EventSink]) -> None:
        with self._lock:
            self._sinks = sinks
            pending, self._pending = self._pending, []
            for event in pending:
                self._write(event)

    def write(self, event: Event) -> None:
        with self._lock:
            if self._sinks is None:
                self._pending.append(event)
            else:
                self._write(event)

    def _write(self, event: Event) -> None:
        assert self._sinks is not None
        for sink in self._sinks:
            sink.write(event)

    def close(self) -> None:
        with self._lock:
            for sink in self._sinks or []:
                sink.close()
            self._sinks = []  # a late event (a thread the run left behind) goes nowhere
