"""The sample panel: type a prompt, press Generate, read what the model writes at this step."""

from __future__ import annotations

import html

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from tunedeck.engine.protocol import SampleEvent


class SamplePanel(QWidget):
    generate = Signal(str, int)  # (prompt, max_new_tokens)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText("Type a prompt, as a user of the fine-tuned model would…")
        self.prompt.setMaximumHeight(70)
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 4096)
        self.max_tokens.setValue(64)
        self.max_tokens.setToolTip("Most tokens to generate")
        self.button = QPushButton("Generate")
        self.button.setToolTip(
            "Generate with the model as it is at this step (greedy). Needs a running or "
            "paused run; training waits while it writes."
        )
        self.status = QLabel("Start a run to sample from the model.")
        self.status.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.status.setStyleSheet("color: #8a9099;")
        self.output = QTextBrowser()
        self.output.setOpenLinks(False)
        # small minimums: on a small screen the bottom docks share a short area with the plots
        self.prompt.setMinimumHeight(34)
        self.output.setMinimumHeight(36)
        row = QHBoxLayout()
        row.addWidget(QLabel("max new tokens"))
        row.addWidget(self.max_tokens)
        row.addWidget(self.status, 1)
        row.addWidget(self.button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(self.prompt)
        lay.addLayout(row)
        lay.addWidget(self.output, 1)
        self.samples: list[SampleEvent] = []
        self.pending = 0
        self.live = False
        self.button.clicked.connect(self._clicked)
        self.set_live(False)

    def set_live(self, live: bool) -> None:
        self.live = live
        self.button.setEnabled(live)
        if not live:
            self.pending = 0
            self.status.setText("Start a run to sample from the model.")
        elif not self.pending:
            self.status.setText("")

    def _clicked(self) -> None:
        # Sent as typed: a trailing newline is part of many training prompts ("Upper: cloud\n").
        text = self.prompt.toPlainText()
        if not text.strip() or not self.live:
            self.status.setText("Type a prompt first." if self.live else self.status.text())
            return
        self.pending += 1
        self.status.setText("generating at the next step boundary…")
        self.generate.emit(text, self.max_tokens.value())

    def command_refused(self) -> None:
        """An error came back: a sample asked for may never arrive; stop saying it is on its way."""
        if self.pending:
            self.pending = 0
            self.status.setText("the engine reported an error (see the log)")

    def add_sample(self, ev: SampleEvent) -> None:
        self.samples.append(ev)
        self.pending = max(0, self.pending - 1)
        self.status.setText("" if not self.pending else "generating…")
        text = (
            f"<span style='color:#e6e6e6; white-space:pre-wrap'>{html.escape(ev.text)}</span>"
            if ev.text.strip()
            else "<span style='color:#8a9099'><i>(no text: the model ended its answer at once)</i></span>"
        )
        block = (
            f"<p><span style='color:#8a9099'>step {ev.step}</span><br>"
            f"<span style='color:#8fd3ff'>{html.escape(ev.prompt)}</span><br>{text}</p>"
        )
        self.output.append(block)
