"""TrainingSession: one run in a background thread, driven by commands, observed through events.

The GUI, the CLI and the tests all go through this class. ``send`` and ``drain`` never block;
every event is also appended to ``<run>/metrics.jsonl`` (flushed per line) and, when the
``tensorboard`` package is installed, to TensorBoard event files in the run folder. Commands appended to
``<run>/control.jsonl`` while the run goes are sent as well, so another process (a window following the
run folder) can steer it.
"""

from __future__ import annotations

import queue
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunedeck.engine.config import Config
from tunedeck.engine.control import CONTROL_FILE, ControlFile
from tunedeck.engine.errors import TunedeckError, keep_traceback
from tunedeck.engine.monitor import SystemSampler
from tunedeck.engine.protocol import (
    Cancel,
    Command,
    EndEvent,
    ErrorEvent,
    Event,
    FindLR,
    WarningEvent,
    command_from_dict,
)
from tunedeck.engine.sinks import RunLog, default_sinks

if TYPE_CHECKING:
    from tunedeck.engine.distributed import Dist
    from tunedeck.engine.sampling import Sampler
    from tunedeck.engine.trainer import Trainer


class TrainingSession:
    """A run in a background thread. ``start()``, then ``send()`` commands and ``drain()`` events.

    ``config`` may be None when ``resume_from`` is given: the run then continues with the config
    stored in the checkpoint, live changes included. ``system_interval`` is the period of the
    system sampler in seconds; 0 turns it off (with ``train.logging_steps`` above 1, monitoring off).
    ``leave_a_core_free``: on the CPU, train on all cores but one; a window in the same process sets
    it, so its event loop keeps a core (headless, every core trains). ``find_lr_only``: set up, run
    that learning-rate range test (an ``lr_find`` event and ``<run>/lr_find.json``) and end, untrained.
    ``on_nonfinite``: ``pause`` on a non-finite loss (the window, or a CLI with a control file, can
    lower the LR and resume) or ``stop`` (a headless run that nothing can resume ends as failed, with
    the last finite weights saved). ``dist`` places the run's process among several; only rank 0's
    session writes the run folder, samples the system and reads the control file (the others' events
    stay in their queue).
    """

    def __init__(
        self,
        config: Config | None,
        resume_from: str | Path | None = None,
        *,
        system_interval: float = 1.0,
        leave_a_core_free: bool = False,
        find_lr_only: FindLR | None = None,
        on_nonfinite: str = "pause",
        dist: Dist | None = None,
    ) -> None:
        if config is None and resume_from is None:
            raise ValueError("a TrainingSession needs a config or a checkpoint to resume from")
        self.config = config
        self.resume_from = resume_from
        self.system_interval = system_interval
        self.leave_a_core_free = leave_a_core_free
        self.find_lr_only = find_lr_only
        self.on_nonfinite = on_nonfinite
        self.dist = dist
        self._events: queue.Queue[Event] = queue.Queue()
        self._commands: queue.Queue[Command] = queue.Queue()
        self._cancel = threading.Event()
        self._log = RunLog()
        self._ending = threading.Lock()  # one end event, whether the run's or abandon()'s
        self._control: ControlFile | None = None
        self._thread: threading.Thread | None = None
        self._trainer: Trainer | None = None
        self.run_dir: Path | None = None
        self.end: EndEvent | None = None
        self._main_process = dist is None or dist.is_main
        if not self._main_process:
            self._log.open([])  # rank 0 alone writes the run folder

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("a TrainingSession runs once; make a new one for the next run")
        self._thread = threading.Thread(target=self._main, name="tunedeck-train", daemon=True)
        self._thread.start()

    def send(self, command: Command | dict[str, Any] | Any) -> None:
        """Queue a command for the next optimizer-step boundary; a malformed one becomes an error event.
        ``cancel`` also takes effect at once: ahead of queued commands and between generated tokens."""
        if not isinstance(command, Command):  # a dict, or whatever a JSON line held
            try:
                command = command_from_dict(command)
            except TunedeckError as e:
                self._emit(ErrorEvent(message=e.message, kind=e.kind, advice=e.advice))
                return
            except Exception as e:  # whatever JSON a control file holds, the caller goes on
                self._emit(
                    ErrorEvent(message=f"malformed command {command!r}: {e}", kind="config", advice="")
                )
                return
        if isinstance(command, Cancel):
            self._cancel.set()
        self._commands.put(command)

    def report(self, event: Event) -> None:
        """Record a warning or error found outside the engine (a bad control line) like its own:
        in the events and in metrics.jsonl."""
        self._emit(event)

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

    def sampler(self) -> Sampler | None:
        """After the run has ended: the trained model, kept in memory for generation until this session
        is dropped (None before the end, or when the model never loaded)."""
        if self.end is None or self._trainer is None:
            return None
        return self._trainer.sampler()

    def _emit(self, event: Event) -> None:
        # A sink that cannot write says so once (a warning), and keeps the event to write later.
        for notice in self._log.write(event):
            self._events.put(notice)
        self._events.put(event)

    def abandon(
        self, message: str | None, kind: str = "internal", advice: str = "", status: str = "failed"
    ) -> None:
        """End the run's record now without waiting for its thread (stuck, e.g., in a collective whose
        other side is gone, or in a call that does not return after a cancel): an error (when there
        is a ``message``) and an end of ``status`` go to the events and the run folder. A no-op once
        the run has ended by itself."""
        self._finish(
            EndEvent(status=status, step=self._trainer.step if self._trainer else 0, output=None),
            ErrorEvent(message=message, kind=kind, advice=advice) if message is not None else None,
        )

    def _set_run_dir(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        control = run_dir / CONTROL_FILE
        # Its size now: a follower appends only after it has seen this run's start event, written later.
        offset = control.stat().st_size if control.exists() else 0
        for notice in self._log.open(default_sinks(run_dir)):
            self._events.put(notice)
        try:
            self._control = ControlFile(control, self.send, self.report, offset=offset)
        except TunedeckError as e:  # e.g. a folder named control.jsonl: the run goes on without it
            self._emit(WarningEvent(message=e.message, kind=e.kind, advice="the run goes on without it"))
            return
        self._control.start()

    def _finish(self, end: EndEvent, error: Event | None = None) -> None:
        with self._ending:
            if self.end is not None:
                return
            if self._control is not None:
                self._control.stop()
            if error is not None:
                self._emit(error)
            self.end = end
            # The end goes out last: after what writing it (and closing the log) had to say.
            for notice in self._log.write(end) + self._log.close():
                self._events.put(notice)
            self._events.put(end)

    def _main(self) -> None:
        import torch

        from tunedeck.engine import resume as resume_mod
        from tunedeck.engine.trainer import Trainer

        monitor = None
        try:
            resume = None
            config = self.config
            if self.resume_from is not None:  # refused differences end here, before anything loads
                config, resume = resume_mod.prepare(self.resume_from, self.config)
            assert config is not None
            self._trainer = Trainer(
                config,
                self._emit,
                self._commands,
                resume,
                on_run_dir=self._set_run_dir if self._main_process else None,
                cancel=self._cancel,
                on_nonfinite=self.on_nonfinite,
                dist=self.dist,
                leave_a_core_free=self.leave_a_core_free,
                find_lr_only=self.find_lr_only,
            )
            if self.system_interval > 0 and self._main_process:  # 0 turns the system sampler off
                monitor = SystemSampler(
                    self._emit, use_gpu=torch.cuda.is_available(), interval=self.system_interval
                )
                monitor.start()
            end = self._trainer.run()
        except TunedeckError as e:  # a checkpoint that cannot be resumed
            self._emit(ErrorEvent(message=e.message, kind=e.kind, advice=e.advice))
            end = EndEvent(status="failed", step=0, output=None)
        except Exception as e:  # the engine thread never dies silently, nor takes its host down
            where = keep_traceback(traceback.format_exc(), self.run_dir)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self._emit(
                ErrorEvent(
                    message=f"internal error: {type(e).__name__}: {first}",
                    kind="internal",
                    advice=f"this is a bug; the traceback is {where}",
                )
            )
            end = EndEvent(status="failed", step=self._trainer.step if self._trainer else 0, output=None)
        finally:
            if monitor is not None:
                monitor.stop()
        self._finish(end)
