"""A coloured strip above the plots for what must not be missed: a failed run, a refused start."""

from __future__ import annotations

import html

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QToolButton, QWidget

from tunedeck.gui.widgets.theme import ERROR_BG, ERROR_FG, WARN_BG


class Banner(QFrame):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.close_button = QToolButton()
        self.close_button.setText("✕")
        self.close_button.setAutoRaise(True)
        self.close_button.setToolTip("Hide this message")
        self.close_button.clicked.connect(self.hide)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(10, 6, 6, 6)
        lay.addWidget(self.label, 1)
        lay.addWidget(self.close_button)
        self.level = ""
        self.message = ""
        self.hide()

    def show_message(self, message: str, advice: str = "", level: str = "error") -> None:
        self.level, self.message = level, message
        bg = ERROR_BG if level == "error" else WARN_BG
        self.setStyleSheet(
            f"Banner {{ background: {bg}; border-radius: 4px; }} QLabel {{ color: {ERROR_FG}; }}"
        )
        text = f"<b>{html.escape(message)}</b>"
        if advice:
            text += f"<br>{html.escape(advice)}"
        self.label.setText(text)
        self.show()

    def clear(self) -> None:
        self.level, self.message = "", ""
        self.hide()
