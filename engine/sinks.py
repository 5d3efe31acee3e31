"""Where events go besides the caller: ``metrics.jsonl`` and TensorBoard, each one sink.

A sink is anything with ``write(event)`` and ``close()``; another logger is one more class. The
:class:`RunLog` holds back the events emitted before the run folder exists and hands every event to
every sink once it does.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

from tunedeck.engine import durable
from tunedeck.engine.protocol import (
    EndEvent,
    EvalEvent,
    Event,
    RollbackEvent,
    StartEvent,
    StepEvent,
    WarningEvent,
)


class EventSink(Protocol):
    def write(self, event: Event) -> None: ...

    def close(self) -> None: ...


class _Appender:
    """Appends whole records to a file, or nothing: a short write (a disk that filled up midway) is
    cut back off before the error goes up, so the file always ends with a whole record. The file
    is opened again after a failure, so a path set right meanwhile is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def append(self, record: bytes) -> None:
        try:
            if self._fd is None:
                self.path.parent.mkdir(exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            end = os.lseek(self._fd, 0, os.SEEK_END)
        except OSError:
            self.close()
            raise
        done = 0
        try:
            while done < len(record):
                n = os.write(self._fd, record[done:])
                if n == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
                done += n
        except OSError:
            if done:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, end)
            self.close()
            raise

    def close(self, sync: bool = False) -> None:
        if self._fd is not None:
            if sync:
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class _Retrying:
    """Records kept in memory while they cannot be written, retried at most every ``RETRY_S``
    seconds; the failure and the recovery are each said once, in :attr:`notices`."""

    RETRY_S = 1.0
    MAX_PENDING = 100_000
    what = ""

    def __init__(self) -> None:
        self.notices: list[Event] = []
        self._pending: deque[Any] = deque()
        self._dropped = 0
        self._failing = False
        self._next_try = 0.0
        self._cause = ""

    def _keep(self, record: Any) -> None:
        self._pending.append(record)
        if len(self._pending) > self.MAX_PENDING:
            self._pending.popleft()
            self._dropped += 1

    def _due(self, now: bool = False) -> bool:
        return now or not self._failing or time.monotonic() >= self._next_try

    def _flush(self) -> None:
        try:
            while self._pending:
                self._write(self._pending[0])
                self._pending.popleft()
        except Exception as e:  # OSError, or whatever a library raised for it
            self._cause = durable.describe(e, self._where())
            self._next_try = time.monotonic() + self.RETRY_S
            if not self._failing:
                self._failing = True
                self.notices.append(
                    WarningEvent(
                        message=f"could not write {self.what}: {self._cause}; the run goes on and its "
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
                    message=f"{self.what} is written again: the events held in memory are in it{lost}",
                    kind="config",
                    advice="",
                )
            )
            self._dropped = 0

    def _left_over(self) -> None:
        if self._pending:
            self.notices.append(
                WarningEvent(
                    message=f"{self.what} misses its last {len(self._pending)} events: {self._cause}",
                    kind="config",
                    advice=durable.WRITE_ADVICE,
                )
            )

    def _write(self, record: Any) -> None:
        raise NotImplementedError

    def _where(self) -> Path:
        raise NotImplementedError


class JsonlSink(_Retrying):
    """``<run>/metrics.jsonl``: one JSON object per event, written as it comes, appended on resume.

    It never raises: when a write fails (a full disk), the file is left ending with a whole line,
    the events are kept in memory (up to ``MAX_PENDING``, then the oldest are dropped) and written
    on a later try, at most every ``RETRY_S`` seconds, and at the end.
    """

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.path = run_dir / "metrics.jsonl"
        self.what = str(self.path)
        self._file = _Appender(self.path)

    def write(self, event: Event) -> None:
        self._keep((json.dumps(event.to_dict(), default=str) + "\n").encode("utf-8"))
        if self._due(now=isinstance(event, EndEvent)):
            self._flush()

    def close(self) -> None:
        self._flush()
        self._left_over()
        self._file.close(sync=True)

    def _write(self, record: bytes) -> None:
        self._file.append(record)

    def _where(self) -> Path:
        return self.path


class TensorBoardSink(_Retrying):
    """Scalars in ``<run>/tensorboard/``, named as HF Trainer names them (``train/loss``, ``eval/loss``).

    Opened at the ``start`` event, the one that knows the step a resume begins at: a resumed run's
    file starts with TensorBoard's purge marker (as ``SummaryWriter(purge_step=)`` writes it), which
    drops the steps the run redoes. A rollback writes the same marker: TensorBoard shows the
    trajectory the run is on (metrics.jsonl keeps the abandoned branches too). The records are
    written here, in the engine's thread, and not by ``SummaryWriter``'s background thread, so a
    failed write is kept and retried like :class:`JsonlSink`'s rather than lost with a traceback
    from that thread.
    """

    STEP_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_s", "mem_allocated_mb")
    RETRY_S = 5.0

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.folder = run_dir / "tensorboard"
        self.what = f"the TensorBoard log in {self.folder}"
        self._file: _Appender | None = None

    @staticmethod
    def available() -> bool:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return False
        return True

    def write(self, event: Event) -> None:
        from tensorboard.compat.proto.event_pb2 import Event as TBEvent

        match event:
            case StartEvent(step=step, resumed_from=resumed) if self._file is None:
                name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.tunedeck"
                self._file = _Appender(self.folder / name)
                self._keep(TBEvent(wall_time=time.time(), file_version="brain.Event:2"))
                if resumed:
                    self._purge_from(step + 1)
            case RollbackEvent(to_step=to_step) if self._file is not None:
                self._purge_from(to_step + 1)
            case StepEvent() if self._file is not None:
                for key in self.STEP_KEYS:
                    value = getattr(event, key)
                    if value is not None:
                        self._keep(_scalar(f"train/{key}", value, event.step))
            case EvalEvent() if self._file is not None:
                self._keep(_scalar("eval/loss", event.eval_loss, event.step))
            case _:
                return
        if self._due():
            self._flush()

    def _purge_from(self, step: int) -> None:
        """The events ``SummaryWriter(purge_step=step)`` starts its file with: TensorBoard drops the
        steps from ``step`` on that it read before them."""
        from tensorboard.compat.proto.event_pb2 import Event as TBEvent
        from tensorboard.compat.proto.event_pb2 import SessionLog

        now = time.time()
        self._keep(TBEvent(wall_time=now, step=step, file_version="brain.Event:2"))
        self._keep(TBEvent(wall_time=now, step=step, session_log=SessionLog(status=SessionLog.START)))

    def close(self) -> None:
        if self._file is not None:
            self._flush()
            self._left_over()
            self._file.close(sync=True)

    def _write(self, record: Any) -> None:
        from tensorboard.summary.writer.record_writer import RecordWriter

        assert self._file is not None
        framed = io.BytesIO()
        RecordWriter(framed).write(record.SerializeToString())
        self._file.append(framed.getvalue())

    def _where(self) -> Path:
        return self.folder


def _scalar(tag: str, value: float, step: int) -> Any:
    from tensorboard.compat.proto.event_pb2 import Event as TBEvent
    from tensorboard.compat.proto.summary_pb2 import Summary

    return TBEvent(
        wall_time=time.time(), step=step, summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)])
    )


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
            self._sinks = []  # a late event (a thread the run left behind) goes nowhere
            return out
