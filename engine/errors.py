"""One exception type for every mistake a user can make or fault a run can hit.

Its ``kind`` matches the ``kind`` field of ``error``/``warning`` events, so a raise anywhere in
the engine turns into the same one-line message in the CLI, the GUI and metrics.jsonl.
"""

from __future__ import annotations

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
