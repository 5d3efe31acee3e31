"""A trained model kept for chatting after its run, or loaded from a run's folder. No Qt here.

:class:`KeptModel` holds a ``tunedeck.engine.sampling.Sampler``: the one a finished session hands
over (the trained model, still in memory), or one loaded from a run's ``final/`` or a checkpoint.
Loading and generating block, so they run in a worker thread; the worker touches no Qt object and
drops what it got into a queue, which the window reads on its own thread with :meth:`poll`. One job
at a time; :meth:`stop` asks a generation to end after the current token.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunedeck.engine.errors import TunedeckError
from tunedeck.engine.protocol import SamplingOptions


@dataclass(frozen=True)
class Answer:
    prompt: str
    text: str
    options: SamplingOptions


@dataclass(frozen=True)
class Loaded:
    label: str


@dataclass(frozen=True)
class Failed:
    message: str  # one line: what went wrong and what to do


Result = Answer | Loaded | Failed


def _one_line(e: BaseException) -> str:
    if isinstance(e, TunedeckError):
        return e.one_line()
    return f"{type(e).__name__}: {e}"


class KeptModel:
    """The model the sample panel chats with when no run is going."""

    def __init__(self, loader: Callable[[str], Any] | None = None) -> None:
        self.sampler: Any = None  # a Sampler, or None
        self.label = ""  # what it is, for the panel: "run X (kept in memory)", "checkpoint folder ..."
        self._loader = loader  # Sampler.from_folder unless a test gives another
        self._results: queue.SimpleQueue[Result] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def ready(self) -> bool:
        return self.sampler is not None and not self.busy

    @property
    def busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def keep(self, sampler: Any, label: str) -> None:
        """Hold ``sampler`` (a finished run's model) for generation."""
        self.sampler, self.label = sampler, label

    def release(self) -> None:
        """Let the model go (before the next run, so two models never share the memory)."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=60)
        self.sampler, self.label = None, ""

    def load(self, folder: str | Path) -> bool:
        """Load a run's final/ or a checkpoint folder in the background; False while busy."""
        if self.busy:
            return False
        folder = Path(folder)

        def job() -> None:
            try:
                loader = self._loader
                if loader is None:
                    from tunedeck.engine.sampling import Sampler

                    loader = Sampler.from_folder
                sampler = loader(str(folder))
            except Exception as e:  # reported in the window; the window stays up
                self._results.put(Failed(f"could not load {folder}: {_one_line(e)}"))
                return
            self.sampler = sampler
            name = folder.name if folder.name != "final" else f"{folder.parent.name}/final"
            self.label = f"{name} (loaded from disk)"
            self._results.put(Loaded(self.label))

        self.sampler, self.label = None, ""
        self._start(job)
        return True

    def generate(self, prompt: str, options: SamplingOptions) -> bool:
        """Generate in the background; False when there is no model or a job is running."""
        if not self.ready:
            return False
        sampler = self.sampler

        def job() -> None:
            try:
                text = sampler.generate(prompt, options, should_stop=self._stop.is_set)
            except Exception as e:
                self._results.put(Failed(_one_line(e)))
                return
            self._results.put(Answer(prompt, text, options))

        self._start(job)
        return True

    def stop(self) -> None:
        """End the generation after the current token (what was written so far is the answer)."""
        self._stop.set()

    def poll(self) -> list[Result]:
        out: list[Result] = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    def _start(self, job: Callable[[], None]) -> None:
        self._stop.clear()
        self._worker = threading.Thread(target=job, name="tunedeck-chat", daemon=True)
        self._worker.start()
