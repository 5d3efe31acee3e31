"""A dark Fusion palette and matching pyqtgraph colours: easy on the eyes for a window kept open all day."""

from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication

BACKGROUND = "#1b1d21"
PANEL = "#23262b"
BASE = "#16181b"
TEXT = "#d4d7dc"
MUTED = "#8a9099"
ACCENT = "#4fa3ff"
GRID = "#2e3238"  # opaque grid colours (cheaper to paint than alpha-blended lines)
GRID_MINOR = "#24272c"

# One colour per series, the same in every plot and in the hover read-out.
COLORS = {
    "loss": "#5aa9ff",
    "loss_raw": "#3b5f86",
    "eval": "#ffb347",
    "lr": "#b58cff",
    "grad_norm": "#ff7a90",
    "tokens_per_s": "#4fd1a5",
    "mem_allocated": "#5aa9ff",
    "mem_reserved": "#8fd3ff",
    "mem_peak": "#ff7a90",
    "gpu_used": "#4fd1a5",
    "gpu_total": "#6b7280",
    "rss": "#ffd166",
    "host_used": "#ffd166",
    "cpu": "#8fd3ff",
    "overlay": "#c9c9c9",
    "marker": "#ffd166",
    "cursor": "#9aa0a6",
}

# Runs overlaid from the library: one colour per run, apart from the series colours above.
OVERLAY_COLORS = ["#f2f2f2", "#ff9f6e", "#7ee081", "#f07fd0", "#e8d36a", "#6ee0e0", "#c39bff", "#ff6b6b"]

ERROR_BG = "#5c1f24"
ERROR_FG = "#ffd7da"
WARN_BG = "#5a4a16"


def configure_pyqtgraph() -> None:
    pg.setConfigOptions(background=BACKGROUND, foreground=TEXT, antialias=False)


def apply(app: QApplication) -> None:
    """Fusion with a dark palette; also sets pyqtgraph's colours."""
    configure_pyqtgraph()
    app.setStyle("Fusion")
    pal = QPalette()
    roles = {
        QPalette.ColorRole.Window: PANEL,
        QPalette.ColorRole.WindowText: TEXT,
        QPalette.ColorRole.Base: BASE,
        QPalette.ColorRole.AlternateBase: PANEL,
        QPalette.ColorRole.ToolTipBase: "#2c3036",
        QPalette.ColorRole.ToolTipText: TEXT,
        QPalette.ColorRole.PlaceholderText: MUTED,
        QPalette.ColorRole.Text: TEXT,
        QPalette.ColorRole.Button: "#2c3036",
        QPalette.ColorRole.ButtonText: TEXT,
        QPalette.ColorRole.BrightText: "#ffffff",
        QPalette.ColorRole.Link: ACCENT,
        QPalette.ColorRole.Highlight: "#2f6db5",
        QPalette.ColorRole.HighlightedText: "#ffffff",
    }
    for role, color in roles.items():
        pal.setColor(role, QColor(color))
    for role in (QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText, QPalette.ColorRole.WindowText):
        pal.setColor(QPalette.ColorGroup.Disabled, role, QColor("#6b7078"))
    app.setPalette(pal)
    app.setStyleSheet(
        f"QToolTip {{ color: {TEXT}; background: #2c3036; border: 1px solid #3a3f46; padding: 4px; }}"
        "QGroupBox { border: 1px solid #34383f; border-radius: 4px; margin-top: 14px; padding-top: 4px; }"
        f"QGroupBox::title {{ subcontrol-origin: margin; left: 8px; padding: 0 4px; color: {MUTED}; }}"
        "QDockWidget::title { padding: 4px 6px; background: #2a2d33; }"
        'QLineEdit[invalid="true"] { border: 1px solid #e5484d; background: #3a1d20; }'
        'QLineEdit[changed="true"] { border: 1px solid #d9a32b; }'
        'QComboBox[changed="true"] { border: 1px solid #d9a32b; }'
        # a checked tool button (Follow) must look pressed: Fusion's dark palette barely shows it
        "QToolButton:checked { background: #2f4f7a; border: 1px solid #4f7fd9; border-radius: 3px; }"
    )
