"""The one place where the engine's background thread meets Qt's main thread.

:class:`SessionBridge` owns a ``TrainingSession``. A QTimer on the main thread drains the
session's events every ~50 ms and re-emits them as one Qt signal per batch (``events``; ``ended``
once the run is over), so the step rate never
drives the GUI: at 10,000 steps/s the window still sees 20 batches a second. Commands go the
other way through :meth:`send`, which never blocks and never raises (the engine answers a refused
command with an ``error`` event).

If the session cannot even be built, or its thread ends without an ``end`` event, the bridge
reports an ``error`` and a ``failed`` end itself, so the window always returns to a sane state.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QTimer, Signal

from tunedeck.engine.errors import TunedeckError
from tunedeck.engine.protocol import (
    CheckpointEvent,
    Command,
    EndEvent,
    ErrorEvent,
    EvalEvent,
    Event,
    StateEvent,
    StepEvent,
)
from tunedeck.gui.collector import collect_in_gui_thread

log = logging.getLogger(__name__)

SessionFactory = Callable[..., Any]


def default_factory(config, resume_from=None, find_lr_only=None):
    from tunedeck.engine.session import TrainingSession  # imported late: it pulls in torch

    # The window's event loop shares this process: on the CPU it keeps a core of its own.
    return TrainingSession(config, resume_from=resume_from, leave_a_core_free=True, find_lr_only=find_lr_only)


class SessionBridge(QObject):
    """Drains a TrainingSession on a timer and re-emits its events in batches (``events``, then ``ended``)."""

    events = Signal(list)  # every drained batch, in order
    ended = Signal(object)  # EndEvent; the session's thread is over when this fires

    def __init__(
        self,
        parent: QObject | None = None,
        factory: SessionFactory | None = None,
        interval_ms: int = 50,
    ) -> None:
        super().__init__(parent)
        collect_in_gui_thread()  # an engine thread will share this process (see gui/collector.py)
        self.factory = factory or default_factory
        self.session: Any = None
        self.state = "idle"
        self.step = 0
        self._ended = True
        self._timer = QTimer(self)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self.poll)

    # ------------------------------------------------------------------ control

    @property
    def active(self) -> bool:
        """True from start() until the end event has been delivered."""
        return not self._ended

    def start(
        self,
        config,
        resume_from: str | Path | None = None,
        factory: SessionFactory | None = None,
        find_lr_only: Any = None,
    ) -> bool:
        """Build and start a session (with ``factory`` instead of the bridge's own, say a run launched
        as a child process or a run folder followed; with ``find_lr_only``, a FindLR: one that only runs
        that range test). Returns False (after emitting error + end) if it could not."""
        if self.active:
            raise RuntimeError("a run is already going")
        self._ended = False
        self.state = "loading"
        self.step = 0
        self.session = None
        try:
            extra = {"find_lr_only": find_lr_only} if find_lr_only is not None else {}
            self.session = (factory or self.factory)(config, resume_from=resume_from, **extra)
            self.session.start()
        except Exception as e:  # the window must survive whatever the engine raises here
            log.exception("could not start the training session")
            self._deliver([self._error_event(e), EndEvent(status="failed", step=0, output=None)])
            return False
        self._timer.start()
        return True

    def send(self, cmd: Command | dict) -> None:
        if self.session is None or not self.active:
            return
        try:
            self.session.send(cmd)
        except Exception as e:  # a session is not supposed to raise here; report, don't crash
            self._deliver([self._error_event(e)])

    def poll(self) -> None:
        """Drain what the engine has said since the last tick (runs on the main thread)."""
        s = self.session
        if s is None or self._ended:
            self._timer.stop()
            return
        try:
            batch = list(s.drain())
        except Exception as e:
            batch = [self._error_event(e)]
        if not any(isinstance(ev, EndEvent) for ev in batch) and not s.alive:
            # The thread is gone; take whatever it left, and if it said no end, say it ourselves.
            with contextlib.suppress(Exception):
                batch += list(s.drain())
            if not any(isinstance(ev, EndEvent) for ev in batch):
                batch.append(
                    ErrorEvent(
                        message="the training thread ended without reporting why",
                        kind="internal",
                        advice="see the terminal for a traceback",
                    )
                )
                batch.append(EndEvent(status="failed", step=self.step, output=None))
        if batch:
            self._deliver(batch)

    def release(self) -> None:
        """Stop draining a session without ending it: a followed run goes on in its own process."""
        self._timer.stop()
        self._ended = True
        self.state = "idle"
        self.session = None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the session's thread is over (for shutdown); True when it is."""
        if self.session is None:
            return True
        try:
            return bool(self.session.join(timeout))
        except Exception:
            return True

    # ------------------------------------------------------------------ internals

    def _error_event(self, e: BaseException) -> ErrorEvent:
        if isinstance(e, TunedeckError):
            return ErrorEvent(message=e.message, kind=e.kind, advice=e.advice)
        return ErrorEvent(
            message=f"{type(e).__name__}: {e}",
            kind="internal",
            advice="this is a bug in Tunedeck; the traceback is in the terminal",
        )

    def _deliver(self, batch: list[Event]) -> None:
        end: EndEvent | None = None
        for i, ev in enumerate(batch):
            match ev:
                case EndEvent():
                    end = ev
                    batch = batch[: i + 1]  # everything after the end event is dropped: the run is over
                    break
                case StateEvent(state=state):
                    self.state = state
                case StepEvent(step=step) | EvalEvent(step=step) | CheckpointEvent(step=step):
                    self.step = max(self.step, step)
        if end is not None:
            self._timer.stop()
            self._ended = True
            self.state = "idle"
            self.wait(2.0)  # the thread only closes its log after the end event
        self.events.emit(batch)
        if end is not None:
            self.ended.emit(end)
