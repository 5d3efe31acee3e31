"""Commands from a file: JSON lines appended to it while a run goes (``<run>/control.jsonl``, or the
CLI's ``--control FILE``). Another process steers a run by appending to it, and a window following a
run folder sends its commands this way.

Only what is written after the start counts. Every line that is not a command (not UTF-8, not
JSON, not a command object) becomes an ``error`` event, recorded in metrics.jsonl like the
engine's own, and the reader goes on: nothing a file holds stops it. Lines are read as bytes and
decoded whole, so a character split across two writes is read once complete. A file rewritten
rather than appended to (an editor's save, ``>`` for ``>>``) is followed: what it holds beyond
the text already read is new, or, when its start changed, all of it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunedeck.engine.errors import ConfigError
from tunedeck.engine.protocol import ErrorEvent, Event

CONTROL_FILE = "control.jsonl"
EXAMPLE = 'one JSON object per line, e.g. {"cmd": "set", "learning_rate": 5e-5} or {"cmd": "stop"}'
_TAIL = 64  # bytes before the read position compared to tell an append from a rewrite


def append(path: Path, command: dict[str, Any]) -> None:
    """Add one command to a control file: one line in one write, which appends whole on a local disk."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(command) + "\n")


def check_path(path: Path) -> None:
    """Refuse, before anything loads, a control path that cannot be a file to follow."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--control {path} is a folder, not a file", "give a file name, e.g. control.jsonl")
    if not path.parent.is_dir():
        raise ConfigError(
            f"--control {path}: the folder {path.parent} does not exist",
            "create it, or give a file in a folder that exists",
        )
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise ConfigError(
            f"--control {path} cannot be opened: {e.strerror}", "give a file you can write to"
        ) from None


class ControlFile:
    """Follows ``path`` and hands each command to ``send``; bad lines go to ``report`` as errors.
    ``offset``: where this run's commands begin (by default, the file's end when made)."""

    POLL_S = 0.2

    def __init__(
        self,
        path: Path,
        send: Callable[[Any], None],
        report: Callable[[Event], None],
        offset: int | None = None,
    ) -> None:
        self.path, self.send, self.report = Path(path), send, report
        check_path(self.path)
        before = self._read_all() or b""
        # What was there before this run is not for it; what follows ``offset`` is.
        self._seen = before if offset is None else before[:offset]
        self._identity = self._stat_identity()
        self._partial = b""
        self._lines = 0
        self._last_problem = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tunedeck-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def poll(self) -> None:
        """Read what is new and hand it on (called every ``POLL_S`` by the thread)."""
        for line in self._new_lines():
            self._line(line)

    def _run(self) -> None:
        while not self._stop.wait(self.POLL_S):
            try:
                self.poll()
            except Exception as e:  # a reader that dies would ignore every later stop
                problem = f"control: could not read {self.path}: {type(e).__name__}: {e}"
                if problem != self._last_problem:  # said once, not every poll
                    self._last_problem = problem
                    self.report(ErrorEvent(message=problem, kind="config", advice="the run goes on"))

    # ---------------------------------------------------------------- reading

    def _stat_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _read_all(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def _new_lines(self) -> list[bytes]:
        new = self._new_bytes()
        if not new:
            return []
        *lines, self._partial = (self._partial + new).split(b"\n")
        return lines

    def _new_bytes(self) -> bytes:
        identity = self._stat_identity()
        if identity is None:
            return b""  # removed: wait for it to come back
        size = os.stat(self.path).st_size
        seen = len(self._seen)
        if identity == self._identity and size >= seen:
            with open(self.path, "rb") as f:
                f.seek(max(0, seen - _TAIL))
                tail = f.read(min(seen, _TAIL))
                if tail == self._seen[seen - len(tail) :]:
                    new = f.read()
                    self._seen += new
                    return new
        # Replaced or rewritten: what follows the text already read is new; a changed start, all of it.
        data = self._read_all()
        if data is None:
            return b""
        self._identity = identity
        if data.startswith(self._seen):
            new = data[seen:]
        else:
            new, self._partial = data, b""
        self._seen = data
        return new

    # ---------------------------------------------------------------- one line

    def _line(self, raw: bytes) -> None:
        self._lines += 1
        if not raw.strip():
            return
        where = f"control: line {self._lines} of {self.path}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self._bad(
                f"{where} is not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); ignored"
            )
            return
        try:
            command = json.loads(text)
        except ValueError as e:  # JSONDecodeError, and numbers too long to read
            shown = text.strip()
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            self._bad(f"{where} is not JSON ({getattr(e, 'msg', e)}); ignored: {shown}")
            return
        except RecursionError:
            self._bad(f"{where} nests too deep to read; ignored")
            return
        self.send(command)  # the session turns a malformed command into an error event

    def _bad(self, message: str) -> None:
        self.report(ErrorEvent(message=message, kind="config", advice=EXAMPLE))
