"""Following a run from another process: its folder is the interface.

``<run>/metrics.jsonl`` grows as the run goes (one event per line, flushed as written) and
``<run>/control.jsonl`` takes commands (the run's session reads what is appended to it). A
:class:`RunFollower` reads the first and appends to the second. :class:`FollowedRun` and
:class:`LaunchedRun` wrap it in ``TrainingSession``'s interface (``start``, ``send``, ``drain``,
``join``, ``alive``), so whatever drives a session in a thread (the window's bridge, a test) drives them
the same way: a live run folder started elsewhere (a terminal, one process or many), or
``tunedeck-train --nproc-per-node N`` started here as a child process.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import yaml

from tunedeck.engine import config as config_mod
from tunedeck.engine.config import Config
from tunedeck.engine.control import CONTROL_FILE, append
from tunedeck.engine.errors import ConfigError, TunedeckError
from tunedeck.engine.protocol import (
    Command,
    EndEvent,
    ErrorEvent,
    Event,
    StartEvent,
    StepEvent,
    WarningEvent,
    command_from_dict,
    event_from_dict,
)

METRICS_FILE = "metrics.jsonl"
# A live run writes at least a system event a second (rank 0's sampler, paused or not): a run folder
# silent this long, with no end event, is taken as a run whose process has gone (killed, or its machine).
SILENT_AFTER_S = 30.0


class RunFollower:
    """Reads ``<run>/metrics.jsonl`` as it grows, from ``offset`` (by default its start, so the history
    comes first), and appends commands to ``<run>/control.jsonl``.

    Tolerant: a last line still being written waits for its end; a line that is not an event is skipped
    with one warning; a file cut shorter (replaced) is read again from its start. In what one read
    returns, an ``end`` that a later ``start`` follows (a resumed run's earlier part) is left out, so
    ``end`` means the run as it is now has ended.
    """

    def __init__(self, run_dir: str | Path, offset: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.metrics = self.run_dir / METRICS_FILE
        self.control = self.run_dir / CONTROL_FILE
        self.offset = offset
        self._partial = b""
        self.end: EndEvent | None = None
        self._skipped = 0

    @property
    def ready(self) -> bool:
        """True once the run has opened its metrics file (commands can then be sent)."""
        return self.metrics.is_file()

    def poll(self) -> list[Event]:
        """The events written since the last poll."""
        if not self.metrics.is_file():
            return []
        size = self.metrics.stat().st_size
        if size < self.offset:
            self.offset, self._partial = 0, b""
        if size == self.offset:
            return []
        with open(self.metrics, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        self.offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        events: list[Event] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                events.append(event_from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                self._skipped += 1
                if self._skipped == 1:
                    events.append(
                        WarningEvent(
                            message=f"{self.metrics} has a line that is not an event; skipped: "
                            f"{line[:80].decode('utf-8', 'replace')}",
                            kind="internal",
                            advice="the run itself is not affected",
                        )
                    )
        last_start = max((i for i, e in enumerate(events) if isinstance(e, StartEvent)), default=-1)
        events = [e for i, e in enumerate(events) if not (isinstance(e, EndEvent) and i < last_start)]
        for e in events:
            if isinstance(e, EndEvent):
                self.end = e
            elif isinstance(e, StartEvent):
                self.end = None
        return events

    def send(self, command: Command | dict[str, Any]) -> None:
        """Append a command for the run (checked first: a malformed one raises ConfigError)."""
        if isinstance(command, dict):
            command = command_from_dict(command)
        append(self.control, command.to_dict())


class FollowedRun:
    """A live run folder, driven like a ``TrainingSession``: its events come from its metrics file,
    commands go to its control file. ``alive`` until the run's ``end`` event has been read.

    A run whose process is killed writes no end event. Its folder then falls silent: after
    ``silent_after_s`` seconds without a new line (a live run writes a system event every second), an
    error and a failed end are said here, so whatever follows it is never left waiting. A folder
    already that silent when followed (a run killed long ago) ends at the first drain, after its
    history."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        offset: int = 0,
        must_exist: bool = True,
        silent_after_s: float = SILENT_AFTER_S,
    ) -> None:
        run_dir = Path(run_dir)
        if must_exist and not (run_dir / METRICS_FILE).is_file():
            raise ConfigError(
                f"{run_dir} holds no {METRICS_FILE}, so it is not a run folder",
                "pick a folder under a run's output_dir, e.g. runs/20250101-120000",
            )
        self.follower = RunFollower(run_dir, offset)
        self.run_dir: Path | None = run_dir
        self.end: EndEvent | None = None
        self.silent_after_s = silent_after_s
        self.step = 0  # the newest step read
        self._local: deque[Event] = deque()  # events said here (refused commands), not by the run
        self._started = False
        self._last_growth: float | None = None  # monotonic time the metrics file last grew

    def start(self) -> None:
        self._started = True

    def send(self, command: Command | dict[str, Any]) -> None:
        try:
            self.follower.send(command)
        except TunedeckError as e:
            self._local.append(ErrorEvent(message=e.message, kind=e.kind, advice=e.advice))
        except OSError as e:
            self._local.append(
                ErrorEvent(
                    message=f"could not send to {self.follower.control}: {e.strerror or e}",
                    kind="internal",
                    advice="check that the run folder is still there and writable",
                )
            )

    def drain(self, max_items: int | None = None) -> list[Event]:
        if not self._started:
            return []
        before = self.follower.offset
        read = self.follower.poll()
        out = list(self._local) + read
        self._local.clear()
        for e in read:
            if isinstance(e, StepEvent):
                self.step = e.step
        self.end = self.end or self.follower.end
        if self.end is None and self._watches_silence():
            out += self._check_silence(grew=self.follower.offset != before)
        return out

    def _watches_silence(self) -> bool:
        return self.follower.ready

    def _check_silence(self, grew: bool) -> list[Event]:
        now = time.monotonic()
        if self._last_growth is None:  # first look: the file's own age says how long it has been silent
            age = 0.0
            with contextlib.suppress(OSError):
                age = max(0.0, time.time() - self.follower.metrics.stat().st_mtime)
            self._last_growth = now - age
        elif grew:
            self._last_growth = now
            return []
        silent = now - self._last_growth
        if silent < self.silent_after_s:
            return []
        end = EndEvent(status="failed", step=self.step, output=None)
        self.follower.end = self.end = end
        return [
            ErrorEvent(
                message=f"the run has written nothing for {silent:.0f} s and has no end event: its process "
                "has ended without finishing (killed, or its machine went down)",
                kind="internal",
                advice=f"its metrics and checkpoints so far are in {self.follower.run_dir}; resume from its "
                "newest checkpoint to go on",
            ),
            end,
        ]

    def join(self, timeout: float | None = None) -> bool:
        return True  # nothing of the run lives in this process

    @property
    def alive(self) -> bool:
        return self.follower.end is None

    def sampler(self) -> None:
        return None


def yaml_value(value: Any) -> str:
    """``value`` as ``--set`` reads it back (YAML flow style: 1.0e-05, [q_proj, v_proj], {a: 1})."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20)
    return text.removesuffix("\n...\n").strip()


def check_launch(cfg: Config, nproc: int) -> None:
    """Raise the ConfigError that ``tunedeck-train --nproc-per-node N`` refuses ``cfg`` with (its launcher
    options' check, then the engine's preflight on N processes), so a window refuses exactly that, up
    front."""
    from tunedeck.engine import launch, preflight

    args = launch.parser().parse_args(["--nproc-per-node", str(nproc)])
    problem = launch.check(args)
    if problem:
        raise ConfigError(problem, "choose fewer processes")
    preflight.check(cfg, world_size=launch.world_size(args))


class LaunchedRun(FollowedRun):
    """``tunedeck-train --nproc-per-node N`` started as a child process (in a session of its own, so it
    outlives this process if asked to) and followed through its run folder. When the child ends without
    an ``end`` event (it could not start, or was killed), an error and a failed end are said here, with
    the last lines it printed."""

    def __init__(
        self,
        config: Config | None,
        resume_from: str | Path | None = None,
        *,
        nproc: int = 2,
        python: str = sys.executable,
    ) -> None:
        if config is None and resume_from is None:
            raise ValueError("a LaunchedRun needs a config or a checkpoint to resume from")
        self.config, self.resume_from, self.nproc, self.python = config, resume_from, nproc, python
        self._work = Path(tempfile.mkdtemp(prefix="tunedeck-launch-"))
        self.log_path = self._work / "output.log"
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self._name: str | None = None
        self._resumed_cfg: Config | None = None
        run_dir = self._planned_run_dir()
        # A resume into its run's own folder: only what is written from now on is this run's.
        offset = (run_dir / METRICS_FILE).stat().st_size if (run_dir / METRICS_FILE).is_file() else 0
        super().__init__(run_dir, offset=offset, must_exist=False)
        self._pending: list[Command] = []  # sent before the run has opened its folder

    def _planned_run_dir(self) -> Path:
        """The run folder the child will write, by the engine's own rules: a resumed run's own folder
        when it continues there, else a fresh name it is given (``--set train.run_name``)."""
        if self.resume_from is not None:
            from tunedeck.engine import resume as resume_mod

            # What a resume cannot change is refused here, in the engine's words, before anything starts.
            cfg, resumed = resume_mod.prepare(self.resume_from, self.config)
            self._resumed_cfg = resumed.cfg
            home = resume_mod.home(resumed, cfg.train)
            if home is not None:
                return home
            root = resume_mod.output_root(resumed, cfg.train)
        else:
            assert self.config is not None
            cfg = self.config
            root = Path(cfg.train.output_dir)
        base = cfg.train.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
        name, n = base, 1
        while (root / name).exists():
            n += 1
            name = f"{base}-{n}"
        self._name = name
        return root / name

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "tunedeck.engine.cli", "--quiet", "--nproc-per-node", str(self.nproc)]
        cmd += ["--on-nonfinite", "pause"]  # the window can lower the LR and resume it
        if self.resume_from is not None:
            cmd += ["--resume", str(self.resume_from)]
            if self.config is not None and self._resumed_cfg is not None:
                # The settings asked for, as the CLI takes them with a resume: what differs, with --set.
                for dotted, (_, new) in config_mod.diff(self._resumed_cfg, self.config).items():
                    if not (dotted == "train.run_name" and self._name is not None):
                        cmd += ["--set", f"{dotted}={yaml_value(new)}"]
        else:
            assert self.config is not None
            cfg_file = self._work / "config.yaml"
            config_mod.save(self.config, cfg_file)
            cmd.append(str(cfg_file))
        if self._name is not None:
            cmd += ["--set", f"train.run_name={self._name}"]
        return cmd

    def start(self) -> None:
        if self.proc is not None:
            raise RuntimeError("a LaunchedRun runs once; make a new one for the next run")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed when the child has ended)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self._started = True

    def send(self, command: Command | dict[str, Any]) -> None:
        if not self.follower.ready:
            try:  # checked now, sent once the run has opened its folder
                self._pending.append(command_from_dict(command) if isinstance(command, dict) else command)
            except TunedeckError as e:
                self._local.append(ErrorEvent(message=e.message, kind=e.kind, advice=e.advice))
            return
        super().send(command)

    def drain(self, max_items: int | None = None) -> list[Event]:
        if self.follower.ready and self._pending:
            pending, self._pending = self._pending, []
            for c in pending:
                super().send(c)
        out = super().drain(max_items)
        if self.proc is not None and self.proc.poll() is not None and self.follower.end is None:
            out += self.follower.poll()  # what it wrote just before it ended
            if self.follower.end is None:
                out += self._ended_without_end()
        return out

    def _ended_without_end(self) -> list[Event]:
        assert self.proc is not None
        if self._log is not None:
            self._log.close()
        tail = [x for x in self.log_path.read_text(errors="replace").splitlines() if x.strip()][-3:]
        first = next((x for x in tail if "error" in x.lower()), tail[-1] if tail else "no output")
        end = EndEvent(status="failed", step=0, output=None)
        self.follower.end = self.end = end
        return [
            ErrorEvent(
                message=f"the run's processes ended (exit status {self.proc.returncode}) without an end event: "
                f"{first.strip()[:300]}",
                kind="internal",
                advice=f"their output is in {self.log_path}",
            ),
            end,
        ]

    def _watches_silence(self) -> bool:
        return False  # the child process itself says when the run has gone (see drain)

    def join(self, timeout: float | None = None) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    @property
    def alive(self) -> bool:
        running = self.proc is not None and self.proc.poll() is None
        return running or (self._started and self.follower.end is None and self.end is None)

    def wait_ready(self, timeout: float) -> bool:
        """Block until the run has opened its folder (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        while not self.follower.ready and time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            time.sleep(0.1)
        return self.follower.ready
