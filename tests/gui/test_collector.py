"""Cycles are collected in the GUI thread only, once a bridge shares the process with an engine thread."""

from __future__ import annotations

import gc
import threading
import weakref

from PySide6.QtCore import QObject

from tunedeck.gui import collector
from tunedeck.gui.bridge import SessionBridge


class Node(QObject):
    """A Qt object in a reference cycle: only the cyclic collector can free it."""

    def __init__(self) -> None:
        super().__init__()
        self.me = self


def test_a_thread_that_allocates_cycles_never_collects_them_itself(qtbot):
    bridge = SessionBridge()
    assert not gc.isenabled()
    where: list[str] = []

    def note(phase: str, info: dict) -> None:
        if phase == "start":
            where.append(threading.current_thread().name)

    gc.callbacks.append(note)
    try:
        qt_garbage = weakref.ref(Node())  # garbage from the GUI side, as an old window leaves
        done = threading.Event()

        def engine() -> None:  # allocates far past every collection threshold, as training does
            for _ in range(200_000):
                a: list = []
                a.append(a)
            done.set()

        t = threading.Thread(target=engine, name="tunedeck-train")
        t.start()
        qtbot.waitUntil(done.is_set, timeout=30_000)
        t.join()
        assert where == []  # the engine thread crossed the thresholds hundreds of times: no collection
        qtbot.waitUntil(lambda: qt_garbage() is None, timeout=5_000)  # the GUI's timer collected it
        assert where and set(where) == {"MainThread"}
    finally:
        gc.callbacks.remove(note)
        bridge.deleteLater()
        collector.restore_automatic()
    assert gc.isenabled()
