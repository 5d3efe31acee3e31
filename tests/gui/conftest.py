"""GUI tests run offscreen with pytest-qt; every window gets its own settings file and run folder."""

from __future__ import annotations

import gc
import json
import os
import tempfile

# Offscreen, on one 1920 x 1200 screen (the plugin's own default is 800 x 600, smaller than the
# window's minimum). A test of a small screen starts a process with a screen of its own.
_screen = os.path.join(tempfile.mkdtemp(prefix="tunedeck-screen-"), "screen.json")


def screen_config(width: int, height: int, path: str) -> str:
    with open(path, "w") as fh:
        json.dump(
            {
                "screens": [
                    {
                        "name": "test",
                        "x": 0,
                        "y": 0,
                        "width": width,
                        "height": height,
                        "logicalDpi": 96,
                        "logicalBaseDpi": 96,
                        "dpr": 1,
                    }
                ]
            },
            fh,
        )
    return f"offscreen:configfile={path}"


os.environ["QT_QPA_PLATFORM"] = screen_config(1920, 1200, _screen)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEMO_PRESET = ROOT / "resources" / "presets" / "demo.yaml"

# Small enough that a CPU step takes a few tens of milliseconds; the runs still learn a little.
FAST = [
    "train.per_device_train_batch_size=2",
    "data.max_length=48",
    "lora.r=4",
    "lora.alpha=8",
    "train.eval_steps=0",
    "train.save_steps=0",
    "train.logging_steps=1",
    "data.eval_fraction=0.02",
]


@pytest.fixture(autouse=True, scope="session")
def _theme(qapp):
    from tunedeck.gui.widgets import theme

    theme.apply(qapp)


@pytest.fixture
def settings(tmp_path):
    from PySide6.QtCore import QSettings

    return QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)


@pytest.fixture
def make_config(tmp_path):
    """make_config("train.max_steps=5", ...) -> the demo preset with fast settings, runs under tmp_path."""
    from tunedeck.engine import config as cfgmod

    def make(*overrides: str):
        base = cfgmod.load(DEMO_PRESET) if DEMO_PRESET.is_file() else cfgmod.Config()
        return cfgmod.apply_overrides(base, [*FAST, f"train.output_dir={tmp_path / 'runs'}", *overrides])

    return make


@pytest.fixture
def make_window(qtbot, settings):
    """make_window(factory=None) -> a shown MainWindow (real engine unless a factory is given)."""
    from PySide6.QtCore import QCoreApplication, QEvent

    from tunedeck.gui.main_window import MainWindow

    windows = []

    def make(factory=None, restore=True):
        # Not qtbot.addWidget: pytest-qt would close it before this fixture ends the run, and closing
        # during a run asks the user (a modal dialog nobody answers in a test).
        win = MainWindow(settings=settings, session_factory=factory, restore=restore)
        if settings.value("window/geometry") is None:
            win.resize(1400, 900)
        win.show()
        windows.append(win)
        return win

    yield make
    for win in windows:  # never leave a training thread behind
        if win.bridge.active:
            win.bridge.send({"cmd": "cancel"})
            qtbot.waitUntil(lambda w=win: not w.bridge.active, timeout=60_000)
        win.close_when_ended = False
        win.close()
        win.deleteLater()
    # Free the windows now, on the GUI thread, then their Python side: a garbage collection that
    # happens to run in a later test's training thread must not be the one to free Qt objects.
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    qtbot.wait(1)
    gc.collect()


@pytest.fixture(autouse=True)
def _data_home(tmp_path, monkeypatch):
    """The window's default runs folder lies in the user's data folder: a temporary one here."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data-home"))
