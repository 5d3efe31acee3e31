"""Commands from a file: JSON lines appended to it while a run goes (``<run>/control.jsonl``, or the
CLI's ``--control FILE``). Another process steers a run by appending to it, and a window following a
run folder sends its commands this way.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONTROL_FILE = "control.jsonl"


def append(path: Path, command: dict[str, Any]) -> None:
    """Add one command to a control file: one line in one write, which appends whole on a local disk."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(command) + "\n")


class ControlFile:
    """Tails FILE for JSON lines (only what is appended after ``offset``, by default its size when
    made) and hands each object to ``send``; ``say`` gets one line about each line that is not JSON."""

    def __init__(
        self,
        path: Path,
        send: Callable[[Any], None],
        say: Callable[[str], None],
        offset: int | None = None,
    ) -> None:
        self.path, self.send, self.say = path, send, say
        self.path.touch(exist_ok=True)
        self.offset = self.path.stat().st_size if offset is None else offset
        self.buffer = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tunedeck-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def poll(self) -> None:
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < self.offset:  # truncated or replaced: read it from the top
            self.offset = 0
        if size == self.offset:
            return
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.offset)
            self.buffer += f.read()
            self.offset = f.tell()
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                self.send(json.loads(line))
            except json.JSONDecodeError as e:
                self.say(f"control: ignored a line that is not JSON ({e.msg}): {line.strip()[:80]}")

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.poll()
