"""The end-of-run summary: what a run came to, where its adapter is, and how to load it with peft."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QGuiApplication
from PySide6.QtWidgets import (
    QBoxLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from tunedeck.gui.history import fmt_duration, fmt_mb, fmt_number
from tunedeck.gui.run_library import RunSummary, peft_snippet

STATUS_COLORS = {"completed": "#4fd1a5", "stopped": "#4fd1a5", "cancelled": "#f5c16c", "failed": "#ff7a85"}


NO_RUN = "No run yet: the summary of a run shows here when it ends."


class SummaryPanel(QWidget):
    """Final and best eval loss, duration, tokens, throughput, peak memory, the adapter folder."""

    message = Signal(str, str)  # (level, text) for the log

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.title = QLabel(NO_RUN)
        self.title.setWordWrap(True)
        self.values: dict[str, QLabel] = {}
        # two pairs a row: the summary stays short enough for a small screen's bottom area
        form = QGridLayout()
        form.setVerticalSpacing(2)
        form.setHorizontalSpacing(10)
        keys = ("final loss", "best eval loss", "duration", "tokens", "throughput", "peak memory")
        for i, key in enumerate((*keys, "adapter")):
            lab = QLabel("–")
            lab.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            lab.setWordWrap(True)
            self.values[key] = lab
            name = QLabel(key)
            name.setStyleSheet("color: #8a9099;")
            row, col = divmod(i, 2)
            if key == "adapter":
                form.addWidget(name, row, 0)
                form.addWidget(lab, row, 1, 1, 3)
            else:
                form.addWidget(name, row, 2 * col)
                form.addWidget(lab, row, 2 * col + 1)
        form.setColumnStretch(1, 1)
        form.setColumnStretch(3, 1)
        self.open_button = QPushButton("Open folder")
        self.open_button.setToolTip("Show the adapter folder in the file manager.")
        self.open_button.clicked.connect(self.open_folder)
        self.copy_button = QPushButton("Copy code")
        self.copy_button.setToolTip("Copy Python that loads this adapter with transformers and peft.")
        self.copy_button.clicked.connect(self.copy_snippet)
        self.snippet = QPlainTextEdit()
        self.snippet.setReadOnly(True)
        self.snippet.setStyleSheet("font-family: monospace; font-size: 11px;")
        self.snippet.setMaximumHeight(130)
        self.snippet.setMinimumHeight(40)
        buttons = QHBoxLayout()
        buttons.addWidget(self.open_button)
        buttons.addWidget(self.copy_button)
        buttons.addStretch(1)
        left = QVBoxLayout()
        left.addWidget(self.title)
        left.addLayout(form)
        left.addStretch(1)
        right = QVBoxLayout()
        right.addLayout(buttons)
        right.addWidget(self.snippet, 1)
        lay = self.box = QBoxLayout(QBoxLayout.Direction.LeftToRight, self)
        lay.setContentsMargins(6, 4, 6, 4)
        lay.addLayout(left, 1)
        lay.addLayout(right, 1)
        self.summary: RunSummary | None = None
        self._set_enabled(False)

    def resizeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        # side by side in a wide bottom area, one above the other in a narrow column
        narrow = self.width() < 620
        self.box.setDirection(
            QBoxLayout.Direction.TopToBottom if narrow else QBoxLayout.Direction.LeftToRight
        )
        super().resizeEvent(event)

    def _set_enabled(self, on: bool) -> None:
        has_output = on and self.summary is not None and bool(self.summary.output)
        self.open_button.setEnabled(has_output)
        self.copy_button.setEnabled(has_output)
        self.snippet.setVisible(has_output)

    def show_summary(self, s: RunSummary, config: dict[str, Any] | None = None) -> None:
        self.summary = s
        color = STATUS_COLORS.get(s.status, "#aeb4bd")
        self.title.setText(
            f"<b>{html.escape(s.name)}</b> &nbsp;<span style='color:{color}'>{html.escape(s.status)}</span>"
            f" at step {s.steps:,}"
            + (f" of {s.total_steps:,}" if s.total_steps else "")
            + f"<br><span style='color:#8a9099'>{html.escape(s.model)} on {html.escape(s.dataset)}</span>"
        )
        v = self.values
        v["final loss"].setText(fmt_number(s.final_loss) if s.final_loss is not None else "–")
        v["best eval loss"].setText(
            f"{fmt_number(s.best_eval[1])} at step {s.best_eval[0]:,}" if s.best_eval else "– (no evaluation)"
        )
        v["duration"].setText(fmt_duration(s.duration_s))
        v["tokens"].setText(f"{s.tokens:,}")
        v["throughput"].setText(f"{s.tokens_per_s:,.0f} tokens/s" if s.tokens_per_s else "–")
        where = "GPU allocator" if s.on_gpu else "process RSS"
        v["peak memory"].setText(f"{fmt_mb(s.peak_mem_mb)} ({where})" if s.peak_mem_mb else "–")
        v["adapter"].setText(s.output or "none saved (a cancelled or failed run keeps only its checkpoints)")
        self.snippet.setPlainText(peft_snippet(s, config) if s.output else "")
        self._set_enabled(True)

    def clear(self, text: str = "The run is going: its summary shows here when it ends.") -> None:
        self.summary = None
        self.title.setText(text)
        for lab in self.values.values():
            lab.setText("–")
        self.snippet.setPlainText("")
        self._set_enabled(False)

    def open_folder(self) -> None:
        if self.summary is not None and self.summary.output and Path(self.summary.output).is_dir():
            QDesktopServices.openUrl(QUrl.fromLocalFile(self.summary.output))

    def copy_snippet(self) -> None:
        QGuiApplication.clipboard().setText(self.snippet.toPlainText())
        self.message.emit("info", "code that loads the adapter copied to the clipboard")
