"""One exception type for every mistake a user can make or fault a run can hit.

Its ``kind`` matches the ``kind`` field of ``error``/``warning`` events, so a raise anywhere in
the engine turns into the same one-line message in the CLI, the GUI and metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

KINDS = ("data", "config", "oom", "nan", "model", "internal")


class TunedeckError(Exception):
    """A problem with a clear cause: ``message`` names it, ``advice`` says how to fix it."""

    def __init__(self, message: str, *, kind: str = "config", advice: str = "") -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.advice = advice

    def one_line(self) -> str:
        return f"{self.message} ({self.advice})" if self.advice else self.message


class ConfigError(TunedeckError):
    def __init__(self, message: str, advice: str = "") -> None:
        super().__init__(message, kind="config", advice=advice)


class DataError(TunedeckError):
    def __init__(self, message: str, advice: str = "") -> None:
        super().__init__(message, kind="data", advice=advice)


class ModelError(TunedeckError):
    def __init__(self, message: str, advice: str = "") -> None:
        super().__init__(message, kind="model", advice=advice)


def keep_traceback(text: str, run_dir: Path | None) -> str:
    """Put the traceback of a bug on stderr and in a log file: the run folder's ``error.log``, or
    before there is one, a file in the cache's ``logs/``. Returns where, in words, for the message."""
    from tunedeck.engine import builtin

    with contextlib.suppress(OSError, ValueError):  # no terminal any more: the file still has it
        print(text, file=sys.stderr, flush=True)
    if run_dir is not None:
        path = run_dir / "error.log"
    else:
        path = builtin.cache_dir() / "logs" / f"error-{time.strftime('%Y%m%d-%H%M%S')}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError:
        return "on stderr (no log file could be written)"
    return f"in {path} and on stderr"
