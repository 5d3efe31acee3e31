"""`tunedeck [CONFIG.yaml] [--start]`: open the window (and start the run at once with --start)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from tunedeck.engine import builtin
from tunedeck.gui import system_libs

ICON = builtin.RESOURCES / "icons" / "tunedeck.svg"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="tunedeck",
        description="Tunedeck: fine-tune language models with LoRA/QLoRA and watch (and steer) the run live.",
    )
    ap.add_argument(
        "config",
        nargs="?",
        help="settings to open (a preset or config YAML); default: the settings used last time",
    )
    ap.add_argument("--start", action="store_true", help="start the run as soon as the window is open")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.config and not Path(args.config).is_file():
        print(f"tunedeck: config file {args.config} does not exist", file=sys.stderr)
        return 2
    problem = system_libs.check()
    if problem:  # said before Qt loads its platform plugin, which would abort with a misleading message
        print(problem, file=sys.stderr)
        return 2

    from PySide6.QtCore import QTimer
    from PySide6.QtGui import QIcon
    from PySide6.QtWidgets import QApplication

    from tunedeck.gui.main_window import MainWindow
    from tunedeck.gui.widgets import theme

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("Tunedeck")
    app.setOrganizationName("Tunedeck")
    app.setDesktopFileName("tunedeck")  # matches resources/tunedeck.desktop, for the taskbar icon
    if ICON.is_file():
        app.setWindowIcon(QIcon(str(ICON)))
    theme.apply(app)

    win = MainWindow()
    if args.config and not win.load_config(args.config):
        if args.start:
            print(f"tunedeck: could not load {args.config}; see the window's log", file=sys.stderr)
        args.start = False
    win.show()
    if args.start:
        QTimer.singleShot(0, win.start_run)

    # Ctrl+C in the terminal closes the window the normal way (which asks about a running run).
    signal.signal(signal.SIGINT, lambda *_: win.close())
    keepalive = QTimer()
    keepalive.start(250)  # lets Python see the signal while Qt's loop runs
    keepalive.timeout.connect(lambda: None)

    def last_words() -> None:
        # The window asks before closing during a run; if the app ends another way, end the run cleanly.
        if win.bridge.active:
            win.bridge.send({"cmd": "cancel"})
            win.bridge.wait(30)

    app.aboutToQuit.connect(last_words)
    return app.exec()


if __name__ == "__main__":
    raise SystemExit(main())
