"""Python's cyclic garbage collection, kept to the GUI thread in a process that also trains.

CPython collects in whichever thread allocates when a generation's threshold is crossed. When that is
the engine's thread and the garbage holds a Qt object (an old window, a closed dialog, a plot item in
a reference cycle), its C++ destructor runs in that thread: it takes Qt's lock on the object's
connections, then waits for the GIL, which the GUI thread holds while it waits for that same lock to
delete an object of its own. Both wait for ever (seen as a window frozen mid-run). pyqtgraph's
GarbageCollector turns the automatic collection off and collects on a timer in the GUI thread, with
the same thresholds, so cycles are still freed within a second and never in another thread.
"""

from __future__ import annotations

import gc

from pyqtgraph.util.garbage_collector import GarbageCollector

_collector: GarbageCollector | None = None


def collect_in_gui_thread(interval_s: float = 1.0) -> None:
    """From now on, only the GUI thread (which must call this) collects cycles. Idempotent."""
    global _collector
    if _collector is None:
        _collector = GarbageCollector(interval=interval_s)


def restore_automatic() -> None:
    """Back to CPython's own collection (for tests that leave Qt behind)."""
    global _collector
    if _collector is not None:
        _collector.timer.stop()
        _collector = None
        gc.enable()
