"""Where events go besides the caller: ``metrics.jsonl`` and TensorBoard, each one sink.

A sink is anything with ``write(event)`` and ``close()``; another logger is one more class. The
:class:`RunLog` holds back the events emitted before the run folder exists and hands every event to
every sink once it does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

from tunedeck.engine import durable
from tunedeck.engine.protocol import EndEvent, EvalEvent, Event, StartEvent, StepEvent, WarningEvent


class EventSink(Protocol):
    def write(self, event: Event) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """``<run>/metrics.jsonl``: one JSON object per event, written as it comes, appended on resume.

    It never raises: when a write fails (a full disk), the file is cut back to its last whole line,
    the events are kept in memory (up to ``MAX_PENDING``, then the oldest are dropped) and written
    on a later try, at most every ``RETRY_S`` seconds and at the end. The failure and the recovery
    are each said once, in :attr:`notices`.
    """

    RETRY_S = 1.0
    MAX_PENDING = 100_000

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.notices: list[Event] = []
        self._pending: deque[bytes] = deque()
        self._dropped = 0
        self._fd: int | None = None
        self._failing = False
        self._next_try = 0.0
        self._cause = ""

    def write(self, event: Event) -> None:
        self._pending.append((json.dumps(event.to_dict(), default=str) + "\n").encode("utf-8"))
        if len(self._pending) > self.MAX_PENDING:
            self._pending.popleft()
            self._dropped += 1
        if not self._failing or time.monotonic() >= self._next_try or isinstance(event, EndEvent):
            self._flush()

    def close(self) -> None:
        self._flush()
        if self._pending:
            self.notices.append(
                WarningEvent(
                    message=f"{self.path} misses its last {len(self._pending)} events: {self._cause}",
                    kind="config",
                    advice=durable.WRITE_ADVICE,
                )
            )
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def _flush(self) -> None:
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            while self._pending:
                self._append(self._pending[0])
                self._pending.popleft()
        except OSError as e:
            self._cause = durable.describe(e, self.path)
            self._next_try = time.monotonic() + self.RETRY_S
            if not self._failing:
                self._failing = True
                self.notices.append(
                    WarningEvent(
                        message=f"could not write {self.path}: {self._cause}; the run goes on and its "
                        "events are kept in memory until they can be written",
                        kind="config",
                        advice=durable.WRITE_ADVICE,
                    )
                )
            return
        if self._failing:
            self._failing = False
            lost = f"; the {self._dropped} oldest could not be kept" if self._dropped else ""
            self.notices.append(
                WarningEvent(
                    message=f"{self.path} is written again: the events held in memory are in it{lost}",
                    kind="config",
                    advice="",
                )
            )
            self._dropped = 0

    def _append(self, line: bytes) -> None:
        """One whole line or nothing: a short write is cut back off before the error goes up."""
        assert self._fd is not None
        end = os.lseek(self._fd, 0, os.SEEK_END)
        done = 0
        try:
            while done < len(line):
                n = os.write(self._fd, line[done:])
                if n == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
                done += n
        except OSError:
            if done:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, end)
            raise


class TensorBoardSink:
    """Scalars in ``<run>/tensorboard/``, named as HF Trainer names them (``train/loss``, ``eval/loss``).

    Opened at the ``start`` event, the one that knows the step a resume begins at: a resumed run's
    writer is opened with ``purge_step``, TensorBoard's way of dropping the steps the run redoes.
    Like :class:`JsonlSink` it never raises: scalars that could not be written are kept and written
    by a new writer (a new event file) on a later try; the failure is said once in :attr:`notices`.
    """

    STEP_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_s", "mem_allocated_mb")
    RETRY_S = 5.0
    MAX_PENDING = 100_000

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.notices: list[Event] = []
        self._writer: Any = None
        self._purge: int | None = None
        self._opened = False
        self._pending: deque[tuple[str, float, int]] = deque(maxlen=self.MAX_PENDING)
        self._failing = False
        self._next_try = 0.0

    @staticmethod
    def available() -> bool:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return False
        return True

    def write(self, event: Event) -> None:
        match event:
            case StartEvent(step=step, resumed_from=resumed) if not self._opened:
                self._opened = True
                self._purge = step + 1 if resumed else None
            case StepEvent() if self._opened:
                for key in self.STEP_KEYS:
                    value = getattr(event, key)
                    if value is not None:
                        self._pending.append((f"train/{key}", value, event.step))
            case EvalEvent() if self._opened:
                self._pending.append(("eval/loss", event.eval_loss, event.step))
            case _:
                return
        if not self._failing or time.monotonic() >= self._next_try:
            self._flush()

    def _flush(self) -> None:
        try:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(
                    log_dir=str(self.run_dir / "tensorboard"), purge_step=self._purge
                )
                self._purge = None  # a writer opened again after a failure keeps what is there
            for tag, value, step in self._pending:
                self._writer.add_scalar(tag, value, step)
            self._writer.flush()  # here, so that a failure surfaces now and the scalars are kept
            self._pending.clear()
        except Exception as e:  # OSError, or whatever tensorboard's writer thread raised
            self._drop_writer()
            self._next_try = time.monotonic() + self.RETRY_S
            if not self._failing:
                self._failing = True
                self.notices.append(
                    WarningEvent(
                        message=f"could not write TensorBoard files in {self.run_dir / 'tensorboard'}: "
                        f"{durable.describe(e, self.run_dir)}; they are written again when they can be",
                        kind="config",
                        advice=durable.WRITE_ADVICE,
                    )
                )
            return
        self._failing = False

    def _drop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()

    def close(self) -> None:
        if self._opened and self._pending:
            self._flush()
        self._drop_writer()


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

    No sink failure reaches the caller: :meth:`write` and :meth:`close` return the warnings the
    sinks had (a sink's ``notices``, or what it raised), already handed to every sink in turn.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Event] = []
        self._sinks: list[EventSink] | None = None
        self._broken: set[int] = set()  # sinks whose raising was said once
        self._extra: list[Event] = []  # those warnings, to go out with the sinks' own

    def open(self, sinks: list[EventSink]) -> list[Event]:
        with self._lock:
            self._sinks = sinks
            pending, self._pending = self._pending, []
            for event in pending:
                self._write(event)
            return self._notices()

    def write(self, event: Event) -> list[Event]:
        with self._lock:
            if self._sinks is None:
                self._pending.append(event)
                return []
            self._write(event)
            return self._notices()

    def _write(self, event: Event) -> None:
        assert self._sinks is not None
        for sink in self._sinks:
            try:
                sink.write(event)
            except Exception as e:  # a sink of someone else's that does raise
                if id(sink) not in self._broken:
                    self._broken.add(id(sink))
                    self._extra.append(
                        WarningEvent(
                            message=f"{type(sink).__name__} could not record an event: {type(e).__name__}: {e}",
                            kind="config",
                            advice="the run goes on; this sink may miss events",
                        )
                    )

    def _notices(self) -> list[Event]:
        """The sinks' new warnings, recorded in every sink themselves."""
        out: list[Event] = []
        for _ in range(2):  # a notice's own write may say one thing more (the recovery); no more
            new = self._extra
            self._extra = []
            for sink in self._sinks or []:
                notices = getattr(sink, "notices", None)
                if notices:
                    new += notices
                    notices.clear()
            if not new:
                break
            out += new
            for notice in new:
                self._write(notice)
        return out

    def close(self) -> list[Event]:
        with self._lock:
            for sink in self._sinks or []:
                with contextlib.suppress(Exception):  # its notices say what went wrong
                    sink.close()
            out: list[Event] = []
            for sink in self._sinks or []:
                notices = getattr(sink, "notices", None)
                if notices:
                    out += notices
                    notices.clear()
            return out
